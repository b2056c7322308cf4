"""The dpserve Serve application on loopback for a test module: `base_url` serves the app built from the
module's own `app_args` fixture (`tests.helpers.tiny_app_args`) on a free port. A folder of modules
that share one app (`openai_app/`) overrides both fixtures with package scope."""

from __future__ import annotations

import pytest

from tests.helpers import serve_app


@pytest.fixture(scope="module")
def base_url(ray_local, app_args):
    yield from serve_app(app_args)
