"""Admission of API requests into the ingress: the in-flight count and the drain flag.

Draining (graceful shutdown) answers new API requests with 503 + Retry-After and waits until those
in flight have sent their last byte.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from deployments.responses import error

logger = logging.getLogger("dpserve.app")


class Admission:
    """API requests in flight in this process (one ingress replica per process) and the drain flag.

    Class attributes, not a module-level instance: Serve pickles the ingress class by value (with
    copies of the globals it uses), while this class is pickled by reference, so both the ingress
    and the middleware reach this one object in the replica."""

    draining: bool = False
    in_flight: int = 0

    @classmethod
    async def drain(cls, timeout_s: float) -> dict[str, Any]:
        """Stop admitting API requests and wait until those in flight are done, at most `timeout_s`."""
        cls.draining = True
        t0 = time.monotonic()
        at_start = cls.in_flight
        logger.warning("draining: %d API requests in flight, waiting up to %.0f s", at_start, timeout_s)
        while cls.in_flight and time.monotonic() - t0 < timeout_s:
            await asyncio.sleep(0.05)
        left = cls.in_flight
        waited = time.monotonic() - t0
        logger.warning("drained in %.2f s: %d requests left", waited, left)
        return {
            "drained": left == 0,
            "in_flight_at_start": at_start,
            "in_flight_left": left,
            "waited_s": waited,
        }


class AdmissionMiddleware:
    """Pure ASGI, so a streamed response counts as in flight until its last byte is sent. While the
    ingress drains, new API requests (POST /v1/...) are answered 503 + Retry-After at once."""

    def __init__(self, asgi_app: Any) -> None:
        self.app = asgi_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope.get("type") != "http"
            or scope.get("method") != "POST"
            or "/v1/" not in scope.get("path", "")
        ):
            return await self.app(scope, receive, send)
        if Admission.draining:
            response = error("the server is shutting down; retry shortly", 503, headers={"Retry-After": "5"})
            return await response(scope, receive, send)
        Admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            Admission.in_flight -= 1
