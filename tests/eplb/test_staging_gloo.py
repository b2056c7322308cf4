"""The applier's staging data paths over real gloo between two processes (no engine): after staging
and committing a random plan, every physical slot on every rank holds its new expert's weights, for
the bulk path (one message per weight per layer and peer) and the per-slot baseline alike."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch.distributed as dist

from eplb.messages import TRANSFER_DEFAULTS
from eplb.pending import PendingPlan
from eplb.plan import build_transfer_plan
from eplb.policies import default_placement
from tests.eplb.gloo_pair import (
    LAYERS,
    RANKS,
    E,
    R,
    assert_holds,
    join,
    random_placement,
    run_pair,
    worker_state,
)


def _worker(rank: int, port: int, errors, per_slot: bool) -> None:
    try:
        group = join(rank, port)
        rng = np.random.default_rng(3)
        old = default_placement(LAYERS, E, RANKS, R)
        state = worker_state(rank, old, group)
        for plan_id in (1, 2):
            new = random_placement(rng)
            plan = build_transfer_plan(old, new, RANKS, E)
            opts = dict(TRANSFER_DEFAULTS, paced=False, per_slot=per_slot)
            p = PendingPlan(plan_id, plan, blocking=False, opts=opts)
            t = threading.Thread(target=state.exchanger.transfer, args=(p,), name="eplb-stage")
            t.start()
            t.join(60)
            assert p.ready and not p.failed, p.failed
            assert p.remote_bytes > 0
            for layer in plan.layers():
                state._commit_layer(p, layer)
            assert_holds(state, new, rank)
            old = new
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent: a spawned worker's assert is otherwise opaque
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


@pytest.mark.parametrize("per_slot", [False, True], ids=["bulk", "per_slot"])
def test_staging_moves_every_slot_to_its_new_expert(per_slot):
    run_pair(_worker, per_slot)
