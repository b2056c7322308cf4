"""End to end: 2 DP ranks (Ray actors, real vLLM engines) with balance scheduling on.

Each engine core (a subprocess of its rank actor) joins Ray and reports to the named coordinator at
every lockstep step; with max_num_seqs=2 and more requests than slots the gate must close at times,
and every request must still complete.
"""

from __future__ import annotations

import asyncio

import pytest

from deployments.engine_config import EngineSettings
from deployments.rank_group import collect_stream, start_rank_group, stop_rank_group

pytestmark = pytest.mark.slow

SAMPLING = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


def test_two_ranks_balance_all_complete_and_gate_closes(ray_local, tiny_model_dir) -> None:
    name = "test_e2e_balance"
    settings = EngineSettings(
        model=tiny_model_dir,
        data_parallel_size=2,
        max_model_len=256,
        max_num_seqs=2,
        balance={"policy": "any_at_cap", "timeout_s": 10.0, "coordinator_name": name, "wait_ms": 20.0},
    )

    async def go():
        actors, pg, _ = await start_rank_group(settings)
        try:
            # Skewed: rank 0 gets 8 requests, rank 1 gets 4 — both over their 2 slots.
            prompts = [f"balance prompt number {i} goes here" for i in range(12)]
            outs = await asyncio.gather(
                *[collect_stream(actors[0 if i % 3 else 1], p, SAMPLING) for i, p in enumerate(prompts)]
            )
            import ray

            coord = ray.get_actor(name, namespace="dpserve")
            stats = await coord.get_stats.remote()
            scores = await coord.get_load_scores.remote()
        finally:
            await stop_rank_group(actors, pg)
            from scheduler.coordinator import release_coordinator

            release_coordinator(name, "dpserve")
        return outs, stats, scores

    outs, stats, scores = asyncio.run(go())
    assert all(len(o["token_ids"]) == SAMPLING["max_tokens"] for o in outs)
    assert all(o["finish_reason"] == "length" for o in outs)
    assert sorted(stats["ranks"]) == [0, 1], stats
    assert all(r["client_calls"] > 0 for r in stats["ranks"].values()), stats
    assert stats["decided_steps"] > 0
    assert stats["closed_steps"] >= 1, stats
    assert set(scores) <= {0, 1}
    # Both engine cores count the same lockstep steps (same wave; steps within one of each other).
    r0, r1 = stats["ranks"][0], stats["ranks"][1]
    assert r0["wave"] == r1["wave"] and abs(r0["step"] - r1["step"]) <= 1, stats
    print("coordinator stats:", stats)
