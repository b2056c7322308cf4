"""Online EPLB on the 2-rank CPU cluster (DP=2 + EP, one Ray actor per rank, real vLLM engines).

Greedy float32 outputs of a fixed prompt set must be token-identical to the plain model before,
during and after rebalances that move experts between ranks, and no request may fail meanwhile.
One rank-group start for the whole module (a start costs 45-90 s here).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from deployments.config import EngineSettings
from deployments.rank_group import (
    get_eplb_actor,
    start_eplb,
    start_rank_group,
    stop_rank_group,
    wait_group_idle,
)
from eplb.messages import PlanMessage
from eplb.stats import logical_from_slots
from tests.helpers import PROMPTS, collect_stream, generate_on_ranks, greedy, random_placement

pytestmark = pytest.mark.slow

SAMPLING = greedy(24)
NUM_REDUNDANT = 4


async def _generate(actors) -> list[list[int]]:
    return await generate_on_ranks(actors, PROMPTS, SAMPLING)


async def _wait_committed(actors, plan_id: int, timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        states = await asyncio.gather(*[a.eplb_call.remote("eplb_status") for a in actors])
        outcomes = [next((h for h in s["history"] if h["plan_id"] == plan_id), None) for s in states]
        if all(o is not None for o in outcomes):
            return outcomes
        if time.monotonic() > deadline:
            raise TimeoutError(f"plan {plan_id} not finished on every rank: {states}")
        # Keep the group stepping (an idle DP group does not step, so nothing could commit).
        await collect_stream(actors[0], "keep stepping", {"max_tokens": 2, "temperature": 0.0})


@pytest.fixture(scope="module")
def group(ray_local, tiny_model_dir):
    # setup_on_start False: the reference below comes from the plain model (no tables installed);
    # autostart False: the first test pushes its own plans, the second starts the actor's cycles.
    eplb = {
        "enabled": True,
        "num_redundant": NUM_REDUNDANT,
        "policy": "deepseek",
        "window_steps": 20,
        "interval_s": 0.5,
        "threshold": 0.99,
        "window_samples": 4,
        "setup_on_start": False,
        "autostart": False,
    }
    settings = EngineSettings(
        model=tiny_model_dir,
        data_parallel_size=2,
        enable_expert_parallel=True,
        max_model_len=256,
        max_num_seqs=8,
        eplb=eplb,
    )
    loop = asyncio.new_event_loop()
    actors, pg, _ = loop.run_until_complete(start_rank_group(settings))
    reference = loop.run_until_complete(_generate(actors))  # plain vLLM: tables not installed yet
    setup = loop.run_until_complete(_setup_during_a_wave_with_one_rank_late(actors))
    loop.run_until_complete(start_eplb(actors, settings))  # set up already (idempotent); the actor idle
    yield loop, actors, reference, setup
    loop.run_until_complete(stop_rank_group(actors, pg))
    loop.close()


async def _setup_during_a_wave_with_one_rank_late(actors) -> dict:
    """EPLB set-up asked for while a DP wave runs (a long request on rank 0; rank 1 steps dummy
    batches) and reaching rank 1 a second after rank 0: the set-up's process group is a collective,
    and one started between steps while the peer is inside a step's all-reduce deadlocks both. The
    rank group waits for the wave to end (wait_group_idle) before any rank starts it."""
    long = asyncio.ensure_future(
        collect_stream(actors[0], "a long one", {"max_tokens": 96, "temperature": 0.0, "ignore_eos": True})
    )
    await asyncio.sleep(0.5)
    wave_running = not long.done()
    steps = await wait_group_idle(actors)
    long_done_at_idle = long.done()
    first = asyncio.ensure_future(actors[0].eplb_setup.remote())
    await asyncio.sleep(1.0)  # rank 1 late
    statuses = await asyncio.wait_for(asyncio.gather(first, actors[1].eplb_setup.remote()), timeout=120)
    out = await long
    return {"wave_running": wave_running, "long_done_at_idle": long_done_at_idle, "steps": steps,
            "statuses": statuses, "long_tokens": len(out["token_ids"])}  # fmt: skip


def test_setup_waits_for_the_wave_to_end_and_survives_a_late_rank(group):
    _, actors, reference, setup = group
    assert setup["wave_running"], "the long request ended before set-up was asked for: nothing was tested"
    assert setup["long_done_at_idle"], setup  # the wait covered the whole wave
    assert setup["long_tokens"] == 96
    assert min(setup["steps"]) >= 96  # every rank stepped the wave, rank 1 with dummy batches
    assert [s["ep_rank"] for s in setup["statuses"]] == [0, 1]


def test_rank_side_apply_keeps_outputs_identical(group):
    loop, actors, reference, _ = group

    async def go():
        states = await asyncio.gather(*[a.eplb_call.remote("eplb_status") for a in actors])
        assert [s["ep_rank"] for s in states] == [0, 1] and states[0]["slots_per_rank"] == 10
        assert await _generate(actors) == reference  # 16 experts in 20 slots

        rng = np.random.default_rng(1)
        old = np.asarray(await actors[0].eplb_call.remote("eplb_placement"))
        assert (np.asarray(await actors[1].eplb_call.remote("eplb_placement")) == old).all()
        # Per physical slot, where each rank's router sent the tokens (the placement in force since
        # set-up): a logical expert's slots sum to its count, and the replicas (the last 2 of each
        # rank's 10 slots) ran tokens. The ranks' takes may be a dummy step apart: each checked alone.
        for taken in await asyncio.gather(*[a.eplb_call.remote("eplb_take_load") for a in actors]):
            counts, physical = np.asarray(taken["counts"]), np.asarray(taken["physical"])
            assert physical.shape == (4, 20) and counts.sum() > 0
            assert (logical_from_slots(physical, old, 16) == counts).all()
            assert physical[:, [8, 9, 18, 19]].sum() > 0
        # Plan 4 stages with fit_step: as many one-slot pieces per step as the agreed step time hides.
        fit = {"fit_step": True, "slots_per_step": 1}
        for plan_id, blocking, transfer in ((1, False, {}), (2, True, {}), (3, False, {}), (4, False, fit)):
            new = random_placement(rng, old.shape[0], 16, NUM_REDUNDANT)
            msg = PlanMessage(plan_id, old, new, 2, blocking=blocking, transfer=transfer).to_dict()
            # Requests in flight while the plan is staged, agreed and committed.
            during = asyncio.ensure_future(_generate(actors))
            await asyncio.sleep(0.3)
            res = await asyncio.gather(*[a.eplb_call.remote("eplb_stage", msg) for a in actors])
            assert all(r["accepted"] for r in res), res
            outcomes = await _wait_committed(actors, plan_id)
            assert [o["outcome"] for o in outcomes] == ["committed", "committed"], outcomes
            if transfer.get("fit_step"):
                # Every rank posted the same pieces, several in some step: fewer steps than pieces.
                assert len({(o["pieces_posted"], len(o["inline_steps"])) for o in outcomes}) == 1, outcomes
                assert len(outcomes[0]["inline_steps"]) - 1 < outcomes[0]["pieces_posted"], outcomes
            assert await during == reference
            for a in actors:
                assert (np.asarray(await a.eplb_call.remote("eplb_placement")) == new).all()
            print(f"\nplan {plan_id} blocking={blocking} transfer={transfer}: " + "; ".join(
                f"rank {r}: stage {o['stage_ms']:.1f} ms, commit {o['commit_ms_total']:.2f} ms over "
                f"{o['commit_steps']} steps (max {o['commit_ms_max_step']:.2f}), waited {o['steps_waited']} steps, "
                f"{o['remote_bytes'] / 1e6:.2f} MB received" for r, o in enumerate(outcomes)))  # fmt: skip
            assert await _generate(actors) == reference
            old = new

        # A transfer that fails on one rank leaves the old placement in force on every rank.
        await actors[1].eplb_call.remote("eplb_fail_next_transfer")
        new = random_placement(rng, old.shape[0], 16, NUM_REDUNDANT)
        msg = PlanMessage(5, old, new, 2).to_dict()
        during = asyncio.ensure_future(_generate(actors))
        res = await asyncio.gather(*[a.eplb_call.remote("eplb_stage", msg) for a in actors])
        assert all(r["accepted"] for r in res), res
        outcomes = await _wait_committed(actors, 5)
        assert [o["outcome"] for o in outcomes] == ["failed", "failed"], outcomes
        assert "injected" in outcomes[1]["error"]
        assert await during == reference
        for a in actors:
            assert (np.asarray(await a.eplb_call.remote("eplb_placement")) == old).all()
            assert (await a.eplb_call.remote("eplb_status"))["pending"] is None

        # A malformed plan is rejected on every rank before anything moves.
        bad = old.copy()
        bad[1, :] = 3
        bad_msg = PlanMessage(9, old, bad, 2).to_dict()
        res = await asyncio.gather(*[a.eplb_call.remote("eplb_stage", bad_msg) for a in actors])
        assert not any(r["accepted"] for r in res)
        assert await _generate(actors) == reference

    loop.run_until_complete(go())


def test_actor_driven_rebalance_under_traffic(group):
    """The EPLB actor pulls the real windows, plans, and commits while requests keep flowing."""
    loop, actors, reference, _ = group
    controller = get_eplb_actor(actors)
    assert controller is not None

    async def go():
        before = np.asarray(await actors[0].eplb_call.remote("eplb_placement"))
        await controller.initialize.remote()  # the first test changed the placement
        await controller.start.remote()
        deadline = time.monotonic() + 180
        waves = 0
        while (await controller.get_state.remote())["rebalances"] < 1:
            assert time.monotonic() < deadline, await controller.get_state.remote()
            assert await _generate(actors) == reference  # every wave, also those overlapping a rebalance
            waves += 1
        await controller.stop.remote()  # joins the cycling thread: a second plan may have landed meanwhile
        state = await controller.get_state.remote()
        after = np.asarray(await actors[0].eplb_call.remote("eplb_placement"))
        assert (after == np.asarray(state["placement"])).all() and not (after == before).all()
        assert (np.asarray(await actors[1].eplb_call.remote("eplb_placement")) == after).all()
        committed = [e for e in state["history"] if e["event"] == "committed"]
        assert committed and committed[-1]["remote_bytes"] > 0  # experts moved between the ranks
        assert await _generate(actors) == reference
        print(
            f"\nactor rebalance after {waves} waves: {committed[-1]}; record {state['record_us_per_call']:.1f} us/call"
        )
        assert state["last_error"] is None

    loop.run_until_complete(go())


def test_policy_that_raises_is_skipped_on_real_ranks(group):
    """A policy that raises while planning (hierarchical with 16 experts in 3 groups) on the real ranks:
    logged, counted, skipped, the actor keeps cycling, nothing is pushed, outputs stay identical."""
    from eplb.actor import eplb_actor_class

    loop, actors, reference, _ = group

    async def go():
        before = [await a.eplb_call.remote("eplb_placement") for a in actors]
        histories = [len((await a.eplb_call.remote("eplb_status"))["history"]) for a in actors]
        cfg = {"policy": "deepseek_hierarchical", "params": {"num_groups": 3}, "num_redundant": NUM_REDUNDANT,
               "window_steps": 20, "interval_s": 0.3, "threshold": 0.99}  # fmt: skip
        ctl = eplb_actor_class().remote(actors, cfg)
        await ctl.start.remote()
        deadline = time.monotonic() + 120
        try:
            while (await ctl.get_state.remote())["policy_failures"] < 2:  # it keeps going after a failure
                assert time.monotonic() < deadline, await ctl.get_state.remote()
                assert await _generate(actors) == reference
            state = await ctl.get_state.remote()
        finally:
            await ctl.stop.remote()
        assert state["alive"] and state["rebalances"] == 0 and state["plan_failures"] == 0
        assert "deepseek_hierarchical" in state["last_error"] and "ValueError" in state["last_error"]
        failed = [e for e in state["history"] if e["event"] == "policy_failed"]
        assert len(failed) >= 2 and "Traceback" in failed[0]["trace"]
        for a, b, n in zip(actors, before, histories, strict=True):
            assert await a.eplb_call.remote("eplb_placement") == b  # nothing was pushed
            assert len((await a.eplb_call.remote("eplb_status"))["history"]) == n
        assert await _generate(actors) == reference
        print(f"\npolicy raising on real ranks: {state['policy_failures']} failures over {state['cycles']} cycles, "
              f"last error: {state['last_error']}")  # fmt: skip

    loop.run_until_complete(go())
