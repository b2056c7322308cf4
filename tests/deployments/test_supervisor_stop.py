"""Stopping the ingress's rank group while a re-formation is under way (Serve replacing an ingress stuck
in recovery calls it from the replica's `__del__`): the re-formation is cancelled and its start cleans
up before `stop` returns, so no group is formed after the ingress stopped. No Ray: the group's start
and stop are stand-ins; tests/deployments/test_ingress_health_replacement.py runs the real thing."""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.config import DPServeConfig
from deployments.group_supervisor import RankGroupSupervisor


class _Metrics:
    def rank_gauges(self, rank: int, stats: dict[str, Any]) -> None:
        pass

    def internal_frame_dropped(self, channel: str, reason: str) -> None:
        pass


def test_stop_cancels_a_re_formation_under_way_and_its_start_cleans_up() -> None:
    events: list[str] = []
    starting = asyncio.Event()

    async def start_group(config: DPServeConfig, generation: int) -> tuple[list[Any], Any, list[dict]]:
        events.append(f"start g{generation}")
        starting.set()
        try:
            await asyncio.Event().wait()  # waits for bundles that never come
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # the real start's shielded clean-up takes a while
            events.append(f"start g{generation} cancelled, cleaned up")
            raise
        return [], None, []

    async def stop_group(actors: list[Any], pg: Any, timeout_s: float = 30.0) -> None:
        events.append(f"stop {pg}")

    async def scenario() -> None:
        config = DPServeConfig.from_args({"engine": {"data_parallel_size": 2}})
        group = RankGroupSupervisor(config, _Metrics(), start_group, stop_group)
        group.adopt(["rank0", "rank1"], "pg1", [{}, {}])  # generation 1 serves
        group.start_recovery("rank 1 actor died")
        await asyncio.wait_for(starting.wait(), 5)
        await asyncio.wait_for(group.stop(), 5)
        assert group._recovery.done()
        await asyncio.sleep(0.1)  # nothing runs on after stop
        assert events == ["stop pg1", "start g2", "start g2 cancelled, cleaned up", "stop pg1"], events
        assert group.health_problem() is None  # a cancelled re-formation is not a dead task

    asyncio.run(scenario())
