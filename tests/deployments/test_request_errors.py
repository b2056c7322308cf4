"""Request-level errors stay with their request, without engines: what a rank classifies as the
request's own error and what as its loss, the plain-data replies that carry them to the ingress, and
the ingress's handling of both (no re-formation for a request's error; one retry, with its first
chunk, after a lost rank)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from deployments.config import DPServeConfig
from deployments.group_supervisor import RankGroupSupervisor
from deployments.rank_outbox import RankOutbox
from deployments.request_errors import (
    MAX_MESSAGE_CHARS,
    RankFailure,
    RequestError,
    RequestRejected,
    classify,
    error_reply,
    from_reply,
)


def _vllm_validation_error(**params: Any) -> BaseException:
    from vllm.sampling_params import SamplingParams

    try:
        SamplingParams(**params)
    except Exception as exc:
        return exc
    raise AssertionError(f"SamplingParams accepted {params}")


@pytest.mark.parametrize(
    "params, param",
    [
        ({"stop": [""]}, None),
        ({"min_tokens": 5, "max_tokens": 2}, None),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
    ids=["empty-stop", "min-over-max", "zero-max-tokens", "negative-temperature", "zero-top-p"],
)
def test_vllm_validation_errors_are_the_requests_400(params: dict, param: str | None) -> None:
    exc = _vllm_validation_error(**params)
    assert not isinstance(exc, ValueError)  # why the old `except (TypeError, ValueError)` missed it
    err = classify(exc, engine_alive=True)
    assert type(err) is RequestRejected and err.status == 400
    if param is not None:
        assert err.param == param


def test_errors_while_a_request_runs_are_classified_by_their_cause() -> None:
    from vllm.exceptions import GracefulHTTPError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    def wrapped(cause: BaseException) -> BaseException:
        try:
            raise EngineGenerateError() from cause
        except EngineGenerateError as exc:
            return exc

    assert classify(wrapped(ValueError("bad")), True).status == 400
    internal = classify(wrapped(RuntimeError("boom")), True)
    assert type(internal) is RequestError and internal.status == 500
    busy = classify(GracefulHTTPError("queue full", 503), True)
    assert type(busy) is RequestError and busy.status == 503
    # The tokenizer's error for a lone surrogate, a template's error: the request's own.
    assert classify(TypeError("TextEncodeInput must be Union[...]"), True).status == 400
    assert classify(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), True).status == 400
    # Only a dead engine is the rank's failure, whatever was raised.
    assert isinstance(classify(EngineDeadError(), True), RankFailure)
    assert isinstance(classify(ValueError("bad"), engine_alive=False), RankFailure)
    assert isinstance(classify(RankFailure("gone"), True), RankFailure)


def test_replies_round_trip_as_plain_data_and_encode_on_the_wire() -> None:
    hostile = "\ud800" + "x" * 5000
    for exc in (RequestRejected(hostile, param="stop"), RequestError("boom", 500), RuntimeError(hostile)):
        reply = error_reply(exc)
        msgspec.msgpack.encode(reply)  # a lone surrogate in a message would break the rank's channel
        assert len(reply["error"]) <= MAX_MESSAGE_CHARS + 30
        back = from_reply(reply)
        if isinstance(exc, RequestError):
            assert type(back) is type(exc) and back.status == exc.status and back.param == exc.param
        else:
            assert isinstance(back, RankFailure) and reply["rank_failed"]


def test_outbox_sends_a_requests_error_as_a_chunk_and_keeps_serving() -> None:
    async def scenario() -> list:
        outbox = RankOutbox(0, lambda: {"rank": 0})

        async def rejected():
            raise RequestRejected("min_tokens must be <= max_tokens", param="min_tokens")
            yield  # pragma: no cover

        async def lost():
            raise RankFailure("the engine is gone")
            yield  # pragma: no cover

        async def fine():
            yield {"text": "ok", "token_ids": [1], "finish_reason": "length"}

        for rid, source in (("a", rejected()), ("b", lost()), ("c", fine())):
            outbox.start(rid, source)
        await asyncio.sleep(0.05)
        return await outbox.next_batch()

    batch = dict(asyncio.run(scenario()))
    assert batch["a"] == {"error": "min_tokens must be <= max_tokens", "status": 400, "param": "min_tokens"}
    assert batch["b"]["rank_failed"] and batch["b"]["status"] == 503
    assert batch["c"]["text"] == "ok"


# ---- the ingress's request path (DPServer._stream) with fake ranks -----------------------------------


class _Metrics:
    def __init__(self) -> None:
        self.done: list[tuple[int, str]] = []

    def rank_gauges(self, rank: int, stats: dict) -> None:
        pass

    def request_done(self, rank: int, status: str) -> None:
        self.done.append((rank, status))


class _Call:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args: Any):
        return self.fn(*args)

    def options(self, **_: Any) -> _Call:
        return self


class _FakeRank:
    """A rank actor handle: `submit` answers with `reply(request_id)` (or raises it) and then delivers
    `chunks` through the ingress's channel; its output stream stays open."""

    def __init__(self, group: RankGroupSupervisor, rank: int, reply: Any, chunks: list[dict]) -> None:
        self.submits = 0

        async def submit(request_id, *_: Any):
            self.submits += 1
            result = reply(request_id) if callable(reply) else reply
            if isinstance(result, BaseException):
                raise result
            if "error" not in result:
                loop = asyncio.get_running_loop()
                for chunk in chunks:
                    loop.call_soon(group.channel.deliver, rank, group.generation, [(request_id, chunk)], {})
            return result

        async def forever():
            await asyncio.Event().wait()
            yield  # pragma: no cover

        self.submit = _Call(submit)
        self.output_stream = _Call(lambda: forever())
        self.abort = _Call(lambda *_: None)
        self.get_stats = _Call(lambda: asyncio.sleep(0, {"ready": True}))


