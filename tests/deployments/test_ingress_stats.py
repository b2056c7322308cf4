"""The ingress's view of rank stats without Ray or engines: stats riding on a rank's output batches
replace that rank's poll, idle ranks are still polled, and a dead engine or rank is noticed either way."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

import deployments.group_supervisor as supervisor_module
from deployments.config import DPServeConfig
from deployments.group_supervisor import RankGroupSupervisor


class _Metrics:
    def __init__(self) -> None:
        self.gauges: list[tuple[int, dict]] = []

    def rank_gauges(self, rank: int, stats: dict[str, Any]) -> None:
        self.gauges.append((rank, stats))


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def remote(self, *args: Any):
        self.calls += 1

        async def call():
            return self.fn(*args)

        return self.fn(*args) if asyncio.iscoroutinefunction(self.fn) else call()


class _Rank:
    """Stands in for a DPRank actor handle: get_stats.remote() and output_stream."""

    def __init__(
        self,
        rank: int,
        batches: list | None = None,
        fail_after_s: float | None = None,
        reachable: bool = True,
    ) -> None:
        self.rank = rank
        self.get_stats = _Method(lambda: {"rank": rank, "running": 1, "waiting": 0, "ready": True})
        self.batches = batches or []
        self.output_stream = self
        self.push_outputs = _Method(self._push)
        self.fail_after_s = fail_after_s
        self.reachable = reachable

    async def _push(self, address: str) -> None:
        """DPRank.push_outputs' wire format over a real ZMQ socket; raises like a dead rank's call
        after `fail_after_s`."""
        import msgspec
        import zmq
        import zmq.asyncio

        if not self.reachable:  # like a firewalled port: nothing ever arrives
            await asyncio.Event().wait()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(address)
        try:
            for item in self.batches:
                await sock.send(item if isinstance(item, bytes) else msgspec.msgpack.encode(item))
            if self.fail_after_s is not None:
                await asyncio.sleep(self.fail_after_s)
                raise ConnectionError("rank actor died")
            await asyncio.Event().wait()
        finally:
            ctx.destroy(linger=0)

    def options(self, **_: Any) -> _Rank:
        return self

    def remote(self):
        batches = self.batches

        async def stream():
            for item in batches:

                async def ref(item=item):
                    return item

                yield ref()
            await asyncio.Event().wait()  # a live rank's stream stays open

        return stream()


def _server(ranks: list[_Rank], transport: str = "ray") -> Any:
    """The ingress's rank group over stand-in ranks, adopted as generation 1 (no real group starts)."""
    config = DPServeConfig.from_args(
        {"engine": {"data_parallel_size": len(ranks)}, "serving": {"output_transport": transport}}
    )
    server = RankGroupSupervisor(config, _Metrics())
    server.adopt(ranks, None, [{} for _ in ranks])
    server.recoveries_started: list[str] = []
    server.start_recovery = server.recoveries_started.append
    return server


def test_stats_on_output_batches_reach_the_router_and_gauges_at_the_poll_rate() -> None:
    server = _server([_Rank(0), _Rank(1)])
    for step in range(5):
        server.take_stats(0, 1, {"running": step, "waiting": 0})
    assert server.stats[0] == {"running": 4, "waiting": 0}
    assert server.stats_at[0] > 0 and server.stats_at[1] == 0.0
    assert len(server.metrics.gauges) == 1  # five batches within one poll period: one gauge update
    server.take_stats(0, 0, {"running": 99})  # an old group's stream: ignored
    assert server.stats[0]["running"] == 4
    server.take_stats(1, 1, {"errored": True})
    assert server.recoveries_started == ["rank 1's engine died"]


CHUNK = {"text": "a", "token_ids": [5]}


def _first_chunk(rank: _Rank, transport: str, connect_timeout_s: float | None = None) -> tuple[Any, Any]:
    """The first chunk for request req-1 that rank 0's pump delivers, and the server."""

    async def main() -> tuple[Any, Any]:
        inbox: asyncio.Queue = asyncio.Queue()
        server = _server([rank], transport)
        if connect_timeout_s is not None:
            server.channel.serving.output_connect_timeout_s = connect_timeout_s
        server.channel.inboxes["req-1"] = (0, 1, inbox)
        pump = asyncio.create_task(server.channel.pump(0, rank, 1))
        try:
            return await asyncio.wait_for(inbox.get(), 5), server
        finally:
            pump.cancel()

    return asyncio.run(main())


@pytest.mark.parametrize("transport", ["ray", "zmq"])
def test_pump_takes_stats_and_delivers_chunks(transport: str) -> None:
    chunk, server = _first_chunk(
        _Rank(0, batches=[([("req-1", CHUNK)], {"running": 3, "waiting": 1})]), transport
    )
    assert chunk == CHUNK
    assert server.stats[0] == {"running": 3, "waiting": 1}


