"""One app for the modules of this folder (the OpenAI routes, hostile requests), started once
(`shared_app.shared_app_args`). Its modules leave the group as they found it (no re-formation)."""

from __future__ import annotations

import pytest

from tests.deployments.openai_app.shared_app import shared_app_args
from tests.helpers import serve_app


@pytest.fixture(scope="package")
def app_args(tiny_model_dir):
    return shared_app_args(tiny_model_dir)


@pytest.fixture(scope="package")
def base_url(ray_local, app_args):
    yield from serve_app(app_args)
