"""Hostile requests beside a live stream, through the real serving app (2 DP ranks of the tiny model,
EP and balance on: this folder's app): each gets a 4xx with OpenAI's error body, the DP group
is never re-formed (its generation stays), and the streams beside them complete with every token.

Each generated request is a valid one with at least one hostile change: sampling-parameter edge cases
(empty, huge and non-Unicode stop strings; extreme integers; min_tokens above max_tokens or above the
room the prompt leaves), lone surrogates in prompts and chat content, token ids outside the vocabulary,
wrong types and unsupported OpenAI fields. Some are refused in the ingress, some only on a rank (after
tokenizing): both must end the request alone.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.deployments.openai_app.shared_app import MAX_MODEL_LEN
from tests.helpers import TINY_MODEL_NAME, app_status

pytestmark = pytest.mark.slow

MODEL = TINY_MODEL_NAME
VOCAB = 2048  # the tiny model's vocabulary
STREAM_TOKENS = 64
# min_tokens from here on exceeds the room a chat request's prompt leaves: the base chat prompt takes 24
# tokens, no hostile change makes a valid one shorter than 8.
ROOM = MAX_MODEL_LEN - 8
HUGE = [2**31, 2**32 + 1, 2**63, 2**64, 2**70, -(2**63), -(2**70)]


def _encode(body: dict[str, Any]) -> bytes:
    # ensure_ascii escapes lone surrogates as \udXXX, which JSON allows and Python decodes back to them.
    return json.dumps(body, ensure_ascii=True).encode()


# ---- hostile changes: each alone makes a valid request invalid --------------------------------------
surrogate = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
text_with_surrogate = st.tuples(st.text(max_size=8), surrogate, st.text(max_size=8)).map("".join)

common_changes = st.one_of(
    st.builds(lambda s: {"stop": s}, st.sampled_from(["", [""], ["ok", ""], "s" * 5000, ["a"] * 17])),
    st.builds(lambda s: {"stop": s}, text_with_surrogate),
    st.builds(lambda s: {"stop": [s]}, st.one_of(st.integers(), st.none())),
    st.builds(lambda k, m: {"max_tokens": m, "min_tokens": m + k}, st.integers(1, 2**20), st.integers(1, 64)),
    st.builds(lambda v: {"max_tokens": v}, st.sampled_from([0, -1, MAX_MODEL_LEN, *HUGE])),
    st.builds(lambda v: {"min_tokens": v}, st.sampled_from([-1, MAX_MODEL_LEN, *HUGE])),
    st.builds(lambda v: {"top_k": v}, st.sampled_from([-2, *HUGE])),
    st.builds(lambda v: {"seed": v}, st.sampled_from([-1, 2**63, 2**70, -(2**70)])),
    st.builds(lambda v: {"n": v}, st.sampled_from([0, 2, 2**40])),
    st.builds(lambda v: {"best_of": v}, st.sampled_from([0, 2, 2**40])),
    st.builds(lambda v: {"temperature": v}, st.sampled_from([-1.0, 2.5, 1e308, -1e308])),
    st.builds(lambda v: {"top_p": v}, st.sampled_from([0.0, -0.5, 1.5])),
    st.builds(lambda v: {"min_p": v}, st.sampled_from([-0.1, 1.1])),
    st.builds(lambda v: {"presence_penalty": v}, st.sampled_from([-2.5, 2.5, 1e300])),
    st.builds(lambda v: {"repetition_penalty": v}, st.sampled_from([0.0, -1.0, 11.0])),
    st.builds(lambda v: {"max_tokens": v}, st.sampled_from(["many", [4], {"n": 4}, 4.5])),
    st.builds(lambda v: {"temperature": v}, st.sampled_from(["hot", [1.0], {"t": 1}])),
    st.builds(lambda v: {"stream": v}, st.sampled_from(["maybe", [True], {"on": 1}])),
    st.builds(lambda v: {"model": v}, st.sampled_from([None, 7, ["m"]])),
    st.sampled_from(
        [
            {"logprobs": 3},
            {"logit_bias": {"5": 10}},
            {"best_of": 3},
            {"prompt_logprobs": 1},
            {"response_format": {"type": "json_object"}},
            {"structured_outputs": {"regex": "a+"}},
        ]
    ),  # fmt: skip
)

completion_changes = st.one_of(
    common_changes,
    st.builds(lambda p: {"prompt": p}, text_with_surrogate),
    st.builds(lambda p: {"prompt": [p]}, text_with_surrogate),
    st.builds(lambda t: {"prompt": [5, t]}, st.sampled_from([VOCAB, VOCAB + 1, 10**6, 2**31 - 1])),
    st.builds(lambda t: {"prompt": [t]}, st.sampled_from([-1, 2**31, 2**70])),
    st.just({"prompt": list(range(1, MAX_MODEL_LEN + 1))}),  # longer than the context
    st.just({"prompt": "word " * 2000}),  # tokens beyond the context, found by the rank
    st.builds(lambda v: {"prompt": v}, st.sampled_from(["", [], [[]], None, 3.5, {"text": "x"}, [[1, "a"]], ["a", "b"]])),
    st.sampled_from([{"suffix": "end"}, {"echo": True, "stream": True}, {"echo": True, "prompt": [1, 2]}]),
)  # fmt: skip

chat_changes = st.one_of(
    common_changes,
    st.builds(lambda c: {"messages": [{"role": "user", "content": c}]}, text_with_surrogate),
    st.builds(lambda c: {"messages": [{"role": "user", "content": [{"type": "text", "text": c}]}]}, text_with_surrogate),
    st.builds(lambda c: {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": c}]},
              text_with_surrogate),
    st.builds(lambda m: {"min_tokens": m}, st.integers(ROOM, MAX_MODEL_LEN - 1)),
    st.builds(lambda v: {"messages": v}, st.sampled_from([[], "hi", [{"role": "wizard", "content": "x"}], [{"content": "x"}],
                                                         [{"role": "user", "content": [{"type": "image_url"}]}],
                                                         [{"role": "user", "content": 5}]])),
    st.sampled_from([{"logprobs": True}, {"top_logprobs": 2}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
                     {"tool_choice": "required"}, {"functions": [{"name": "f"}]}]),
)  # fmt: skip


def _hostile(chat: bool, changes: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 4}
    if chat:
        body["messages"] = [{"role": "user", "content": "Say something"}]
    else:
        body["prompt"] = "Once upon a time"
    for change in changes:
        body |= change
    if (
        chat
        and body.get("max_tokens") == 4
        and type(body.get("min_tokens")) is int
        and body["min_tokens"] >= ROOM
    ):
        # Above the room the prompt leaves: with no max_tokens that room is the limit, known only on
        # the rank after tokenizing.
        del body["max_tokens"]
    return body


class _LiveStreams:
    """Streams requests back to back in a thread while the hostile requests run; each must end with
    [DONE] and every token it asked for."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.results: list[tuple[int, str]] = []  # (tokens, how it ended) per stream
        self.stop = threading.Event()
        self.streaming = threading.Event()  # the first stream has its first token
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, client: httpx.Client, i: int) -> tuple[int, str]:
        body = {"model": MODEL, "prompt": f"stream {i} runs beside the fuzz", "max_tokens": STREAM_TOKENS,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        tokens, end = 0, "truncated"
        with client.stream("POST", f"{self.base_url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return 0, f"http {r.status_code}"
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    end = "done"
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return tokens, f"error: {event['error']['message']}"
                    self.streaming.set()
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
        return tokens, end

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            i = 0
            while not self.stop.is_set():
                self.results.append(self._one(client, i))
                i += 1

    def __enter__(self) -> _LiveStreams:
        self.thread.start()
        assert self.streaming.wait(120), self.results
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(180)


def test_hostile_requests_beside_a_stream_are_4xx_and_never_reform_the_group(base_url):
    before = app_status(base_url)
    assert before["live_ranks"] == [0, 1] and not before["recovering"]
    client = httpx.Client(timeout=60)
    seen: dict[int, int] = {}

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(chat=st.booleans(), data=st.data())
    # The inputs that used to re-form the group, always tried first.
    @example(chat=False, data=[{"stop": ""}])
    @example(chat=False, data=[{"min_tokens": 9, "max_tokens": 3}])
    @example(chat=False, data=[{"prompt": "a\ud800b"}])
    @example(chat=True, data=[{"messages": [{"role": "user", "content": "hi \udfff"}]}])
    @example(chat=True, data=[{"min_tokens": ROOM}])
    @example(chat=False, data=[{"prompt": [5, VOCAB]}])
    def check(chat: bool, data: Any) -> None:
        if isinstance(data, list):  # an @example's changes
            changes = data
        else:
            strategy = chat_changes if chat else completion_changes
            changes = data.draw(st.lists(strategy, min_size=1, max_size=3), label="changes")
        body = _hostile(chat, changes)
        route = "/v1/chat/completions" if chat else "/v1/completions"
        r = client.post(
            f"{base_url}{route}", content=_encode(body), headers={"content-type": "application/json"}
        )
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert 400 <= r.status_code < 500, (
            body if len(str(body)) < 600 else str(body)[:600],
            r.status_code,
            r.text[:300],
        )
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert "Traceback" not in err["message"] and "ray::" not in err["message"]

    t0 = time.monotonic()
    with _LiveStreams(base_url) as live:
        check()
    elapsed = time.monotonic() - t0
    after = app_status(base_url)
    print(f"\nhostile requests: {sum(seen.values())} sent in {elapsed:.0f} s, statuses {seen}; "
          f"{len(live.results)} streams beside them: {live.results}")  # fmt: skip
    assert after["group_generation"] == before["group_generation"], after
    assert after["recoveries"] == before["recoveries"] and not after["recovering"]
    assert live.results and all(r == (STREAM_TOKENS, "done") for r in live.results), live.results
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200


def test_oversized_bodies_and_prompts_are_refused_before_a_rank(base_url):
    before = app_status(base_url)["group_generation"]
    with httpx.Client(timeout=60) as client:
        url = f"{base_url}/v1/completions"
        too_big = client.post(url, content=b'{"model": "' + b"x" * (9 << 20) + b'"}',
                              headers={"content-type": "application/json"})  # fmt: skip
        assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]
        long_prompt = client.post(url, json={"model": MODEL, "prompt": "ab" * 1_000_001, "max_tokens": 1})
        assert long_prompt.status_code == 400 and long_prompt.json()["error"]["param"] == "prompt"
        ok = client.post(url, json={"model": MODEL, "prompt": "still serving", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert app_status(base_url)["group_generation"] == before
