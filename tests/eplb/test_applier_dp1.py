"""Rank-side EPLB on one in-process engine (DP=1): physical slots, redundant replicas and in-place
re-placement keep greedy float32 outputs token-identical to the plain model.

One real vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), no mocks; the worker extension is reached
through `LLM.collective_rpc` exactly as the rank actor reaches it through AsyncLLM.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from eplb.messages import PlanMessage
from eplb.stats import logical_from_slots
from tests.helpers import PROMPTS, greedy, random_placement

pytestmark = pytest.mark.slow

NUM_REDUNDANT = 4


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    engine = LLM(model=tiny_model_dir, max_model_len=256, max_num_seqs=8, dtype="float32", enforce_eager=True,
                 seed=0, worker_extension_cls="eplb.applier.EplbWorkerExtension")  # fmt: skip
    yield engine
    del engine


def _generate(llm) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(PROMPTS[:6], SamplingParams(**greedy(16)), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _stage(llm, plan_id: int, new: np.ndarray) -> dict:
    old = np.asarray(llm.collective_rpc("eplb_placement")[0])
    return llm.collective_rpc("eplb_stage", args=(PlanMessage(plan_id, old, new, 1).to_dict(),))[0]


def test_placements_keep_outputs_identical(llm):
    reference = _generate(llm)  # the plain model: no tables installed yet
    status = llm.collective_rpc("eplb_setup", args=(NUM_REDUNDANT,))[0]
    assert status["num_physical"] == 16 + NUM_REDUNDANT and status["slots_per_rank"] == 20
    assert _generate(llm) == reference  # 16 experts in 20 slots, 4 replicated

    load = llm.collective_rpc("eplb_take_load")[0]
    counts = np.asarray(load["counts"])
    assert counts.shape == (4, 16) and load["steps"] > 0
    # Every routed token counted once per layer: top-2 of each token in every layer.
    assert (counts.sum(axis=1) == counts.sum(axis=1)[0]).all() and counts.sum() % 2 == 0
    # Per physical slot, where the router sent each token: a logical expert's slots sum to its count
    # (one placement in force since set-up), and the replicas (slots 16-19: experts 0-3) ran tokens.
    physical = np.asarray(load["physical"])
    placement = np.asarray(llm.collective_rpc("eplb_placement")[0])
    assert physical.shape == (4, 20)
    assert (logical_from_slots(physical, placement, 16) == counts).all()
    assert physical[:, 16:].sum() > 0
    print(f"\nrecord cost: {load['record_us_per_call']:.1f} us per layer call over {load['calls']} calls")

    rng = np.random.default_rng(0)
    old = np.asarray(llm.collective_rpc("eplb_placement")[0])
    layers, slots = old.shape
    for plan_id in (1, 2, 3):
        # A random valid placement: every expert once, the redundant slots random replicas.
        new = random_placement(rng, layers, 16, NUM_REDUNDANT)
        t0 = time.perf_counter()
        res = _stage(llm, plan_id, new)
        assert res == {"accepted": True, "committed": True}, res
        print(f"plan {plan_id}: applied in {(time.perf_counter() - t0) * 1e3:.1f} ms (rpc incl.)")
        assert (np.asarray(llm.collective_rpc("eplb_placement")[0]) == new).all()
        assert _generate(llm) == reference

    hist = llm.collective_rpc("eplb_status")[0]["history"]
    assert [h["outcome"] for h in hist] == ["committed"] * 3


def test_malformed_plan_rejected_before_anything_moves(llm):
    if llm.collective_rpc("eplb_status")[0].get("enabled") is False:
        llm.collective_rpc("eplb_setup", args=(NUM_REDUNDANT,))
    before = np.asarray(llm.collective_rpc("eplb_placement")[0])
    reference = _generate(llm)
    bad = before.copy()
    bad[0, :] = 0  # expert 1..15 lose every replica in layer 0
    res = _stage(llm, 10, bad)
    assert res["accepted"] is False and "no replica" in res["error"]
    stale = PlanMessage(11, np.zeros_like(before), before, 1).to_dict()
    res = llm.collective_rpc("eplb_stage", args=(stale,))[0]
    assert res["accepted"] is False and "stale" in res["error"]
    assert (np.asarray(llm.collective_rpc("eplb_placement")[0]) == before).all()
    assert _generate(llm) == reference
