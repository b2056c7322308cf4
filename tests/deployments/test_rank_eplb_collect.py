"""RankEplb.collect (DPRank.eplb_collect): the worker's logical and physical-slot counts drained into
the rank's windows, and the per-rank load as the sum of each EP rank's slots."""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.config import EplbSection
from deployments.rank_eplb import RankEplb

# 1 layer, 4 experts in 6 slots on 2 EP ranks (3 slots each); expert 0 in slots 0 and 3.
PHY2LOG = [[0, 1, 2, 0, 3, 2]]
TAKES = [
    {"counts": [[4, 1, 1, 2]], "physical": [[4, 1, 1, 0, 2, 0]], "steps": 3, "record_us_per_call": 1.0},
    {"counts": [[2, 0, 2, 0]], "physical": [[0, 0, 1, 2, 0, 1]], "steps": 2, "record_us_per_call": 1.0},
]


def _rank() -> RankEplb:
    takes = iter(TAKES)

    async def call(method, *args):
        if method == "eplb_setup":
            return {"num_logical": 4, "num_physical": 6, "ep_size": 2, "outcome_dir": None}
        if method == "eplb_placement":
            return PHY2LOG
        assert method == "eplb_take_load", method
        return next(takes)

    return RankEplb(0, EplbSection(window_samples=4), call, lambda: True)


def test_collect_windows_slot_and_rank_load_and_reset():
    r = _rank()

    async def go():
        await r.setup()
        first = await r.collect()
        second = await r.collect()
        return first, second

    first, second = asyncio.run(go())
    assert first["rank_load"] == [[6.0, 2.0]]  # slots 0-2 on rank 0, 3-5 on rank 1
    assert second["load"] == [[6.0, 1.0, 3.0, 2.0]]
    assert second["slot_load"] == [[4.0, 1.0, 2.0, 2.0, 2.0, 1.0]]
    assert second["rank_load"] == [[7.0, 5.0]]
    assert second["steps"] == 5 and second["samples"] == 2
    # Every token in both windows: the slots of each expert sum to its logical load.
    per_expert = np.zeros(4)
    np.add.at(per_expert, PHY2LOG[0], second["slot_load"][0])
    assert per_expert.tolist() == second["load"][0]
    r.reset_window()
    assert r.slot_window.total().sum() == 0 and r.window.total().sum() == 0
