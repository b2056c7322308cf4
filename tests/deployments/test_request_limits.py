"""The ingress's request checks and limits, without engines: what an OpenAI request may ask for (400
naming the field), the body size limit (413), validation errors as 400 with OpenAI's error body, the
bound on requests waiting for a re-formed group, and the rank's tokenization off its event loop."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from deployments import openai_protocol as oai
from deployments.body_limit import BodyLimitMiddleware
from deployments.config import DPServeConfig
from deployments.group_supervisor import RankGroupSupervisor, RecoveryBacklogFull
from deployments.request_errors import RankFailure, RequestRejected, from_reply

MODEL = "m"
MAX_MODEL_LEN = 64
MAX_CHARS = 100


def _check(body: dict[str, Any]) -> None:
    cls = oai.ChatCompletionRequest if "messages" in body else oai.CompletionRequest
    cls.model_validate({"model": MODEL} | body).check(MAX_MODEL_LEN, MAX_CHARS)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "stop": ""}, "stop"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop"),
        ({"prompt": "x", "stop": "s" * (oai.MAX_STOP_CHARS + 1)}, "stop"),
        ({"prompt": "x", "stop": "\ud800"}, "stop"),
        ({"prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "min_tokens": 9, "max_completion_tokens": 3}, "min_tokens"),
        ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "min_tokens": MAX_MODEL_LEN}, "min_tokens"),
        ({"prompt": "a\udfffb"}, "prompt"),
        ({"messages": [{"role": "user", "content": "\ud83d"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        ({"prompt": "x" * (MAX_CHARS + 1)}, "prompt"),
        ({"messages": [{"role": "user", "content": "x" * 60}, {"role": "user", "content": "y" * 60}]}, "messages"),
        ({"prompt": list(range(MAX_MODEL_LEN))}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [1, 2**40]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "logprobs": 1}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
        ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "echo": True, "stream": True}, "echo"),
        ({"prompt": [1, 2], "echo": True}, "echo"),
        ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, "functions"),
    ],
)  # fmt: skip
def test_what_vllm_or_dpserve_would_refuse_is_a_400_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(RequestRejected) as info:
        _check(body)
    assert info.value.status == 400 and info.value.param == param, info.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "stop": ["a"], "min_tokens": 3, "max_tokens": 3},
        {"prompt": "x" * MAX_CHARS, "n": 1, "best_of": 1, "logprobs": None, "echo": True},
        {"prompt": [1, 2, 3], "suffix": None, "logit_bias": {}, "user": "u", "some_unknown_field": {"a": 1}},
        {"prompt": "x", "n": None, "stream": None, "echo": None, "temperature": None, "stop": None},
        {"messages": [{"role": "user", "content": "x"}], "logprobs": False, "tools": [], "tool_choice": "none",
         "response_format": {"type": "text"}, "parallel_tool_calls": True},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "max_completion_tokens": 8},
    ],
)  # fmt: skip
def test_defaults_of_unsupported_fields_and_unknown_fields_are_accepted(body: dict) -> None:
    _check(body)  # unknown fields are ignored, as vLLM's server does


def test_sampling_parameters_pass_to_the_rank_unchanged() -> None:
    req = oai.CompletionRequest.model_validate(
        {"model": MODEL, "prompt": "x", "stop": "s", "min_tokens": 2, "top_k": 5, "unknown": 1}
    )
    assert req.sampling(req.max_tokens) == {"max_tokens": 16, "ignore_eos": False, "top_k": 5, "min_tokens": 2,
                                            "stop": ["s"]}  # fmt: skip


# ---- HTTP: body limit and validation errors --------------------------------------------------------


def _app() -> FastAPI:
    from deployments.app import _http_error, _validation_error

    app = FastAPI()
    app.add_middleware(BodyLimitMiddleware)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)

    @app.post("/v1/completions")
    async def completions(body: oai.CompletionRequest) -> dict:
        return {"prompt_chars": len(body.prompt)}

    return app


def _post(content: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers_ = {"content-type": "application/json"} | (headers or {})
            return await client.post("/v1/completions", content=content, headers=headers_)

    return asyncio.run(main())


@pytest.fixture
def small_body_limit():
    BodyLimitMiddleware.max_bytes = 2048
    yield 2048
    BodyLimitMiddleware.max_bytes = DPServeConfig().serving.max_body_bytes


def _body(prompt_chars: int) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "x" * prompt_chars}).encode()


def test_bodies_over_the_limit_are_413_announced_or_chunked(small_body_limit: int) -> None:
    assert _post(_body(1000)).json() == {"prompt_chars": 1000}
    announced = _post(_body(5000))
    chunks = [_body(5000)[i : i + 512] for i in range(0, 5100, 512)]

    async def chunked():
        for c in chunks:
            yield c

    streamed = _post(chunked())  # no Content-Length: counted as it is read
    for r in (announced, streamed):
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert str(small_body_limit) in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": 9}, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_k": 2**40}, "top_k"),
        ({"model": MODEL}, "prompt"),
    ],
)
def test_validation_errors_are_400_with_openais_error_body(body: dict, param: str) -> None:
    r = _post(json.dumps(body).encode(), {"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_error_bodies_with_lone_surrogates_still_encode() -> None:
    from deployments.responses import error

    r = error("bad \ud800 value", 400, "stop")
    assert json.loads(r.body)["error"]["message"] == "bad \\ud800 value"


# ---- waiting for a re-formed group -------------------------------------------------------------------


def test_requests_waiting_for_recovery_are_bounded() -> None:
    config = DPServeConfig.from_args({"serving": {"max_waiting_during_recovery": 3, "recovery_wait_s": 5}})

    async def scenario():
        group = RankGroupSupervisor(config, object())
        group.ready.clear()  # a re-formation in progress
        waiters = [asyncio.ensure_future(group.wait_ready()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert group.waiting_for_recovery == 3
        with pytest.raises(RecoveryBacklogFull):
            await group.wait_ready()
        group.ready.set()
        await asyncio.gather(*waiters)
        assert group.waiting_for_recovery == 0
        await group.wait_ready()  # a serving group takes any number

    asyncio.run(scenario())


# ---- the rank: tokenization off its event loop, errors as replies -----------------------------------


class _SlowTokenizer:
    def __init__(self, seconds: float, fail: BaseException | None = None) -> None:
        self.seconds, self.fail = seconds, fail
        self.ran: tuple[float, float] | None = None  # (start, end) of the last encode

    def encode(self, text: str, **_: Any) -> list[int]:
        start = time.monotonic()
        time.sleep(self.seconds)  # blocks its thread, as a long prompt's tokenizing does
        self.ran = (start, time.monotonic())
        if self.fail is not None:
            raise self.fail
        return [1] * len(text)

    def __len__(self) -> int:
        return 100


class _Engine:
    errored = False


@pytest.fixture(scope="module")
def rank():
    from deployments.rank import DPRank

    r = DPRank({"data_parallel_size": 1}, 0, platform_name="cpu")
    r.engine, r._max_model_len = _Engine(), MAX_MODEL_LEN
    yield r
    r.engine = None
    r.shutdown()


def test_tokenizing_does_not_stall_the_ranks_event_loop(rank) -> None:
    rank.tokenizer = tokenizer = _SlowTokenizer(0.5)

    async def scenario() -> tuple[list[float], dict]:
        ticks: list[float] = []

        async def ticker():
            while True:
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        task = asyncio.ensure_future(ticker())
        _, ids, params = await rank._prepare("r1", "hello", {"max_tokens": 4}, None)
        task.cancel()
        return ticks, {"ids": ids, "max_tokens": params.max_tokens}

    ticks, got = asyncio.run(scenario())
    assert got == {"ids": [1] * 5, "max_tokens": 4}
    start, end = tokenizer.ran
    # The loop ran on while the tokenizer held its thread (on the loop itself, no tick could fall there).
    assert sum(start < t < end for t in ticks) >= 2, (start, end, ticks)


@pytest.mark.parametrize(
    "tokenizer_error, sampling, param",
    [
        (TypeError("TextEncodeInput must be Union[TextInputSequence, ...]"), {}, None),
        (None, {"stop": [""]}, None),
        (None, {"min_tokens": 9, "max_tokens": 3}, None),
        (None, {"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ],
    ids=["tokenizer-type-error", "empty-stop", "min-over-max", "over-context"],
)
def test_a_request_the_rank_cannot_take_is_an_error_reply(rank, tokenizer_error, sampling, param) -> None:
    rank.tokenizer = _SlowTokenizer(0, tokenizer_error)
    reply = asyncio.run(rank.submit("r2", "hello", sampling))
    assert reply["status"] == 400 and not reply.get("rank_failed"), reply
    if param is not None:
        assert reply["param"] == param


def test_a_dead_engine_is_a_rank_failure_reply(rank) -> None:
    rank.tokenizer = _SlowTokenizer(0, ValueError("whatever"))
    rank.engine.errored = True
    try:
        reply = asyncio.run(rank.submit("r3", "hello", {}))
    finally:
        rank.engine.errored = False
    assert reply["rank_failed"] and reply["status"] == 503
    assert isinstance(from_reply(reply), RankFailure)


class _FailingEngine(_Engine):
    """An engine whose generate raises `exc` for the request (after taking it, as vLLM's processor does)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.aborted: list[str] = []

    async def generate(self, prompt: Any, params: Any, request_id: str):
        raise self.exc
        yield  # pragma: no cover

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _engine_error(exc: BaseException) -> dict:
    from deployments.rank import DPRank

    r = DPRank({"data_parallel_size": 1}, 0, platform_name="cpu")
    r.engine, r._max_model_len, r.tokenizer = _FailingEngine(exc), MAX_MODEL_LEN, _SlowTokenizer(0)

    async def scenario() -> dict:
        assert "error" not in await r.submit("r5", "hello", {"max_tokens": 4})
        batch = await asyncio.wait_for(r.outbox.next_batch(), 10)
        return dict(batch)["r5"]

    try:
        return asyncio.run(scenario())
    finally:
        r.engine = None
        r.shutdown()


def test_an_error_the_engine_raises_for_one_request_is_its_error_chunk() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    rejected = _engine_error(VLLMValidationError("prompt too long for the engine", parameter="prompt"))
    assert rejected == {
        "error": "prompt too long for the engine (parameter=prompt)",
        "status": 400,
        "param": "prompt",
    }
    dead = _engine_error(EngineDeadError())
    assert dead["rank_failed"] and dead["status"] == 503
