"""End to end: 2 DP ranks (Ray actors, real vLLM engines) with balance scheduling on.

Each engine core (a subprocess of its rank actor) joins Ray and reports to the named coordinator at
every lockstep step; with max_num_seqs=2 and more requests than slots the gate must close at times,
and every request must still complete.
"""

from __future__ import annotations

import asyncio

import pytest

from deployments.config import EngineSettings
from deployments.rank_group import start_rank_group, stop_rank_group
from tests.helpers import collect_stream

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


def test_two_ranks_keep_serving_across_coordinator_kill(ray_local, tiny_model_dir) -> None:
    """The coordinator actor is killed while both ranks serve (Ray restarts it): every request still
    completes, the ranks report to the restarted actor (new ZMQ address) and get its decisions, and
    the policy set at run time before the kill is still the one in force."""
    import time

    name = "test_e2e_balance_restart"
    settings = EngineSettings(
        model=tiny_model_dir,
        data_parallel_size=2,
        max_model_len=256,
        max_num_seqs=2,
        balance={"policy": "any_at_cap", "timeout_s": 10.0, "coordinator_name": name, "dead_after_s": 0.5},
    )
    sampling = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}

    async def batch(actors, tag: str):
        prompts = [f"restart {tag} prompt number {i} goes here" for i in range(12)]
        return await asyncio.gather(
            *[collect_stream(actors[0 if i % 3 else 1], p, sampling) for i, p in enumerate(prompts)]
        )

    async def go():
        import ray

        actors, pg, _ = await start_rank_group(settings)
        coord = ray.get_actor(name, namespace="dpserve")
        try:
            await batch(actors, "warm")
            # A run-time policy change: the restarted actor must keep it (not revert to any_at_cap).
            await coord.set_policy.remote("cadence", {"interval": 2})
            before = await coord.get_stats.remote()
            running = asyncio.ensure_future(batch(actors, "across"))
            await asyncio.sleep(1.0)  # both ranks busy (12 requests, 2 slots each)
            t_kill = time.monotonic()
            ray.kill(coord, no_restart=False)
            # Time until the restarted actor serves reports again (ranks found the new address).
            # Ranks report only while they step: requests keep coming until they reconnect.
            keep: list[asyncio.Future] = []
            while True:
                if running.done() and all(f.done() for f in keep):
                    keep.append(asyncio.ensure_future(batch(actors, f"wait{len(keep)}")))
                try:
                    s = await asyncio.wait_for(coord.get_stats.remote(), 5)
                    if s["zmq_served"] > 0 and s["zmq_address"] != before["zmq_address"]:
                        break
                except Exception:
                    pass
                assert time.monotonic() - t_kill < 60, "ranks never reached the restarted coordinator"
                await asyncio.sleep(0.05)
            resumed_s = time.monotonic() - t_kill
            across = await running
            for outs in await asyncio.gather(*keep):
                across = across + outs
            after_batch = await batch(actors, "after")
            after = await coord.get_stats.remote()
        finally:
            await stop_rank_group(actors, pg)
            from scheduler.coordinator import release_coordinator

            release_coordinator(name, "dpserve")
        return before, across, after_batch, after, resumed_s

    before, across, after_batch, after, resumed_s = asyncio.run(go())
    print(f"coordinator restart: ranks reporting to the new actor {resumed_s:.2f} s after the kill")
    for outs in (across, after_batch):
        assert all(len(o["token_ids"]) == sampling["max_tokens"] for o in outs)
        assert all(o["finish_reason"] == "length" for o in outs)
    assert after["zmq_address"] != before["zmq_address"]
    assert (after["policy"], after["params"]) == ("cadence", {"interval": 2}), after
    # The restarted actor has both ranks' reports (their cumulative call counters went on) and has
    # closed the gate for them (cadence 2: every odd step): real decisions again.
    assert sorted(after["ranks"]) == [0, 1], after
    assert all(after["ranks"][r]["client_calls"] > before["ranks"][r]["client_calls"] for r in (0, 1))
    assert after["closed_steps"] >= 1, after
