"""The ingress's view of rank stats without Ray or engines: stats riding on a rank's output batches
replace that rank's poll, idle ranks are still polled, and a dead engine or rank is noticed either way."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import deployments.app as app_module
from deployments.app import DPServer


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

        return call()


class _Rank:
    """Stands in for a DPRank actor handle: get_stats.remote() and output_stream."""

    def __init__(self, rank: int, batches: list | None = None) -> None:
        self.rank = rank
        self.get_stats = _Method(lambda: {"rank": rank, "running": 1, "waiting": 0, "ready": True})
        self.batches = batches or []
        self.output_stream = self

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


def _server(ranks: list[_Rank]) -> Any:
    """A DPServer with its group state set by hand (its __init__ would start real ranks)."""
    server = object.__new__(DPServer.func_or_class)
    n = len(ranks)
    server.actors = ranks
    server.generation = 1
    server.stats = {r: {} for r in range(n)}
    server.missed = {r: 0 for r in range(n)}
    server._stats_at = {r: 0.0 for r in range(n)}
    server._gauges_at = {r: 0.0 for r in range(n)}
    server._inboxes = {}
    server._metrics = _Metrics()
    server._ready = asyncio.Event()
    server._ready.set()
    server.recoveries_started: list[str] = []
    server._start_recovery = server.recoveries_started.append
    return server


def test_stats_on_output_batches_reach_the_router_and_gauges_at_the_poll_rate() -> None:
    server = _server([_Rank(0), _Rank(1)])
    for step in range(5):
        server._take_stats(0, 1, {"running": step, "waiting": 0})
    assert server.stats[0] == {"running": 4, "waiting": 0}
    assert server._stats_at[0] > 0 and server._stats_at[1] == 0.0
    assert len(server._metrics.gauges) == 1  # five batches within one poll period: one gauge update
    server._take_stats(0, 0, {"running": 99})  # an old group's stream: ignored
    assert server.stats[0]["running"] == 4
    server._take_stats(1, 1, {"errored": True})
    assert server.recoveries_started == ["rank 1's engine died"]


def test_pump_takes_stats_and_delivers_chunks() -> None:
    async def main() -> None:
        inbox: asyncio.Queue = asyncio.Queue()
        rank = _Rank(
            0, batches=[([("req-1", {"text": "a", "token_ids": [5]})], {"running": 3, "waiting": 1})]
        )
        server = _server([rank])
        server._inboxes["req-1"] = (0, 1, inbox)
        pump = asyncio.create_task(server._pump(0, rank, 1))
        chunk = await asyncio.wait_for(inbox.get(), 5)
        pump.cancel()
        assert chunk == {"text": "a", "token_ids": [5]}
        assert server.stats[0] == {"running": 3, "waiting": 1}

    asyncio.run(main())


def test_only_ranks_without_recent_output_are_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "STATS_POLL_S", 0.05)

    async def main() -> None:
        ranks = [_Rank(0), _Rank(1)]
        server = _server(ranks)
        poller = asyncio.create_task(server._poll_stats())
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # rank 0 streams output (with stats) all the while
            server._take_stats(0, 1, {"running": 8, "waiting": 0})
            await asyncio.sleep(0.01)
        poller.cancel()
        assert ranks[0].get_stats.calls == 0
        assert ranks[1].get_stats.calls >= 3
        assert server.stats[1]["running"] == 1

    asyncio.run(main())


def test_a_rank_that_stops_answering_is_given_up_after_missed_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "STATS_POLL_S", 0.01)

    async def main() -> None:
        ranks = [_Rank(0)]

        def hung():
            raise TimeoutError("no answer")

        ranks[0].get_stats = _Method(hung)
        server = _server(ranks)
        poller = asyncio.create_task(server._poll_stats())
        deadline = time.monotonic() + 5
        while not server.recoveries_started and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        poller.cancel()
        assert server.recoveries_started == [
            f"rank 0 stopped answering for {app_module.DEAD_AFTER_MISSED_POLLS} polls"
        ]

    asyncio.run(main())
