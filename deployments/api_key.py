"""The API key: every route but `/health` requires `Authorization: Bearer <key>` when one is set.

The key is `serving.api_key` in the config or, when that is unset, the `DPSERVE_API_KEY` environment
variable of the ingress replica (as vLLM's `--api-key` / `VLLM_API_KEY`). No key: no check (the
default configs bind 127.0.0.1 only). A wrong or missing key gets 401 with OpenAI's error body.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from fastapi.responses import JSONResponse

from deployments import openai_protocol as oai

ENV_VAR = "DPSERVE_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # load balancers and Kubernetes probes carry no key


def resolve_api_key(configured: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The key in force: the configured one, else the environment variable's; None: no check."""
    env = os.environ if environ is None else environ
    return configured or env.get(ENV_VAR) or None


class ApiKey:
    """The key of this ingress replica (set by its constructor).

    A class attribute, as `Admission`: Serve pickles the ingress class by value and this class by
    reference, so the ingress and the middleware reach the same value in the replica."""

    key: str | None = None


def _presented_key(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def authorized(scope: dict[str, Any], key: str | None) -> bool:
    if key is None or scope.get("path") in OPEN_PATHS:
        return True
    presented = _presented_key(scope)
    # Constant-time comparison: the time taken says nothing about how much of a guess was right.
    return presented is not None and hmac.compare_digest(presented.encode(), key.encode())


class ApiKeyMiddleware:
    """Pure ASGI: refuses a request without the key before any route (or the admission count) sees it."""

    def __init__(self, asgi_app: Any) -> None:
        self.app = asgi_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or authorized(scope, ApiKey.key):
            return await self.app(scope, receive, send)
        # OpenAI's answer to a bad key: 401, type invalid_request_error, code invalid_api_key.
        body = oai.error_body("invalid or missing API key (send 'Authorization: Bearer <key>')", 401,
                              err_type="invalid_request_error", code="invalid_api_key")  # fmt: skip
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)
