"""The Ascend exchanger's batched p2p pieces (eplb.ascend.transfer.BatchedExchanger) between two
processes over gloo, which runs batch_isend_irecv too (HCCL, which it is for, needs NPUs): after
staging and committing random plans every slot holds its new expert, whole layers at once and a
slot per piece inline."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch.distributed as dist

from eplb.ascend.transfer import BatchedExchanger
from eplb.exchange import pieces
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


def _worker(rank: int, port: int, errors, inline: bool) -> None:
    try:
        group = join(rank, port)
        rng = np.random.default_rng(11)
        old = default_placement(LAYERS, E, RANKS, R)
        state = worker_state(rank, old, group)
        state.exchanger = BatchedExchanger(state.slots, group, list(range(RANKS)))
        for plan_id in (1, 2):
            new = random_placement(rng)
            plan = build_transfer_plan(old, new, RANKS, E)
            opts = dict(TRANSFER_DEFAULTS, paced=False, inline=inline, slots_per_step=1)
            p = PendingPlan(plan_id, plan, blocking=False, opts=opts)
            if inline:
                p.started, p.t_started, p.todo = True, time.perf_counter(), pieces(plan, RANKS, 1)
                while not p.ready:
                    dist.barrier()  # the step's DP all-reduce
                    state.exchanger.inline_step(p)
                    assert not p.failed, p.failed
            else:
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
    except BaseException as exc:  # reported to the parent: a forked worker's assert is otherwise opaque
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


@pytest.mark.parametrize("inline", [False, True], ids=["layers", "inline_pieces"])
def test_batched_pieces_move_every_slot_to_its_new_expert(inline: bool) -> None:
    run_pair(_worker, inline)
