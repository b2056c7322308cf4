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


async def sse_events(stream: AsyncIterator[dict[str, Any]], request_id: str, model: str, chat: bool,
                     prompt_tokens: int, include_usage: bool, metrics: IngressMetrics,
                     t0: float) -> AsyncIterator[str]:  # fmt: skip
    """The completion as server-sent events; a failure mid-stream ends it with an error event."""
    created = oai.now()
    obj = "chat.completion.chunk" if chat else "text_completion"
    completion_tokens = 0
    first_token_at = None

    def event(choice: dict | None, usage: dict | None = None) -> str:
        payload = {"id": request_id, "object": obj, "created": created, "model": model,
                   "choices": [choice] if choice else []}  # fmt: skip
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for chunk in stream:
            n = len(chunk.get("token_ids", []))
            if n and first_token_at is None:
                first_token_at = time.perf_counter()
                metrics.ttft(first_token_at - t0)
            completion_tokens += n
            finish = chunk.get("finish_reason")
            text = chunk.get("text", "")
            if chat:
                delta = {"content": text} if text else {}
                yield event({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None})
            else:
                yield event({"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        if include_usage:
            yield event(None, oai.usage(prompt_tokens, completion_tokens))
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
