"""Which failures belong to one request and which to a rank.

A request's own failure (a value vLLM, the tokenizer or the chat template rejects; an error the engine
raises for that request while it keeps stepping) ends that request with its HTTP status and nothing
else. Only the loss of an engine or a rank actor is a rank failure: in lockstep MoE serving it costs
the whole DP group (group_supervisor.py), so treating a request's error as one would let any client
re-form the group at will.

On the rank, `classify` turns an exception into a `RequestError` or, when the engine is gone, a
`RankFailure`. Both cross to the ingress as plain data (`error_reply`, read back by `from_reply`): an
error chunk on the output channel, or `submit`'s reply.
"""

from __future__ import annotations

from typing import Any

# Error messages go into JSON bodies and msgpack frames: long ones are cut (a rejected value may be
# megabytes) and lone surrogates escaped (a prompt's text may hold them; UTF-8 encoders refuse them).
MAX_MESSAGE_CHARS = 1000


def clean_message(message: str) -> str:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class RequestError(Exception):
    """One request failed; the rank and the group are fine. `status` is the HTTP status it maps to."""

    default_status = 500

    def __init__(self, message: str, status: int | None = None, param: str | None = None):
        message = clean_message(str(message))
        super().__init__(message)
        self.message = message
        self.status = self.default_status if status is None else int(status)
        self.param = param


class RequestRejected(RequestError, ValueError):
    """The request is invalid for this model (an HTTP 4xx, 400 unless stated)."""

    default_status = 400


class RankFailure(RuntimeError):
    """The rank's engine or actor is gone: the DP group must be re-formed."""


def error_reply(exc: BaseException) -> dict[str, Any]:
    """`exc` as plain data for the ingress: a RequestError keeps its status and param; anything else
    is a rank failure."""
    if isinstance(exc, RequestError):
        return {"error": exc.message, "status": exc.status, "param": exc.param}
    return {"error": clean_message(f"{type(exc).__name__}: {exc}"), "status": 503, "rank_failed": True}


def from_reply(reply: dict[str, Any]) -> RequestError | RankFailure:
    """The exception an error reply (`error_reply`) stands for."""
    if reply.get("rank_failed"):
        return RankFailure(reply["error"])
    status = int(reply.get("status", 500))
    cls = RequestRejected if 400 <= status < 500 else RequestError
    return cls(reply["error"], status, reply.get("param"))


def _vllm_client_error(exc: BaseException) -> RequestError | None:
    """vLLM's own request-level errors: validation (VLLMClientError, not a ValueError) and graceful
    HTTP errors such as its queue limits, which carry their status."""
    try:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
    except ImportError:  # the ingress has no vLLM; it never classifies engine errors
        return None
    if isinstance(exc, GracefulHTTPError):
        return RequestError(exc.message, int(exc.http_status))
    if isinstance(exc, VLLMClientError):
        return RequestRejected(str(exc), param=getattr(exc, "parameter", None))
    return None


def _vllm_engine_errors() -> tuple[type[BaseException], type[BaseException]] | None:
    """vLLM's (EngineDeadError, EngineGenerateError); None without vLLM."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
    except ImportError:
        return None
    return EngineDeadError, EngineGenerateError


def classify(exc: BaseException, engine_alive: bool) -> RequestError | RankFailure:
    """What `exc`, raised while preparing or running one request on a rank, means.

    With the engine alive every error is the request's own: bad values (ValueError, TypeError,
    UnicodeError, OverflowError, vLLM's validation errors, anything the tokenizer or template raises
    for its input) are a 400, others a 500 for that request. vLLM wraps errors raised while a request
    runs in EngineGenerateError; its cause decides. A dead engine (EngineDeadError, or `errored`) is a
    rank failure whatever was raised."""
    if isinstance(exc, RankFailure):
        return exc
    dead, generate = _vllm_engine_errors() or ((), ())
    if not engine_alive or isinstance(exc, dead):
        return RankFailure(clean_message(f"the engine is gone ({type(exc).__name__}: {exc})"))
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, generate) and exc.__cause__ is not None:
        return classify(exc.__cause__, engine_alive)
    if (known := _vllm_client_error(exc)) is not None:
        return known
    if isinstance(exc, (ValueError, TypeError, UnicodeError, OverflowError)):
        return RequestRejected(str(exc) or type(exc).__name__)
    return RequestError(f"the request failed on its rank ({type(exc).__name__}: {exc})", 500)
