"""The SSE events of a streamed completion (deployments/responses.py): the per-chunk fast path gives
the same bytes as encoding the whole payload."""

import asyncio
import json

import pytest

from deployments.responses import SseEvents, sse_events

TEXTS = ["", " hello", 'quote " and \\ backslash', "line\nbreak\ttab", "ünïcødé ✓ 😀", "\x00\x1f", "\ud800"]
FINISHES = [None, "length", "stop", "abort"]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("model", ["dpserve-tiny-moe", 'odd "model" \x00choice\x00'])
def test_token_event_is_the_whole_payload_encoded(chat: bool, model: str) -> None:
    events = SseEvents("cmpl-abc", model, chat)
    for text in TEXTS:
        for finish in FINISHES:
            if chat:
                choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish,
                          "logprobs": None}  # fmt: skip
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            assert events.token_event(text, finish) == events.event(choice)
            body = json.loads(events.token_event(text, finish).removeprefix("data: "))
            assert body["model"] == model and body["choices"] == [choice]


class _Metrics:
    def __init__(self) -> None:
        self.ttfts: list[float] = []
        self.tpots: list[float] = []

    def ttft(self, seconds: float) -> None:
        self.ttfts.append(seconds)

    def tpot(self, seconds: float) -> None:
        self.tpots.append(seconds)


@pytest.mark.parametrize("chat", [False, True])
def test_sse_events_stream(chat: bool) -> None:
    chunks = [{"text": "a", "token_ids": [1], "finish_reason": None},
              {"text": "b\"c", "token_ids": [2, 3], "finish_reason": "length"}]  # fmt: skip

    async def stream():
        for chunk in chunks:
            yield chunk

    async def collect() -> list[str]:
        metrics = _Metrics()
        out = [e async for e in sse_events(stream(), "cmpl-1", "m", chat, 5, True, metrics, 0.0)]
        assert len(metrics.ttfts) == 1 and len(metrics.tpots) == 1
        return out

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    if chat:
        assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        bodies = bodies[1:]
        assert [b["choices"][0]["delta"]["content"] for b in bodies[:2]] == ["a", 'b"c']
    else:
        assert [b["choices"][0]["text"] for b in bodies[:2]] == ["a", 'b"c']
    assert [b["choices"][0]["finish_reason"] for b in bodies[:2]] == [None, "length"]
    assert bodies[2]["choices"] == [] and bodies[2]["usage"]["completion_tokens"] == 3
    assert {b["id"] for b in bodies} == {"cmpl-1"}
