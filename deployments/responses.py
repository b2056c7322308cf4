"""OpenAI-shaped responses from a request's chunks: error replies, the SSE stream and the
non-streamed body. A chunk is the plain dict a rank sends (`text`, `token_ids`, `finish_reason`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse

from deployments import openai_protocol as oai
from deployments.metrics import IngressMetrics
from deployments.request_errors import RequestError

logger = logging.getLogger("dpserve.app")


def error(message: str, status: int, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(oai.error_body(message, status, param=param), status_code=status, headers=headers)


def rejected(exc: RequestError) -> JSONResponse:
    """The reply to a request that failed on its own (a 4xx, or a 5xx for that request only; vLLM's
    own busy answers are 503s, worth a retry)."""
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return error(exc.message, exc.status, exc.param, headers=headers)


def failure_message(exc: BaseException, where: str) -> str:
    """What a client is told when its request could not be finished (never a bare traceback)."""
    if isinstance(exc, LookupError):
        return f"no DP rank is available {where}: {exc.args[0] if exc.args else 'the DP group is being re-formed'}"
    return (
        f"the DP rank failed {where} ({type(exc).__name__}); the DP group is being re-formed, retry shortly"
    )


async def completion_body(
    stream: AsyncIterator[dict[str, Any]],
    request_id: str,
    body: Any,
    prompt: Any,
    chat: bool,
    prompt_tokens: int,
    metrics: IngressMetrics,
    t0: float,
) -> dict[str, Any] | JSONResponse:
    """The whole (non-streamed) completion, or an error reply if the request fails on the way."""
    text, completion_tokens, finish = [], 0, None
    try:
        async for chunk in stream:
            text.append(chunk.get("text", ""))
            completion_tokens += len(chunk.get("token_ids", []))
            finish = chunk.get("finish_reason") or finish
            if completion_tokens and len(text) == 1:
                metrics.ttft(time.perf_counter() - t0)
    except RequestError as exc:
        return rejected(exc)
    except Exception as exc:
        logger.exception("request %s failed", request_id)
        return error(failure_message(exc, "mid-request"), 503, headers={"Retry-After": "5"})
    content = "".join(text)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                  "logprobs": None}  # fmt: skip
        obj = "chat.completion"
    else:
        if body.echo and isinstance(prompt, str):
            content = prompt + content
        choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {
        "id": request_id,
        "object": obj,
        "created": oai.now(),
        "model": body.model,
        "choices": [choice],
        "usage": oai.usage(prompt_tokens, completion_tokens),
    }


class SseEvents:
    """The `data:` events of one streamed completion. `event` encodes any payload; `token_event`, the
    one sent for every chunk of output, gives the same bytes from a prefix and suffix encoded once per
    request, with only the text and finish reason encoded per chunk: it runs for every token of every
    stream on the ingress's event loop (about a tenth of the cost of encoding the whole payload)."""

    def __init__(self, request_id: str, model: str, chat: bool) -> None:
        self.request_id, self.model, self.chat = request_id, model, chat
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.created = oai.now()
        # `json.dumps` of the payload with a marker for the choice, cut at the marker (its last
        # occurrence: the choices come after the id and the model name).
        head, marker, tail = json.dumps(self.payload("\x00choice\x00")).rpartition(
            json.dumps("\x00choice\x00")
        )
        assert marker
        self._head, self._tail = "data: " + head, tail + "\n\n"

    def payload(self, choice: Any, usage: dict | None = None) -> dict[str, Any]:
        payload = {"id": self.request_id, "object": self.obj, "created": self.created, "model": self.model,
                   "choices": [choice] if choice else []}  # fmt: skip
        if usage is not None:
            payload["usage"] = usage
        return payload

    def event(self, choice: dict | None, usage: dict | None = None) -> str:
        return f"data: {json.dumps(self.payload(choice, usage))}\n\n"

    def token_event(self, text: str, finish_reason: str | None) -> str:
        """The event for one output chunk: `text` (chat: as the delta's content, none when empty) and
        `finish_reason`; the same bytes as `event` of that choice."""
        finish = json.dumps(finish_reason)
        if self.chat:
            delta = f'{{"content": {json.dumps(text)}}}' if text else "{}"
            choice = f'{{"index": 0, "delta": {delta}, "finish_reason": {finish}, "logprobs": null}}'
        else:
            choice = (
                f'{{"index": 0, "text": {json.dumps(text)}, "finish_reason": {finish}, "logprobs": null}}'
            )
        return self._head + choice + self._tail


async def sse_events(stream: AsyncIterator[dict[str, Any]], request_id: str, model: str, chat: bool,
                     prompt_tokens: int, include_usage: bool, metrics: IngressMetrics,
                     t0: float) -> AsyncIterator[str]:  # fmt: skip
    """The completion as server-sent events; a failure mid-stream ends it with an error event."""
    events = SseEvents(request_id, model, chat)
    completion_tokens = 0
    first_token_at = None
    try:
        if chat:
            yield events.event(
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            )
        async for chunk in stream:
            n = len(chunk.get("token_ids", []))
            if n and first_token_at is None:
                first_token_at = time.perf_counter()
                metrics.ttft(first_token_at - t0)
            completion_tokens += n
            yield events.token_event(chunk.get("text", ""), chunk.get("finish_reason"))
        if include_usage:
            yield events.event(None, oai.usage(prompt_tokens, completion_tokens))
        if first_token_at is not None and completion_tokens > 1:
            metrics.tpot((time.perf_counter() - first_token_at) / (completion_tokens - 1))
        yield "data: [DONE]\n\n"
    except RequestError as exc:
        yield f"data: {rejected(exc).body.decode()}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        logger.exception("stream %s failed", request_id)
        yield f"data: {json.dumps(oai.error_body(failure_message(exc, 'mid-stream'), 503))}\n\n"
