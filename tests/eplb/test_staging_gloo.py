"""The applier's staging data paths over real gloo between two processes (no engine): after staging
and committing a random plan, every physical slot on every rank holds its new expert's weights, for
the bulk path (one message per weight per layer and peer) and the per-slot baseline alike."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.applier import TRANSFER_DEFAULTS, EplbWorkerState, _Pending
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


def _worker(rank: int, port: int, per_slot: bool, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=timedelta(seconds=60))
        group = dist.new_group(list(range(RANKS)), backend="gloo", timeout=timedelta(seconds=30))
        rng = np.random.default_rng(3)
        old = default_placement(LAYERS, E, RANKS, R)
        state = _state(rank, old, group)
        for plan_id in (1, 2):
            new = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R)]))
                            for _ in range(LAYERS)])  # fmt: skip
            plan = build_transfer_plan(old, new, RANKS, E)
            opts = dict(TRANSFER_DEFAULTS, paced=False, per_slot=per_slot)
            p = _Pending(plan_id, plan, blocking=False, opts=opts)
            t = threading.Thread(target=state._transfer, args=(p,), name="eplb-stage")
            t.start()
            t.join(60)
            assert p.ready and not p.failed, p.failed
            assert p.remote_bytes > 0
            for layer in plan.layers():
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("per_slot", [False, True], ids=["bulk", "per_slot"])
def test_staging_moves_every_slot_to_its_new_expert(per_slot):
    ctx = mp.get_context("fork")  # the workers are this module's functions
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, per_slot, errors)) for r in range(RANKS)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(120)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, msgs
    assert all(pr.exitcode == 0 for pr in procs), [pr.exitcode for pr in procs]
