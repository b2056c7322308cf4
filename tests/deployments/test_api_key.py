"""The API key: every route but /health needs `Authorization: Bearer <key>` once a key is set."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from deployments.admission import AdmissionMiddleware
from deployments.api_key import ENV_VAR, ApiKey, ApiKeyMiddleware, resolve_api_key
from deployments.config import DPServeConfig

KEY = "sk-test-123"


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(AdmissionMiddleware)
    app.add_middleware(ApiKeyMiddleware)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    @app.get("/dpserve/status")
    async def status() -> dict:
        return {"ranks": []}

    @app.post("/v1/completions")
    async def completions() -> dict:
        return {"choices": []}

    return app


def _get(method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(main())


@pytest.fixture
def api_key():
    ApiKey.key = KEY
    yield KEY
    ApiKey.key = None


ROUTES = [("GET", "/v1/models"), ("GET", "/dpserve/status"), ("POST", "/v1/completions"), ("GET", "/nope")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_health_needs_the_key(api_key: str, method: str, path: str) -> None:
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):  # fmt: skip
        r = _get(method, path, headers)
        assert r.status_code == 401, (headers, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key" and err["message"]
    r = _get(method, path, {"Authorization": f"Bearer {KEY}"})
    assert r.status_code == (404 if path == "/nope" else 200)
    assert _get(method, path, {"authorization": f"bearer {KEY}"}).status_code == r.status_code


def test_health_is_open_and_no_key_means_no_check(api_key: str) -> None:
    assert _get("GET", "/health").status_code == 200
    ApiKey.key = None
    assert _get("GET", "/v1/models").status_code == 200


def test_key_from_config_else_environment() -> None:
    assert resolve_api_key("from-config", {ENV_VAR: "from-env"}) == "from-config"
    assert resolve_api_key(None, {ENV_VAR: "from-env"}) == "from-env"
    assert resolve_api_key(None, {ENV_VAR: ""}) is None
    assert resolve_api_key(None, {}) is None
    config = DPServeConfig.from_args({"serving": {"api_key": "sk-secret"}})
    assert config.serving.api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in repr(config)  # never in a log line that prints the config
