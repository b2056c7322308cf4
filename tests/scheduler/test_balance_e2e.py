"""End to end: 2 DP ranks (Ray actors, real vLLM engines) with balance scheduling on.

Each engine core (a subprocess of its rank actor) joins Ray and reports to the named coordinator at
every lockstep step; with max_num_seqs=2 and more requests than slots the gate must close at times,
and every request must still complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from deployments.config import EngineSettings
from deployments.rank_group import start_rank_group, stop_rank_group
from scheduler.step_trace import IDX
from tests.helpers import collect_stream

pytestmark = pytest.mark.slow

SAMPLING = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
GROUP = "test_e2e_balance"  # the coordinator of the module's shared group


@pytest.fixture(scope="module")
def group(ray_local, tiny_model_dir) -> Iterator[tuple[list[Any], Any]]:
    """One 2-rank group with balance on (any_at_cap, 2 slots per rank), shared by the tests that
    only switch the policy at run time; yields (rank actors, coordinator)."""
    import ray

    from scheduler.coordinator import release_coordinator

    settings = EngineSettings(
        model=tiny_model_dir,
        data_parallel_size=2,
        max_model_len=256,
        max_num_seqs=2,
        balance={"policy": "any_at_cap", "timeout_s": 10.0, "coordinator_name": GROUP, "wait_ms": 20.0},
    )
    actors, pg, _ = asyncio.run(start_rank_group(settings))
    try:
        yield actors, ray.get_actor(GROUP, namespace="dpserve")
    finally:
        asyncio.run(stop_rank_group(actors, pg))
        release_coordinator(GROUP, "dpserve")


def test_two_ranks_balance_all_complete_and_gate_closes(group) -> None:
    actors, coord = group

    async def go():
        await coord.set_policy.remote("any_at_cap", {})
        # Skewed: rank 0 gets 8 requests, rank 1 gets 4 — both over their 2 slots.
        prompts = [f"balance prompt number {i} goes here" for i in range(12)]
        outs = await asyncio.gather(
            *[collect_stream(actors[0 if i % 3 else 1], p, SAMPLING) for i, p in enumerate(prompts)]
        )
        return outs, await coord.get_stats.remote(), await coord.get_load_scores.remote()

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


def _admission_waits(rows: list[Any], max_num_seqs: int) -> list[tuple[int, int]]:
    """(steps waited, admitting step) for each admission that followed steps on which the rank had a
    waiting request and a free slot: counted from the first such step of the streak, in lockstep steps."""
    waits, since, prev = [], None, None
    for row in sorted(rows, key=lambda r: r[IDX["seq"]]):
        wave, step = row[IDX["wave"]], row[IDX["step"]]
        if prev is not None and prev != (wave, step - 1):
            since = None  # a new wave (or a gap) starts the count again
        ready = row[IDX["waiting"]] > 0 and row[IDX["running"]] < max_num_seqs
        if row[IDX["new_reqs"]] > 0:
            if since is not None:
                waits.append((step - since, step))
            since = None
        elif ready:
            since = step if since is None else since
        else:
            since = None
        prev = (wave, step)
    return waits


def test_bounded_hold_admits_within_the_hold_bound(group) -> None:
    """bounded_hold where the gate would otherwise stay closed: rank 1 runs two long requests (its
    slots full, nothing waiting), rank 0 has more requests than slots. The quorum (both ranks ready)
    is never reached and the group runs at least half its slots (min_occupancy 0.5), so only the
    hold bound opens the gate: no request of rank 0 waits past it, read from rank 0's step trace.
    Rank 0's surplus makes the group queue for slots, so queue_hold_factor 1 keeps the bound at
    max_hold_steps (the queue extension is a pure rule, covered by tests/scheduler/test_policy.py)."""
    actors, coord = group
    hold, lead = 6, 1  # lead: the scheduler's default (BalanceConfig)

    async def go():
        await coord.set_policy.remote(
            "bounded_hold",
            {"max_hold_steps": hold, "quorum": 1.0, "min_occupancy": 0.5, "queue_hold_factor": 1},
        )
        long = [
            asyncio.ensure_future(
                collect_stream(actors[1], f"long request {i}", {**SAMPLING, "max_tokens": 160})
            )
            for i in range(2)
        ]
        for _ in range(1000):  # until rank 1 runs both (its slots full, nothing waiting)
            # Rank 1 appears in the stats with its first report (none yet when this test runs first).
            if (await coord.get_stats.remote())["ranks"].get(1, {}).get("running") == 2:
                break
            await asyncio.sleep(0.02)
        seq = [(await a.balance_stats.remote())["trace_seq"] for a in actors]
        # Different lengths, so rank 0's slots free up at different steps.
        short = [
            collect_stream(actors[0], f"short request {i} here", {**SAMPLING, "max_tokens": 4 + i % 5})
            for i in range(10)
        ]
        outs = await asyncio.gather(*short)
        stats = [await a.balance_stats.remote(seq[i]) for i, a in enumerate(actors)]
        return outs + await asyncio.gather(*long), stats, await coord.get_decisions.remote()

    outs, (rank0, rank1), decisions = asyncio.run(go())
    assert all(o["finish_reason"] == "length" for o in outs)
    assert all(r[IDX["waiting"]] == 0 for r in rank1["trace"]), "rank 1 must never be ready to admit"
    waits = _admission_waits(rank0["trace"], max_num_seqs=2)
    held = [r for r in rank0["trace"] if not r[IDX["admit"]] and r[IDX["waiting"]] > 0]
    print(f"rank 0: admissions after a wait (steps, at step): {waits}; held steps: {len(held)}")
    assert held, "the gate never held: the scenario did not keep it closed"
    # While rank 0 had requests, the coordinator opened the gate on deadline steps only (rule 2):
    # neither the quorum nor the saturation guard could open it.
    phase = {(r[IDX["wave"]], r[IDX["step"]]) for r in rank0["trace"]}
    opened = sorted(key[1] for key, admit in decisions.items() if admit and key in phase)
    assert opened and all(step % hold == 0 for step in opened), opened
    assert any(w > 0 for w, _ in waits), waits
    # The bound (scheduler/policy.py): at most hold - 1 closed steps once the coordinator's snapshot
    # shows the rank ready (rule 2). The snapshot lags the trace by `lead` steps (a decision is frozen
    # `lead` steps ahead), one more when the other rank's report freezes that decision before this
    # rank's report of the same step lands, and one more for a request that just arrived (the report
    # at the lockstep point precedes the engine reading its input queue).
    assert max(w for w, _ in waits) <= hold + lead + 1, waits


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