def test_a_rank_whose_push_call_fails_ends_its_requests_and_reforms_the_group() -> None:
    async def main() -> None:
        inbox: asyncio.Queue = asyncio.Queue()
        rank = _Rank(0, batches=[([("req-1", CHUNK)], {"running": 1})], fail_after_s=0.1)
        server = _server([rank], "zmq")
        server.channel.inboxes["req-1"] = (0, 1, inbox)
        await asyncio.wait_for(server.channel.pump(0, rank, 1), 5)
        assert await inbox.get() == CHUNK
        assert isinstance(await inbox.get(), ConnectionError)
        assert server.recoveries_started == ["rank 0's output channel broke (ConnectionError)"]

    asyncio.run(main())


def test_an_unreachable_zmq_channel_falls_back_to_the_ray_stream() -> None:
    rank = _Rank(0, batches=[([("req-1", CHUNK)], {"running": 1})], reachable=False)
    chunk, server = _first_chunk(rank, "zmq", connect_timeout_s=0.2)
    assert chunk == CHUNK
    assert server.recoveries_started == []


def test_malformed_messages_on_the_zmq_channel_are_dropped() -> None:
    good = ([("req-1", CHUNK)], {"running": 1})
    rank = _Rank(0, batches=[b"not msgpack \xc1", msgspec.msgpack.encode([1, 2, 3]), good])
    chunk, server = _first_chunk(rank, "zmq")
    assert chunk == CHUNK
    assert server.recoveries_started == []


def test_output_transport_is_checked() -> None:
    with pytest.raises(ValueError, match="output_transport"):
        DPServeConfig.from_args({"serving": {"output_transport": "carrier-pigeon"}})


class _Clock:
    """The ingress's clock, moved by the test: what is due for a poll depends on this clock only,
    however slowly the machine runs the poller's loop."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def _until(cond, timeout_s: float = 30.0) -> None:
    """Yield to the poller until `cond()` holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "the poller stopped"
        await asyncio.sleep(0.001)


def test_only_ranks_without_recent_output_are_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(supervisor_module, "time", clock)

    async def main() -> None:
        ranks = [_Rank(0), _Rank(1)]
        server = _server(ranks)
        server.dispatched[1] = 1  # rank 1 has a request in flight but sends no output
        poller = asyncio.create_task(server.poll_stats())
        for _ in range(3):
            server.take_stats(0, 1, {"running": 8, "waiting": 0})  # rank 0's output carries stats
            polled = ranks[1].get_stats.calls
            clock.now += supervisor_module.STATS_POLL_S * 1.5  # rank 1 is due, rank 0 reported just now
            server.take_stats(0, 1, {"running": 8, "waiting": 0})
            # Polled, and its answer taken at this clock time (before the clock moves on).
            await _until(
                lambda polled=polled: ranks[1].get_stats.calls > polled and server.stats_at[1] == clock.now
            )
        poller.cancel()
        assert ranks[0].get_stats.calls == 0
        assert ranks[1].get_stats.calls >= 3
        assert server.stats[1]["running"] == 1

    asyncio.run(main())


def test_ranks_with_nothing_in_flight_are_polled_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(supervisor_module, "time", clock)
    busy_s, idle_s = supervisor_module.STATS_POLL_S, supervisor_module.IDLE_STATS_POLL_S

    async def main() -> None:
        ranks = [_Rank(0), _Rank(1)]
        server = _server(ranks)
        server.dispatched[0] = 2
        poller = asyncio.create_task(server.poll_stats())
        periods = int(2.5 * idle_s / busy_s)  # 2.5 idle poll periods
        for i in range(1, periods + 1):
            await _until(lambda i=i: ranks[0].get_stats.calls >= i and server.stats_at[0] == clock.now)
            clock.now += busy_s * 1.05  # a little over STATS_POLL_S: exactly one busy poll falls due
        poller.cancel()
        busy, idle = ranks[0].get_stats.calls, ranks[1].get_stats.calls
        assert busy == periods and idle == 3, (busy, idle)  # at the start, after 1 and 2 idle periods

    asyncio.run(main())


def test_a_rank_that_stops_answering_is_given_up_after_missed_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "STATS_POLL_S", 0.01)

    async def main() -> None:
        ranks = [_Rank(0)]

        def hung():
            raise TimeoutError("no answer")

        ranks[0].get_stats = _Method(hung)
        server = _server(ranks)
        poller = asyncio.create_task(server.poll_stats())
        await _until(lambda: server.recoveries_started)
        poller.cancel()
        assert server.recoveries_started == [
            f"rank 0 stopped answering for {supervisor_module.DEAD_AFTER_MISSED_POLLS} polls"
        ]

    asyncio.run(main())
