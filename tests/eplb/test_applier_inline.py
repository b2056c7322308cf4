"""Inline staging (transfer option `inline`: no staging thread; each step boundary completes the layer
posted one step earlier and posts the next) over real gloo between two processes, no engine.

A barrier on the default group stands in for the per-step DP all-reduce that orders the ranks'
step boundaries. Checked: after staging and committing random plans every slot holds its new
expert, with whole layers or a few slots per step; one piece is in flight at a time; a rank whose peer stopped mid-exchange drops the plan at
the next step without waiting on its unmatched ops (which would hold the engine until gloo's
timeout) and marks the transfer group unusable.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.applier import TRANSFER_DEFAULTS, EplbWorkerState, StepLog, _Pending, _pieces
from eplb.plan import build_transfer_plan
from eplb.policies import default_placement

E, R, LAYERS, RANKS = 16, 4, 3, 2
SPR = (E + R) // RANKS


def _weights(phy2log_row: np.ndarray, rank: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows encode (layer, expert): w13 [SPR, 6, 4] = 100*layer + expert, w2 [SPR, 4, 3] = -(...)."""
    experts = torch.as_tensor(phy2log_row[rank * SPR : (rank + 1) * SPR], dtype=torch.float32)
    code = 100.0 * layer + experts
    return code.view(-1, 1, 1).expand(SPR, 6, 4).clone(), (-code).view(-1, 1, 1).expand(SPR, 4, 3).clone()


def _state(rank: int, old: np.ndarray, group) -> EplbWorkerState:
    s = EplbWorkerState.__new__(EplbWorkerState)  # the real methods, without a vLLM worker
    s.ep_rank, s.ep_size, s.spr, s.num_logical, s.cap = rank, RANKS, SPR, E, R + 1
    s.group, s.group_ranks, s.group_error = group, list(range(RANKS)), None
    s.fail_next_transfer, s.transfer_tids, s.phy2log = False, [], old.copy()
    s.steplog, s.lock, s.history, s.pending = StepLog(), threading.Lock(), [], None
    s.sync_steps = s.sync_steps_idle = 0
    s.sync_us = 0.0
    s.layers_per_step = 1
    s.layers = []
    for layer in range(LAYERS):
        w13, w2 = _weights(old[layer], rank, layer)
        routed = SimpleNamespace(w13_weight=torch.nn.Parameter(w13, requires_grad=False),
                                 w2_weight=torch.nn.Parameter(w2, requires_grad=False))  # fmt: skip
        routing = SimpleNamespace(log2phy=torch.full((E, R + 1), -1, dtype=torch.int64),
                                  replica_count=torch.zeros(E, dtype=torch.int64))  # fmt: skip
        s.layers.append(SimpleNamespace(routed=routed, routing=routing))
    s.bytes_per_expert = (6 * 4 + 4 * 3) * 4
    return s


def _random_new(rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R)]))
                     for _ in range(LAYERS)])  # fmt: skip


def _pending(plan_id: int, old: np.ndarray, new: np.ndarray, slots: int = 0, split: bool = False) -> _Pending:
    plan = build_transfer_plan(old, new, RANKS, E)
    opts = dict(TRANSFER_DEFAULTS, inline=True, slots_per_step=slots, split_weights=split)
    p = _Pending(plan_id, plan, blocking=False, opts=opts)
    p.started, p.t_started, p.todo = True, time.perf_counter(), _pieces(plan, RANKS, slots, split)
    return p