def _server(generations: list[list[tuple[Any, list[dict]]]]):
    """A DPServer without Serve or engines: group generation g (1-based) has fake ranks built from
    generations[g - 1] (each rank: its submit reply and its chunks)."""
    from deployments.app import DPServer

    config = DPServeConfig.from_args(
        {"engine": {"data_parallel_size": 1}, "serving": {"output_transport": "ray", "recovery_wait_s": 5}}
    )
    metrics = _Metrics()
    formed: list[list[_FakeRank]] = []

    async def start_group(config: DPServeConfig, generation: int):
        ranks = [
            _FakeRank(group, r, reply, chunks)
            for r, (reply, chunks) in enumerate(generations[generation - 1])
        ]
        formed.append(ranks)
        return ranks, None, [{"max_model_len": 64}]

    async def stop_group(*_: Any, **__: Any) -> None:
        pass

    group = RankGroupSupervisor(config, metrics, start_group, stop_group)
    cls = DPServer.func_or_class
    server = object.__new__(cls)
    server.config, server.metrics, server.group = config, metrics, group
    return server, group, formed


async def _collect(server, request_id: str = "cmpl-1") -> list[dict]:
    await server.group.form()
    out = [c async for c in server._stream("hi", {"max_tokens": 2}, None, request_id)]
    server.group.channel.stop()
    return out


DONE = [
    {"text": "a", "token_ids": [7], "finish_reason": None},
    {"text": "b", "token_ids": [8], "finish_reason": "length"},
]


def test_a_rank_lost_at_submit_is_retried_and_the_retry_yields_the_first_chunk() -> None:
    from ray.exceptions import RayActorError

    server, group, formed = _server([[(RayActorError(), [])], [({"prompt_tokens": 3, "rank": 0}, DONE)]])
    out = asyncio.run(_collect(server))
    assert out[0] == {"prompt_tokens": 3, "rank": 0}  # what _respond reads prompt_tokens from
    assert "".join(c.get("text", "") for c in out[1:]) == "ab"
    assert group.generation == 2 and len(formed) == 2 and formed[1][0].submits == 1


@pytest.mark.parametrize("where", ["submit", "chunk"])
def test_a_requests_own_error_ends_it_alone(where: str) -> None:
    reply = error_reply(RequestRejected("stop cannot contain an empty string", param="stop"))
    first = reply if where == "submit" else {"prompt_tokens": 3, "rank": 0}
    chunks = [] if where == "submit" else [reply]
    server, group, formed = _server([[(first, chunks)]])
    with pytest.raises(RequestRejected) as info:
        asyncio.run(_collect(server))
    assert info.value.status == 400 and info.value.param == "stop"
    assert group.generation == 1 and group._recovery is None  # the group was not re-formed
    assert server.metrics.done == [(0, "rejected")]


def test_an_unexpected_error_is_the_requests_500_not_a_reformation() -> None:
    server, group, _ = _server([[(KeyError("surprise"), [])]])
    with pytest.raises(RequestError) as info:
        asyncio.run(_collect(server))
    assert info.value.status == 500
    assert group.generation == 1 and group._recovery is None


def test_a_rank_failure_chunk_after_tokens_reforms_the_group_and_is_reported() -> None:
    chunks = [DONE[0], error_reply(RuntimeError("engine core died"))]
    server, group, formed = _server(
        [[({"prompt_tokens": 3, "rank": 0}, chunks)], [({"prompt_tokens": 3}, DONE)]]
    )

    async def scenario():
        await group.form()
        got = []
        with pytest.raises(RankFailure):
            async for chunk in server._stream("hi", {}, None, "cmpl-2"):
                got.append(chunk)
        await asyncio.wait_for(group.ready.wait(), 5)  # re-formed
        group.channel.stop()
        return got

    got = asyncio.run(scenario())
    assert [c.get("text") for c in got] == [None, "a"]  # no retry after a token: no duplicate text
    assert group.generation == 2


def test_a_requests_own_busy_answer_says_when_to_retry() -> None:
    from deployments.responses import rejected

    busy = rejected(RequestError("The engine is currently busy", 503))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    bad = rejected(RequestRejected("stop cannot contain an empty string", param="stop"))
    assert bad.status_code == 400 and "retry-after" not in bad.headers
