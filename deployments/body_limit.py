"""The request body size limit (`serving.max_body_bytes`): 413 with an OpenAI error body.

A body that announces its size (Content-Length) over the limit is refused before any of it is read; a
chunked one is counted as it is read and refused when it passes the limit, so the ingress never holds
more than about the limit of any one request.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

from deployments.responses import error


def too_large_message(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes"


class BodyLimitMiddleware:
    """Pure ASGI. `max_bytes` is a class attribute the ingress sets from its config: Serve pickles the
    ingress class by value, this class by reference, so both see the one value in the replica."""

    max_bytes: int = 8 << 20

    def __init__(self, asgi_app: Any) -> None:
        self.app = asgi_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = 0
                if announced > limit:
                    return await error(too_large_message(limit), 413)(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI lets an HTTPException from reading the body through to the app's handler.
                    raise HTTPException(413, too_large_message(limit))
            return message

        await self.app(scope, limited_receive, send)