def _moves(rank: int, port: int, errors, slots: int, split: bool = False) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=timedelta(seconds=60))
        group = dist.new_group(list(range(RANKS)), backend="gloo", timeout=timedelta(seconds=30))
        rng = np.random.default_rng(5)
        old = default_placement(LAYERS, E, RANKS, R)
        state = _state(rank, old, group)
        for plan_id in (1, 2):
            new = _random_new(rng)
            p = _pending(plan_id, old, new, slots, split)
            pieces = len(p.todo)
            if slots:
                assert pieces > len(p.plan.layers())  # the test moves more than `slots` slots per pair
            steps = 0
            while not p.ready:
                dist.barrier()  # the step's DP all-reduce
                state._inline_step(p)
                steps += 1
                assert not p.failed, p.failed
                # One piece in flight at most; a layer is staged once its last piece completed.
                assert p.inflight is None or p.inflight.layer not in p.staged
            assert steps == pieces + 1, steps
            assert len(p.wait_ms) == pieces and p.remote_bytes > 0
            assert sorted(p.staged) == sorted(p.plan.layers()) and not p.exchanges
            for layer in p.plan.layers():
                state._commit_layer(p, layer)
            for layer in range(LAYERS):
                w13, w2 = _weights(new[layer], rank, layer)
                got = state.layers[layer].routed
                assert torch.equal(got.w13_weight.data, w13), (rank, layer)
                assert torch.equal(got.w2_weight.data, w2), (rank, layer)
                rc = state.layers[layer].routing.replica_count
                assert rc.tolist() == np.bincount(new[layer], minlength=E).tolist()
            assert (state.phy2log == new).all()
            old = new
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent: a spawned worker's assert is otherwise opaque
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def _peer_stops(rank: int, port: int, errors, slots: int) -> None:
    """Rank 1 fails to post the second layer; rank 0 learns it from the next step's sums."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=timedelta(seconds=60))
        group = dist.new_group(list(range(RANKS)), backend="gloo", timeout=timedelta(seconds=30))
        old = default_placement(LAYERS, E, RANKS, R)
        state = _state(rank, old, group)
        new = _random_new(np.random.default_rng(9))
        p = _pending(7, old, new, slots)
        state.pending = p
        if rank == 1:
            real, posts = state._post_piece, []

            def post(*args):
                posts.append(args)
                if len(posts) == 2:
                    raise RuntimeError("link down")
                return real(*args)

            state._post_piece = post
        dist.barrier()
        state._inline_step(p)  # step 1: both post piece A
        dist.barrier()
        state._inline_step(p)  # step 2: both complete A; rank 0 posts piece B, rank 1 fails
        assert (p.failed is not None) == (rank == 1), p.failed
        fails = torch.tensor([1 if p.failed else 0])
        dist.all_reduce(fails)  # step 3's sums carry rank 1's failure
        t0 = time.perf_counter()
        state.on_sums([0, 0, 0, 0, int(fails.item())], RANKS)
        assert time.perf_counter() - t0 < 5.0  # no wait on rank 0's unmatched layer B
        assert state.pending is None and state.history[-1]["outcome"] == "failed", state.history
        assert state.group_error is not None
        assert (state.phy2log == old).all()
        for layer in range(LAYERS):
            w13, _ = _weights(old[layer], rank, layer)
            assert torch.equal(state.layers[layer].routed.w13_weight.data, w13)
        dist.barrier()
        # Rank 0's layer-B ops stay posted and unmatched: leave without a clean group teardown.
    except BaseException as exc:
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(target, slots: int, split: bool = False) -> None:
    ctx = mp.get_context("fork")  # the workers are this module's functions
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=target, args=(r, port, errors, slots, split) if split else (r, port, errors, slots)
        )
        for r in range(RANKS)
    ]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(120)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, msgs
    assert all(pr.exitcode == 0 for pr in procs), [pr.exitcode for pr in procs]


@pytest.mark.parametrize("slots", [0, 1, 2], ids=["whole_layers", "one_slot_per_step", "two_slots_per_step"])
def test_inline_staging_moves_every_slot_one_piece_in_flight(slots):
    _run(_moves, slots)


def test_inline_staging_weights_in_separate_steps():
    _run(_moves, 1, split=True)


def test_peer_failing_mid_exchange_drops_the_plan_without_waiting():
    _run(_peer_stops, 2)
