"""The Ascend exchanger's batched p2p pieces (eplb.ascend.transfer.BatchedExchanger) between two
processes over gloo, which runs batch_isend_irecv too (HCCL, which it is for, needs NPUs): after
staging and committing random plans every slot holds its new expert, whole layers at once and a
slot per piece inline."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from eplb.ascend.transfer import BatchedExchanger
from eplb.exchange import pieces
from eplb.pending import PendingPlan
from tests.eplb.gloo_pair import RANKS, apply_random_plans, run_pair, stage_in_thread


def _stage_inline(state, p: PendingPlan) -> None:
    """A slot per piece between steps, as the applier's inline path runs them."""
    p.started, p.t_started, p.todo = True, time.perf_counter(), pieces(p.plan, RANKS, 1)
    while not p.ready:
        dist.barrier()  # the step's DP all-reduce
        state.exchanger.inline_step(p)
        assert not p.failed, p.failed


def _worker(rank: int, port: int, errors, inline: bool) -> None:
    try:
        apply_random_plans(
            rank, port, seed=11, opts={"inline": inline, "slots_per_step": 1},
            stage=_stage_inline if inline else stage_in_thread,
            exchanger=lambda state, group: BatchedExchanger(state.slots, group, list(range(RANKS))),
        )  # fmt: skip
    except BaseException as exc:  # reported to the parent: a forked worker's assert is otherwise opaque
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


@pytest.mark.parametrize("inline", [False, True], ids=["layers", "inline_pieces"])
def test_batched_pieces_move_every_slot_to_its_new_expert(inline: bool) -> None:
    run_pair(_worker, inline)
