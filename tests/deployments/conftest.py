"""The dpserve Serve application on loopback for a test module: `base_url` serves the app built from the
module's own `app_args` fixture (`tests.helpers.tiny_app_args`) on a free port."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def base_url(ray_local, app_args):
    """The module's Serve app; Serve is shut down after the module (not just the app: a later module's
    serve.start() with its own port would otherwise be ignored and its requests sent to this port)."""
    from ray import serve

    from deployments.app import build_app
    from deployments.rank import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="dpserve", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
