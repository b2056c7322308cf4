"""Two processes joined by real gloo, each with an applier state over encoded expert weights (no
vLLM worker): shared by the staging tests (tests/eplb/test_staging_gloo.py, test_applier_inline.py,
tests/eplb/ascend/test_transfer_gloo.py)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.agreement import EplbWorkerState
from eplb.exchange import Exchanger
from eplb.messages import TRANSFER_DEFAULTS
from eplb.pending import PendingPlan
from eplb.plan import build_transfer_plan
from eplb.policies import default_placement
from eplb.slots import ModelSlots, SlotLayer

E, R, LAYERS, RANKS = 16, 4, 3, 2
SPR = (E + R) // RANKS


def weights(phy2log_row: np.ndarray, rank: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows encode (layer, expert): w13 [SPR, 6, 4] = 100*layer + expert, w2 [SPR, 4, 3] = -(...)."""
    experts = torch.as_tensor(phy2log_row[rank * SPR : (rank + 1) * SPR], dtype=torch.float32)
    code = 100.0 * layer + experts
    return code.view(-1, 1, 1).expand(SPR, 6, 4).clone(), (-code).view(-1, 1, 1).expand(SPR, 4, 3).clone()


def random_placement(rng: np.random.Generator) -> np.ndarray:
    """phy2log [LAYERS, E + R]: every expert once plus R random replicas, shuffled."""
    return np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R)]))
                     for _ in range(LAYERS)])  # fmt: skip


def worker_state(rank: int, old: np.ndarray, group, dp_size: int = RANKS) -> EplbWorkerState:
    """The real worker state over encoded weights `old` (no vLLM worker); `group`: the transfer group."""
    layers = []
    for layer in range(LAYERS):
        w13, w2 = weights(old[layer], rank, layer)
        routed = SimpleNamespace(w13_weight=torch.nn.Parameter(w13, requires_grad=False),
                                 w2_weight=torch.nn.Parameter(w2, requires_grad=False))  # fmt: skip
        routing = SimpleNamespace(log2phy=torch.full((E, R + 1), -1, dtype=torch.int64),
                                  replica_count=torch.zeros(E, dtype=torch.int64))  # fmt: skip
        layers.append(SlotLayer(routed, None, routing))
    slots = ModelSlots(layers, old, E, RANKS, rank, bytes_per_expert=(6 * 4 + 4 * 3) * 4)
    return EplbWorkerState(slots, dp_size, Exchanger(slots, group, list(range(RANKS))))


def join(rank: int, port: int):
    """This process as gloo rank `rank` of RANKS; returns the transfer group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=timedelta(seconds=60))
    return dist.new_group(list(range(RANKS)), backend="gloo", timeout=timedelta(seconds=30))


def assert_holds(state: EplbWorkerState, placement: np.ndarray, rank: int) -> None:
    """Every slot of `state` holds the expert `placement` gives it, and the routing tables agree."""
    for layer in range(LAYERS):
        w13, w2 = weights(placement[layer], rank, layer)
        got = state.slots.layers[layer].routed
        assert torch.equal(got.w13_weight.data, w13), (rank, layer)
        assert torch.equal(got.w2_weight.data, w2), (rank, layer)
        rc = state.slots.layers[layer].routing.replica_count
        assert rc.tolist() == np.bincount(placement[layer], minlength=E).tolist()
    assert (state.slots.phy2log == placement).all()


def stage_in_thread(state: EplbWorkerState, p: PendingPlan) -> None:
    """Stage `p` as the applier does off the step: its exchanger's transfer on a thread."""
    t = threading.Thread(target=state.exchanger.transfer, args=(p,), name="eplb-stage")
    t.start()
    t.join(60)


def apply_random_plans(
    rank: int,
    port: int,
    seed: int,
    opts: dict,
    stage: Callable[[EplbWorkerState, PendingPlan], None] = stage_in_thread,
    exchanger: Callable[[EplbWorkerState, object], object] | None = None,
) -> None:
    """In one process of the pair: join, then two random plans from the default placement, each
    staged by `stage(state, plan)`, committed layer by layer and checked slot by slot.

    `opts` update the transfer defaults (paced off); `exchanger(state, group)`, if given, replaces
    the state's exchanger."""
    group = join(rank, port)
    rng = np.random.default_rng(seed)
    old = default_placement(LAYERS, E, RANKS, R)
    state = worker_state(rank, old, group)
    if exchanger is not None:
        state.exchanger = exchanger(state, group)
    for plan_id in (1, 2):
        new = random_placement(rng)
        plan = build_transfer_plan(old, new, RANKS, E)
        p = PendingPlan(plan_id, plan, blocking=False, opts=dict(TRANSFER_DEFAULTS, paced=False, **opts))
        stage(state, p)
        assert p.ready and not p.failed, p.failed
        assert p.remote_bytes > 0
        for layer in plan.layers():
            state._commit_layer(p, layer)
        assert_holds(state, new, rank)
        old = new
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(target: Callable[..., None], *args) -> None:
    """Run `target(rank, port, errors, *args)` in RANKS forked processes; fail with their errors.
    A target reports its exception on `errors` (a forked worker's assert is otherwise opaque)."""
    ctx = mp.get_context("fork")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, port, errors, *args)) for r in range(RANKS)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(120)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, msgs
    assert all(pr.exitcode == 0 for pr in procs), [pr.exitcode for pr in procs]
