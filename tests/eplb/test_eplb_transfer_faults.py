"""EPLB staging when a plan reaches only some ranks, on the 2-rank CPU cluster (real engines, real gloo).

A rank that got a plan its peer never got must drop it after the plan's own timeout (or at once when
the plan is aborted), keep the old placement, and leave the transfer group usable: no p2p op may be
posted without its peer (a timed-out gloo wait closes the pair for good, failing every later plan).
One rank-group start for the module.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from deployments.config import EngineSettings
from deployments.rank_group import start_eplb, start_rank_group, stop_rank_group
from eplb.messages import PlanMessage
from tests.helpers import PROMPTS, collect_stream, generate_on_ranks, greedy, random_placement

pytestmark = pytest.mark.slow

SAMPLING = greedy(16)
NUM_REDUNDANT = 4


async def _generate(actors) -> list[list[int]]:
    return await generate_on_ranks(actors, PROMPTS[4:], SAMPLING)  # four prompts are enough here


async def _outcome(actors, rank: int, plan_id: int, timeout_s: float) -> dict:
    """Rank `rank`'s history entry for plan_id, keeping the group stepping meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        hist = (await actors[rank].eplb_call.remote("eplb_status"))["history"]
        h = next((h for h in hist if h["plan_id"] == plan_id), None)
        if h is not None:
            return h
        assert time.monotonic() < deadline, f"plan {plan_id} still pending on rank {rank} after {timeout_s} s"
        await collect_stream(actors[0], "keep stepping", {"max_tokens": 2, "temperature": 0.0})


@pytest.fixture(scope="module")
def group(ray_local, tiny_model_dir):
    eplb = {"enabled": True, "num_redundant": NUM_REDUNDANT, "setup_on_start": False, "autostart": False}
    settings = EngineSettings(model=tiny_model_dir, data_parallel_size=2, enable_expert_parallel=True,
                              max_model_len=256, max_num_seqs=8, eplb=eplb)  # fmt: skip
    loop = asyncio.new_event_loop()
    actors, pg, _ = loop.run_until_complete(start_rank_group(settings))
    reference = loop.run_until_complete(_generate(actors))  # the plain model
    loop.run_until_complete(start_eplb(actors, settings))
    yield loop, actors, reference
    loop.run_until_complete(stop_rank_group(actors, pg))
    loop.close()


def test_plan_missing_on_a_peer_times_out_or_aborts_and_the_group_stays_usable(group):
    loop, actors, reference = group

    async def go():
        rng = np.random.default_rng(7)
        old = np.asarray(await actors[0].eplb_call.remote("eplb_placement"))

        def msg(plan_id: int, **extra) -> dict:
            new = random_placement(rng, old.shape[0], 16, NUM_REDUNDANT)
            return PlanMessage(plan_id, old, new, 2, **extra).to_dict()

        # 1. Only rank 0 gets the plan: its staging gives up after the plan's timeout, not gloo's.
        t0 = time.monotonic()
        res = await actors[0].eplb_call.remote("eplb_stage", msg(1, transfer={"timeout_s": 2.0}))
        assert res["accepted"], res
        h = await _outcome(actors, 0, 1, timeout_s=25)
        assert h["outcome"] == "failed" and "TimeoutError" in h["error"], h
        assert time.monotonic() - t0 < 15
        # 2. Only rank 0 gets the plan, then it is aborted: nothing was posted (staging starts only
        # once every rank accepted), so nothing is left waiting on the group.
        res = await actors[0].eplb_call.remote("eplb_stage", msg(2))
        assert res["accepted"], res
        await collect_stream(actors[0], "keep stepping", {"max_tokens": 4, "temperature": 0.0})
        status = await actors[0].eplb_call.remote("eplb_status")
        assert status["staging_threads"] == 0 and status["pending"]["plan_id"] == 2, status
        assert await actors[0].eplb_call.remote("eplb_abort", 2)
        for a in actors:
            assert (np.asarray(await a.eplb_call.remote("eplb_placement")) == old).all()
            assert (await a.eplb_call.remote("eplb_status"))["pending"] is None
        # 3. Both ranks get the next plan: the transfer group still works, outputs unchanged.
        m = msg(3)
        during = asyncio.ensure_future(_generate(actors))
        res = await asyncio.gather(*[a.eplb_call.remote("eplb_stage", m) for a in actors])
        assert all(r["accepted"] for r in res), res
        outcomes = [await _outcome(actors, r, 3, timeout_s=60) for r in range(2)]
        assert [o["outcome"] for o in outcomes] == ["committed", "committed"], outcomes
        assert all(o["remote_bytes"] > 0 for o in outcomes)
        assert await during == reference
        for a in actors:
            assert (np.asarray(await a.eplb_call.remote("eplb_placement")) == np.asarray(m["new"])).all()
        assert await _generate(actors) == reference
        # 4. Unknown transfer options are rejected before anything moves.
        old = np.asarray(m["new"])
        res = await actors[0].eplb_call.remote("eplb_stage", msg(4, transfer={"bogus": 1}))
        assert not res["accepted"] and "bogus" in res["error"]

    loop.run_until_complete(go())
