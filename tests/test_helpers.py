"""`tests.helpers.request_completion` against stub servers (httpx.MockTransport): no engine, no Ray."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests.helpers import TINY_MODEL_NAME, request_completion

URL = "http://stub"


def _sse(*events: dict[str, Any] | str) -> bytes:
    """An SSE body: each event as a `data:` line (a str as it is, e.g. "[DONE]")."""
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _chunk(text: str = "x") -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text}]}


def _usage(tokens: int) -> dict[str, Any]:
    return {"choices": [], "usage": {"completion_tokens": tokens}}


def _run(handler: Callable[[httpx.Request], httpx.Response], *args: Any, **kwargs: Any) -> str:
    async def go() -> str:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await request_completion(client, URL, *args, **kwargs)

    return asyncio.run(go())


def _reply(status: int, body: Any = None, content: bytes | None = None) -> Callable[..., httpx.Response]:
    return lambda request: (
        httpx.Response(status, json=body) if content is None else httpx.Response(status, content=content)
    )


def test_the_request_it_sends() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"usage": {"completion_tokens": 5}})

    assert _run(handler, 7, 5, False, api_key="sk-1") == "ok"
    assert _run(handler, 8, 5, False, prompt="request 8", stream_usage=False) == "ok"
    first, second = seen
    assert first.method == "POST" and str(first.url) == f"{URL}/v1/completions"
    assert first.headers["authorization"] == "Bearer sk-1"
    assert json.loads(first.content) == {"model": TINY_MODEL_NAME, "prompt": "request 7 about experts",
                                         "max_tokens": 5, "ignore_eos": True, "stream": False,
                                         "stream_options": None}  # fmt: skip
    assert "authorization" not in second.headers
    assert json.loads(second.content) == {"model": TINY_MODEL_NAME, "prompt": "request 8", "max_tokens": 5,
                                          "ignore_eos": True, "stream": False}  # fmt: skip


def test_a_stream_asks_for_usage_unless_told_not_to() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, content=_sse(_chunk(), _usage(3), "[DONE]"))

    assert _run(handler, 0, 3, True) == "ok"
    assert _run(handler, 0, 3, True, stream_usage=False) == "ok"
    assert bodies[0]["stream_options"] == {"include_usage": True}
    assert "stream_options" not in bodies[1]


@pytest.mark.parametrize(
    ("stream_usage", "events", "expected"),
    [
        (True, [_chunk(), _usage(4), "[DONE]"], "ok"),
        (True, [_chunk(), _usage(3), "[DONE]"], "wrong_count"),
        (True, [_chunk(), "[DONE]"], "wrong_count"),  # no usage: the count is unknown
        (True, [_chunk(), _usage(4)], "truncated"),  # no [DONE]
        (False, [_chunk(), "[DONE]"], "ok"),  # count not asked for, not checked
        (False, [_chunk()], "truncated"),
    ],
)
def test_stream_outcomes(stream_usage: bool, events: list[Any], expected: str) -> None:
    assert _run(_reply(200, content=_sse(*events)), 0, 4, True, stream_usage=stream_usage) == expected


def test_non_stream_outcomes() -> None:
    assert _run(_reply(200, {"usage": {"completion_tokens": 4}}), 0, 4, False) == "ok"
    assert _run(_reply(200, {"usage": {"completion_tokens": 2}}), 0, 4, False) == "wrong_count"


@pytest.mark.parametrize("stream", [False, True])
def test_refusals_by_message_or_by_status(stream: bool) -> None:
    clear = _reply(503, {"error": {"message": "draining", "type": "unavailable", "code": 503}})
    unclear = _reply(500, {"error": {"message": ""}})
    assert _run(clear, 0, 4, stream) == "clear_error"
    assert _run(unclear, 0, 4, stream) == "unclear_error"
    assert _run(clear, 0, 4, stream, errors="status") == "http_503"
    assert _run(unclear, 0, 4, stream, errors="status") == "http_500"


def test_error_events_by_message_or_by_status() -> None:
    with_message = _sse(_chunk(), {"error": {"message": "rank lost"}}, "[DONE]")
    without = _sse(_chunk(), {"error": {}}, "[DONE]")
    assert _run(_reply(200, content=with_message), 0, 4, True) == "clear_error"
    assert _run(_reply(200, content=without), 0, 4, True) == "unclear_error"
    assert _run(_reply(200, content=with_message), 0, 4, True, errors="status") == "error_event"
    assert _run(_reply(200, content=without), 0, 4, True, errors="status") == "error_event"


class _ErrorThenTimeout(httpx.AsyncByteStream):
    """A stream that sends one chunk and an error event, then times out."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _sse(_chunk(), {"error": {"message": "rank lost"}})
        raise httpx.ReadTimeout("stalled")


def test_message_mode_stops_at_the_first_error_event_status_mode_reads_on() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_ErrorThenTimeout())

    assert _run(handler, 0, 4, True) == "clear_error"
    assert _run(handler, 0, 4, True, errors="status") == "hung"


def test_started_is_set_at_the_first_chunk_with_choices() -> None:
    async def go(events: list[Any]) -> bool:
        started = asyncio.Event()
        transport = httpx.MockTransport(_reply(200, content=_sse(*events)))
        async with httpx.AsyncClient(transport=transport) as client:
            await request_completion(client, URL, 0, 1, True, started)
        return started.is_set()

    assert asyncio.run(go([_chunk(), _usage(1), "[DONE]"]))
    assert not asyncio.run(go([_usage(1), "[DONE]"]))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ReadTimeout("slow"), "hung"),
        (httpx.ConnectTimeout("slow"), "hung"),
        (httpx.ConnectError("refused"), "connection_error:ConnectError"),
        (httpx.RemoteProtocolError("cut"), "connection_error:RemoteProtocolError"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_transport_errors(exc: Exception, expected: str, stream: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    assert _run(handler, 0, 4, stream) == expected


def test_process_gone_is_false_while_it_runs_and_true_once_it_ended() -> None:
    import subprocess
    import sys
    import time

    from tests.helpers import process_gone

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not process_gone(child.pid)
        child.kill()
        deadline = 600  # polls of 0.05 s: the kill lands long before
        while not process_gone(child.pid) and deadline:  # a zombie until reaped: gone already
            deadline -= 1
            time.sleep(0.05)
        assert process_gone(child.pid)
    finally:
        child.kill()
        child.wait()
    assert process_gone(child.pid)
