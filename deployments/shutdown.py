"""Graceful shutdown of dpserve applications: drain them, then shut Serve down.

`serve.shutdown()` (and `serve shutdown`, and a `serve run` that gets Ctrl-C) deletes the
applications and kills Serve's HTTP proxies in the same control-loop tick, so streams in flight are
cut even though the ingress replica itself would drain. Draining first closes that gap: each dpserve
ingress answers new API requests with 503 + Retry-After and waits until the requests in flight have
sent their last byte (up to its `drain_timeout_s`), and only then is Serve shut down.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("dpserve.shutdown")


def drain_apps(names: list[str] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """Drain every dpserve application (or `names`) in parallel. Needs a Ray connection. Returns per
    application the ingress's drain result, or {"error": ...} (e.g. an application that is not
    dpserve's, which has no `drain` method)."""
    from ray import serve

    if names is None:
        names = list(serve.status().applications)
    pending = {}
    for name in names:
        try:
            pending[name] = serve.get_app_handle(name).drain.remote(timeout_s)
        except Exception as exc:
            pending[name] = exc
    out: dict[str, Any] = {}
    wait_s = (timeout_s if timeout_s is not None else 300.0) + 30.0
    for name, call in pending.items():
        try:
            if isinstance(call, Exception):
                raise call
            out[name] = call.result(timeout_s=wait_s)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def graceful_shutdown(names: list[str] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """Drain, then `serve.shutdown()` (which stops every rank group through the ingress's destructor)."""
    from ray import serve

    t0 = time.monotonic()
    drained = drain_apps(names, timeout_s)
    t_drained = time.monotonic()
    logger.warning("drained %s in %.1f s; shutting Serve down", drained, t_drained - t0)
    serve.shutdown()
    return {"apps": drained, "drain_s": t_drained - t0, "shutdown_s": time.monotonic() - t_drained}
