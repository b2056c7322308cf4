"""Rank-side EPLB: physical expert slots, routing tables, load recording and plan application.

Runs inside the vLLM worker (as the engine's `worker_extension_cls`, methods `eplb_*` reached
with `AsyncLLM.collective_rpc`). Per MoE layer (i = ordinal among the model's MoE layers):

* Physical slots: the layer's packed weights `w13_weight [lne, 2I, H]` / `w2_weight [lne, H, I]`
  are enlarged once, after loading, to `spr = (E + R) / ep_size` rows (R redundant slots). Slot s
  (global) lives on EP rank s // spr at local row s % spr. The CPU kernel takes the slot count from
  dim 0 and, under EP, our plugin's expert_map patch maps physical ids to local rows through a
  static [E + R] table (-1 where the slot is on another rank).
* Routing: the router's mapping step (npu_runtime.eplb_hooks) calls `LayerRouting`, which records
  logical counts and maps token t's expert e to `log2phy[e, t % replica_count[e]]`. Both tables are
  preallocated ([E, 1 + R] and [E]) and only ever updated in place, so compiled graphs see updates.
* Initial placement: what vLLM loaded. EP rank q holds its linear block of experts
  [q*lne, (q+1)*lne) in its first lne slots, its extra slots replicate its own experts (no transfer
  at start-up). `eplb_placement()` reports it; the EPLB actor plans from it.

Applying a plan (TransferPlan from eplb.plan, rebuilt and validated here before anything moves):
0. Accept: `eplb_stage` (an RPC on the engine's stepping thread) does only the cheap checks (id, options,
   group size, stale start placement, well-formed tables); an async plan is then prepared in a background thread (nice 19,
   one OpenMP thread: TransferPlan diff and validation, pieces, every layer's exchange layout, receive
   buffers and commit tables; transfer option `prepare`, "step" does it all in the RPC as before), and
   the rank counts as having accepted the plan only once that is done (a plan failing there is dropped
   by every rank through the failed row below). When DP > 1, every step's DP padding all-reduce carries [accepted_id, id^2, ready_id,
   id^2, failed] (npu_runtime.eplb_hooks); all ranks see the same sums at the same step. Staging
   starts on every rank at the step where all accepted the same id, so every p2p op has its peer
   (a plan a peer never got is dropped after `timeout_s` with nothing posted).
1. Stage (default, `inline`): no staging thread. A layer's exchange is cut into pieces of at most
   `slots_per_step` slots per rank pair (the same pieces on every rank, from the plan); at every step
   boundary, on the engine's main thread inside the step sync, the piece posted at the previous step
   is completed (gloo wait on ops every peer posted then; gloo's I/O threads moved the bytes during
   that forward) and the next piece's non-blocking gloo isend/irecv are posted (a one-slot piece is
   sent from a view of the weights, no copy). The layer's new tables are prepared when its first
   piece is posted. Alternative (`inline: False`): a background thread (nice 19, one OpenMP thread,
   one layer started per engine step) moves a whole layer per message. Both use a dedicated gloo
   group created at setup (never interleaved with vLLM's collectives) and read sources from the OLD
   placement, still in force.
2. Agree: all ready with the same id -> every rank starts committing at that step; any failure ->
   every rank drops the plan (old placement stays everywhere). Inline, a rank whose exchange fails
   stops posting; its peers see that in the next step's sums before they wait, drop the plan and mark
   the transfer group unusable (their last posted piece has no peer), never blocking the step.
3. Commit: `layers_per_step` layers per step: one index_copy_ per weight, then the tables.
   Every rank does layer k at the same step, so gathered tokens never see mixed tables.
Reporting: `eplb_status` (full state, with the last 20 plans' records) and `eplb_outcome(plan_id)` (one
record, None while pending). Every RPC runs on the engine core's stepping thread between steps, so with an
outcome directory (`eplb_setup(..., outcome_dir)`) each record is also written atomically to
`<dir>/plan-<id>.json`, which the rank actor (deployments.rank.DPRank.eplb_outcome_local) reads for pollers. Engine-side step times (StepLog, `eplb_step_log`) and per-thread CPU (`eplb_thread_cpu`) are recorded
for benchmarks/eplb_online.py.
With DP == 1 there is nobody to agree with: stage and commit happen inside the RPC, between steps.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from eplb.plan import PlanError, TransferPlan, build_transfer_plan, check_pair, validate_plan
from eplb.policies import placement_from_phy2log
from eplb.recorder import ExpertLoadRecorder

logger = logging.getLogger("dpserve.eplb.applier")

_WEIGHTS = ("w13_weight", "w2_weight")


class LayerRouting:
    """Callable installed as `router._dpserve_route` for one MoE layer.

    log2phy int64 [E, cap] (-1 padded) and replica_count int64 [E] are updated in place only.
    """

    def __init__(self, index: int, recorder: ExpertLoadRecorder, log2phy: torch.Tensor,
                 replica_count: torch.Tensor) -> None:  # fmt: skip
        self.index = index
        self.recorder = recorder
        self.log2phy = log2phy
        self.replica_count = replica_count

    def __call__(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids int [tokens, top_k] logical -> physical ids, same shape and dtype."""
        self.recorder.record(self.index, topk_ids)
        ids = topk_ids.long()
        # Round-robin over replicas by token index: deterministic, and identical on every rank
        # because under the all-gather MoE every rank routes the same gathered batch.
        tok = torch.arange(ids.shape[0], dtype=torch.int64).unsqueeze(1)
        rep = tok % self.replica_count[ids]
        return self.log2phy[ids, rep].to(topk_ids.dtype)


@dataclass
class _Layer:
    routed: Any  # vLLM RoutedExperts (holds w13_weight / w2_weight / _expert_map)
    router: Any
    routing: LayerRouting


# How a plan is staged; a plan message may override any of these under "transfer".
TRANSFER_DEFAULTS: dict[str, Any] = {
    "nice": 19,  # OS priority of the staging thread (Linux: per thread); 0 leaves it alone
    "omp_threads": 1,  # OpenMP threads of the staging thread's own copies; 0 leaves it alone
    "paced": True,  # at most one layer's transfer started per engine step, right after the step
    "timeout_s": 30.0,  # a plan not accepted by every rank by then is dropped (a peer never got it)
    "per_slot": False,  # the first implementation's data path: one message per moved slot (baseline)
    # No staging thread: each step boundary (on the engine's main thread) completes the piece posted
    # one step earlier and posts the next one; gloo's own I/O threads move the bytes during the forward.
    # False: the staging thread (nice, omp_threads, paced, per_slot apply to it only).
    "inline": True,
    # Inline staging: at most this many slots per rank pair in one step's piece of a layer (0: the whole
    # layer in one piece). Every rank derives the same pieces from the plan. One slot is a contiguous
    # row: sent straight from the weights, no gather copy.
    "slots_per_step": 1,
    "split_weights": False,  # inline: a piece's w13 and w2 rows in two successive steps (half the bytes each)
    # Where an async plan is prepared (TransferPlan diff and validation, pieces; inline: every layer's
    # exchange layout, receive buffers and commit tables): "thread" - `eplb_stage` returns after the cheap
    # checks and a background thread (nice, one OpenMP thread) prepares it; the rank contributes the id to
    # the start agreement only once that is done. "step" - all of it inside the `eplb_stage` RPC (on the
    # engine's stepping thread), a layer's layout when its first piece is posted (the old behaviour).
    "prepare": "thread",
}
PACE_WAIT_S = 0.25  # a paced layer starts at the latest this long after the previous one


@dataclass
class _Staged:
    """One layer, ready to commit: rows of this rank to overwrite and their new weights, new tables."""

    rows: torch.Tensor  # int64 [n] local rows
    w13: torch.Tensor  # [n, 2I, H]
    w2: torch.Tensor  # [n, H, I]
    table: torch.Tensor  # log2phy int64 [E, cap]
    replica_count: torch.Tensor  # int64 [E]
    new_row: np.ndarray  # phy2log of the layer


@dataclass
class _Exchange:
    """One layer's exchange on this rank (see EplbWorkerState._layout)."""

    layer: int
    staged: _Staged  # its receive buffers fill piece by piece
    recv: list[tuple[int, int, list[int]]]  # (source rank, first buffer row, rows on the source rank)
    send: list[tuple[int, list[int]]]  # (destination rank, rows of this rank to send)


@dataclass
class _Posted:
    """One piece of a layer's exchange, posted and not yet waited on."""

    layer: int
    works: list[Any]
    keep: list[torch.Tensor]  # send buffers: alive until their works complete
    t_post: float


@dataclass
class _Pending:
    plan_id: int
    plan: TransferPlan
    blocking: bool  # stop-the-world: transfer at the agreed step instead of in the background
    opts: dict[str, Any] = field(default_factory=lambda: dict(TRANSFER_DEFAULTS))
    t_received: float = field(default_factory=time.perf_counter)
    staged: dict[int, _Staged] = field(default_factory=dict)
    step_done: threading.Event = field(default_factory=threading.Event)  # set after each engine step
    slot_seq: int = 0
    started: bool = False  # every rank accepted it and the staging thread runs (no abort from here)
    ready: bool = False
    failed: str | None = None
    aborted: bool = False
    stage_ms: float = 0.0
    stage_cpu_ms: float = 0.0  # CPU time of the staging thread (or of the step, stop-the-world)
    remote_bytes: int = 0
    commit_layers: list[int] = field(default_factory=list)
    commit_ms: list[float] = field(default_factory=list)
    steps_waited: int = 0
    t_ready: float = 0.0  # perf_counter when staging finished (0: not yet)
    layer_ms: list[tuple[int, float, float]] = field(default_factory=list)  # (layer, t_start, t_end)
    # Inline staging: pieces (layer, piece, weight) still to post, the one posted at the previous step.
    todo: list[tuple[int, int, int]] = field(default_factory=list)
    inflight: _Posted | None = None
    exchanges: dict[int, _Exchange] = field(default_factory=dict)
    seq: int = 0  # pieces posted so far (their tags)
    wait_ms: list[float] = field(default_factory=list)  # per completed piece: its wait at the step boundary
    inline_steps: list[tuple[float, float]] = field(default_factory=list)  # (wall ms, main-thread CPU ms)
    injected: bool = False  # fault injection taken for this plan (inline staging)
    t_started: float = 0.0  # perf_counter when every rank agreed to start staging
    prepared: bool = True  # plan, pieces (and inline layouts) ready; False while the preparing thread runs
    prep_ms: float = 0.0  # wall time of the preparation (thread or stage RPC)
    prep_cpu_ms: float = 0.0


# Codes of StepLog.state: what the step-sync hook did at this step.
STEP_IDLE, STEP_STAGING, STEP_READY, STEP_COMMIT, STEP_STW, STEP_DROP = 0, 1, 2, 3, 4, 5


class StepLog:
    """Engine-side step times in the worker: one entry per engine step (real or DP dummy).

    Entry: (t_start, exec_ms, step_ms, tokens, reqs, state, plan_id, stall_ms) with t_start a
    perf_counter (CLOCK_MONOTONIC: comparable across processes of one host), exec_ms the
    execute_model call (forward incl. the DP all-reduce and any EPLB work at the agreement point),
    step_ms from execute_model start to the end of sample_tokens (or of execute_model when the
    step samples nothing), state a STEP_* code and stall_ms the EPLB work done in the step path.
    """

    def __init__(self, maxlen: int = 20000) -> None:
        self.entries: deque[tuple[float, float, float, int, int, int, int, float]] = deque(maxlen=maxlen)
        self._t0 = 0.0
        self._exec_ms = 0.0
        self._tokens = 0
        self._reqs = 0
        self._open = False
        self.on_end: list[Any] = []  # callables run after every step (the EPLB pacing signal)
        self.state = STEP_IDLE
        self.plan_id = 0
        self.stall_ms = 0.0

    def begin(self, tokens: int, reqs: int) -> None:
        self._close(None)
        self._t0 = time.perf_counter()
        self._tokens, self._reqs = tokens, reqs
        self.state, self.plan_id, self.stall_ms = STEP_IDLE, 0, 0.0
        self._exec_ms = 0.0
        self._open = True

    def end_exec(self) -> None:
        if self._open:
            self._exec_ms = (time.perf_counter() - self._t0) * 1e3

    def end_sample(self) -> None:
        self._close(time.perf_counter())

    def _close(self, t_end: float | None) -> None:
        if not self._open:
            return
        self._open = False
        step_ms = (t_end - self._t0) * 1e3 if t_end is not None else self._exec_ms
        self.entries.append((self._t0, self._exec_ms, step_ms, self._tokens, self._reqs, self.state,
                             self.plan_id, self.stall_ms))  # fmt: skip
        for fn in self.on_end:
            fn()

    def since(self, t: float) -> list[tuple[float, float, float, int, int, int, int, float]]:
        return [e for e in list(self.entries) if e[0] >= t]

    def install(self, worker: Any) -> None:
        """Wrap the worker's step entry points (instance attributes: the executor looks them up by
        name on the worker)."""
        execute_model, sample_tokens = worker.execute_model, worker.sample_tokens
        dummy = worker.execute_dummy_batch

        def timed_execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            n = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
            self.begin(int(getattr(scheduler_output, "total_num_scheduled_tokens", 0)), len(n))
            try:
                return execute_model(scheduler_output, *args, **kwargs)
            finally:
                self.end_exec()

        def timed_sample_tokens(*args: Any, **kwargs: Any) -> Any:
            try:
                return sample_tokens(*args, **kwargs)
            finally:
                self.end_sample()

        def timed_dummy(*args: Any, **kwargs: Any) -> Any:
            self.begin(0, 0)
            try:
                return dummy(*args, **kwargs)
            finally:
                self.end_exec()
                self._close(time.perf_counter())

        worker.execute_model = timed_execute_model
        worker.sample_tokens = timed_sample_tokens
        worker.execute_dummy_batch = timed_dummy


def _pieces(
    plan: TransferPlan, num_ranks: int, slots: int, split: bool = False
) -> list[tuple[int, int, int]]:
    """(layer, piece, weight) in posting order. A layer has ceil(m / slots) pieces, m the most slots any
    rank pair (a rank with itself included) moves in it, and at least one; with `split`, each piece is
    posted as two, w13 (weight 0) then w2 (1), else both weights at once (-1). From the plan alone, so
    that every rank posts the same piece at the same step."""
    out: list[tuple[int, int, int]] = []
    for layer in plan.layers():
        count = np.zeros((num_ranks, num_ranks), dtype=np.int64)
        for op in plan.ops_by_layer[layer]:
            count[op.src_rank, op.dst_rank] += 1
        m = int(count.max()) if count.size else 0
        n = max(1, -(-m // slots)) if slots > 0 else 1
        out += [(layer, j, w) for j in range(n) for w in ((0, 1) if split else (-1,))]
    return out


def _run_start(rows: list[int]) -> int | None:
    """rows[0] when rows are consecutive ascending (r, r+1, ...), else None."""
    if (
        rows
        and rows[-1] - rows[0] == len(rows) - 1
        and all(b == a + 1 for a, b in zip(rows, rows[1:], strict=False))
    ):
        return rows[0]
    return None


_OMP: Any = None


def _tune_staging_thread(nice: int, omp_threads: int) -> None:
    """Make the calling (staging) thread yield to the forward pass: lower OS priority, and few
    OpenMP threads for its copies (a second thread's torch ops otherwise start their own OpenMP team,
    which competes with the forward's). Both per thread; best effort."""
    global _OMP
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            logger.debug("EPLB: could not renice the staging thread", exc_info=True)
    if not omp_threads:
        return
    if _OMP is None:
        _OMP = False
        try:
            import ctypes

            with open("/proc/self/maps") as f:
                libs = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
            if libs:
                _OMP = ctypes.CDLL(sorted(libs)[0])
        except Exception:
            logger.debug("EPLB: no OpenMP runtime found", exc_info=True)
    if _OMP:
        _OMP.omp_set_num_threads(omp_threads)  # this thread's ICV only: the forward's keep theirs


def thread_cpu_ms() -> dict[int, dict]:
    """CPU time (user + system, ms) of every thread of this process: {tid: {"name", "cpu_ms"}}."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, dict] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = {"name": name, "cpu_ms": (int(fields[11]) + int(fields[12])) * 1e3 / tick}
    return out


class EplbWorkerState:
    """All EPLB state of one worker process (one per vLLM worker; see `EplbWorkerExtension`)."""

    def __init__(self, worker: Any, num_redundant: int, layers_per_step: int = 1) -> None:
        from npu_runtime import vllm_patches

        # The model surgery below and the routing / step-sync hooks need vLLM's symbols as
        # npu_runtime.vllm_patches declares them, patched before the model was built (by the plugin).
        vllm_patches.require("eplb")
        if "eplb" not in vllm_patches.installed():
            raise vllm_patches.VllmPatchError(
                f"EPLB needs dpserve's vLLM plugin to patch vLLM {vllm_patches.vllm_version()} before the "
                "model is built; it did not run in this worker (DPSERVE_DISABLE_PLUGIN=1?)"
            )
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
        from vllm.model_executor.utils import replace_parameter

        self.worker = worker
        model = worker.model_runner.model
        runners = [m for m in model.modules() if isinstance(m, MoERunner)]
        if not runners:
            raise RuntimeError("EPLB: the model has no MoE layers")
        cfg = runners[0].moe_config
        par = cfg.moe_parallel_config
        self.num_logical = int(cfg.num_experts)
        self.num_redundant = int(num_redundant)
        self.ep_size = int(par.ep_size) if par.use_ep else 1
        self.ep_rank = int(par.ep_rank) if par.use_ep else 0
        self.dp_size = int(worker.vllm_config.parallel_config.data_parallel_size)
        self.num_physical = self.num_logical + self.num_redundant
        if self.num_physical % self.ep_size:
            raise ValueError(f"{self.num_physical} slots not divisible by {self.ep_size} EP ranks")
        self.spr = self.num_physical // self.ep_size
        lne = self.num_logical // self.ep_size
        self.layers_per_step = max(1, int(layers_per_step))
        self.recorder = ExpertLoadRecorder(len(runners), self.num_logical)

        # Initial placement = what each rank loaded (linear blocks), extra slots replicate own experts.
        row = []
        for q in range(self.ep_size):
            row += [q * lne + j for j in range(lne)] + [q * lne + (j % lne) for j in range(self.spr - lne)]
        self.phy2log = np.tile(np.asarray(row, dtype=np.int64), (len(runners), 1))
        place = placement_from_phy2log(self.phy2log, self.num_logical)
        self.cap = self.num_redundant + 1  # most replicas an expert can ever have

        self.layers: list[_Layer] = []
        for i, runner in enumerate(runners):
            routed = runner.routed_experts
            if int(routed.local_num_experts) != lne:
                raise RuntimeError(f"layer {i}: {routed.local_num_experts} local experts, expected {lne}")
            if getattr(routed, "w13_bias", None) is not None or getattr(routed, "w2_bias", None) is not None:
                raise NotImplementedError("EPLB slots for MoE layers with expert biases")
            vmap = routed.expert_map
            if vmap is not None:  # check vLLM really loaded the linear block we assume
                own = torch.nonzero(vmap >= 0).flatten().tolist()
                if own != list(range(self.ep_rank * lne, (self.ep_rank + 1) * lne)):
                    raise RuntimeError(f"EPLB needs linear expert placement; rank holds {own}")
            extra = [j % lne for j in range(self.spr - lne)]
            for name in _WEIGHTS:
                w = getattr(routed, name)
                new = w.new_empty((self.spr, *w.shape[1:]))
                new[:lne].copy_(w.data)
                if extra:
                    new[lne:].copy_(w.data[extra])
                replace_parameter(routed, name, new)
            if self.ep_size > 1:
                # Physical id -> local row; static: slots never change rank, only their expert does.
                emap = torch.full((self.num_physical,), -1, dtype=torch.int32)
                lo = self.ep_rank * self.spr
                emap[lo : lo + self.spr] = torch.arange(self.spr, dtype=torch.int32)
                routed._buffers["_expert_map"] = emap
            log2phy = torch.full((self.num_logical, self.cap), -1, dtype=torch.int64)
            log2phy[:, : place.log2phy.shape[2]] = torch.from_numpy(place.log2phy[i])
            rc = torch.from_numpy(place.replica_count[i].copy())
            routing = LayerRouting(i, self.recorder, log2phy, rc)
            runner.router._dpserve_route = routing
            self.layers.append(_Layer(routed, runner.router, routing))

        self.bytes_per_expert = sum(
            getattr(self.layers[0].routed, n)[0].numel() * getattr(self.layers[0].routed, n).element_size()
            for n in _WEIGHTS
        )
        self.group = None
        self.group_ranks: list[int] = []
        if self.ep_size > 1:
            import torch.distributed as dist
            from vllm.distributed.parallel_state import get_ep_group

            # Collective over the default group: every worker calls setup at the same time (idle).
            self.group_ranks = list(get_ep_group().ranks)
            self.group = dist.new_group(
                ranks=self.group_ranks,
                backend="gloo",
                timeout=timedelta(seconds=TRANSFER_DEFAULTS["timeout_s"]),
            )
        self.steplog = StepLog()
        self.steplog.install(worker)
        self.steplog.on_end.append(self._on_step_end)
        self.main_tid = threading.get_native_id()
        self.transfer_tids: list[int] = []
        self.lock = threading.Lock()
        self.group_error: str | None = None  # a gloo error closed the transfer group's pair
        self.pending: _Pending | None = None
        self.history: list[dict] = []
        self.outcome_dir: str | None = None  # see set_outcome_dir
        self.last_plan_id = 0
        self.fail_next_transfer = False
        self.sync_steps = 0
        self.sync_steps_idle = 0
        self.sync_us = 0.0
        if self.dp_size > 1:
            from npu_runtime import eplb_hooks

            self._prep_worker()  # started here, not in the first plan's RPC
            eplb_hooks.register_step_sync(self)

    # ---- plans -----------------------------------------------------------------------------------
    def _check_start(self, msg: dict) -> tuple[np.ndarray, np.ndarray]:
        """The cheap checks (group size, stale start placement, both tables well-formed: vectorised): (old, new)
        phy2log. A malformed plan is rejected here, before anything moves; the op-level diff and checks
        (build_transfer_plan, validate_plan) are the heavy part."""
        old = np.asarray(msg["old"], dtype=np.int64)
        new = np.asarray(msg["new"], dtype=np.int64)
        if int(msg["num_ranks"]) != self.ep_size:
            raise PlanError(f"plan is for {msg['num_ranks']} EP ranks, this group has {self.ep_size}")
        if old.shape != self.phy2log.shape or not np.array_equal(old, self.phy2log):
            raise PlanError("plan starts from a placement this rank does not hold (stale plan)")
        check_pair(old, new, self.ep_size, self.num_logical)
        return old, new

    def _build_plan(self, old: np.ndarray, new: np.ndarray, opts: dict) -> tuple[TransferPlan, list]:
        """The heavy part: TransferPlan (diff + validation) and its pieces."""
        plan = build_transfer_plan(old, new, self.ep_size, self.num_logical)
        validate_plan(plan, self.num_logical)
        todo = _pieces(plan, self.ep_size, int(opts["slots_per_step"]), bool(opts["split_weights"]))
        if len(todo) >= 8192:  # their tags must stay inside the plan's tag range
            raise PlanError(f"{len(todo)} pieces: raise slots_per_step")
        return plan, todo

    def _prep_worker(self) -> queue.SimpleQueue:
        """The preparing thread's queue; the thread (daemon, "eplb-prep") is started on first use and then
        waits for work. Persistent because `Thread.start` blocks its caller - here the engine's stepping
        thread, inside `eplb_stage` - until the new thread has run (py-spy: 5-15 ms on 2 busy cores)."""
        q = getattr(self, "_prep_q", None)
        if q is None:
            q = self._prep_q = queue.SimpleQueue()

            def loop() -> None:
                _tune_staging_thread(int(TRANSFER_DEFAULTS["nice"]), int(TRANSFER_DEFAULTS["omp_threads"]))
                while True:
                    fn = q.get()
                    try:
                        fn()
                    except Exception:  # _prepare reports its own failures on the plan
                        logger.exception("EPLB: preparing thread")

            threading.Thread(target=loop, name="eplb-prep", daemon=True).start()
        return q

    def _prepare(self, p: _Pending, old: np.ndarray, new: np.ndarray) -> None:
        """Background preparation of an async plan (transfer option prepare="thread"): plan, pieces and,
        inline, every layer's exchange (receive buffers, commit tables). Sets p.prepared (the rank then
        contributes the id to the start agreement) or p.failed (every rank drops the plan at the next
        step's sums)."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        _tune_staging_thread(int(p.opts["nice"]), int(p.opts["omp_threads"]))
        try:
            p.plan, p.todo = self._build_plan(old, new, p.opts)
            if p.opts["inline"]:
                for layer in p.plan.layers():
                    if p.aborted:
                        return
                    p.exchanges[layer] = self._layout(p, layer)
            p.prepared = True
        except Exception as exc:  # reported through the step sync (the failed row)
            if not p.aborted:
                logger.warning("EPLB plan %d: preparation failed: %s", p.plan_id, exc)
                p.failed = f"{type(exc).__name__}: {exc}"
        finally:
            p.prep_ms = (time.perf_counter() - t0) * 1e3
            p.prep_cpu_ms = (time.thread_time() - cpu0) * 1e3

    def stage(self, msg: dict) -> dict:
        """Accept plan msg {"plan_id", "old", "new", "num_ranks", "blocking"?}; never blocks serving
        (DP > 1: transfers in a thread). Returns {"accepted", "error"?}."""
        plan_id = int(msg["plan_id"])
        if not 0 < plan_id < 40000:  # id^2 rides in an int32 all-reduce row
            return {"accepted": False, "error": f"plan_id {plan_id} outside (0, 40000)"}
        with self.lock:
            if plan_id <= self.last_plan_id:  # outcomes are reported by id: ids must be fresh
                return {
                    "accepted": False,
                    "error": f"plan_id {plan_id} not above the last one ({self.last_plan_id})",
                }
            self.last_plan_id = plan_id
            if self.pending is not None:
                return {"accepted": False, "error": f"plan {self.pending.plan_id} still pending"}
            opts = dict(TRANSFER_DEFAULTS)
            unknown = set(msg.get("transfer") or {}) - set(opts)
            if unknown:
                self._record(plan_id, "rejected", error=f"unknown transfer options {sorted(unknown)}")
                return {"accepted": False, "error": f"unknown transfer options {sorted(unknown)}"}
            opts.update(msg.get("transfer") or {})
            blocking = bool(msg.get("blocking", False))
            # Async plans on DP > 1 are prepared off the stepping thread (see TRANSFER_DEFAULTS["prepare"]).
            in_thread = self.dp_size > 1 and not blocking and opts["prepare"] == "thread"
            t0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                old, new = self._check_start(msg)
                plan, todo = (None, []) if in_thread else self._build_plan(old, new, opts)
            except (PlanError, ValueError, KeyError) as exc:
                self._record(plan_id, "rejected", error=str(exc))
                return {"accepted": False, "error": str(exc)}
            pending = _Pending(plan_id, plan, blocking=blocking, opts=opts)  # type: ignore[arg-type]
            pending.todo = todo
            pending.prepared = not in_thread
            if not in_thread:
                pending.prep_ms = (time.perf_counter() - t0) * 1e3
                pending.prep_cpu_ms = (time.thread_time() - cpu0) * 1e3
            self.pending = pending
        if self.dp_size == 1:
            # Single engine: this RPC runs between steps, so apply everything right here.
            self._transfer(pending)
            if pending.failed:
                self._finish(pending, "failed")
                return {"accepted": False, "error": pending.failed}
            t0 = time.perf_counter()
            for layer in plan.layers():
                self._commit_layer(pending, layer)
            pending.commit_ms.append((time.perf_counter() - t0) * 1e3)
            self._finish(pending, "committed")
            return {"accepted": True, "committed": True}
        if self.group_error:
            self._finish(pending, "rejected")
            return {"accepted": False, "error": f"transfer group unusable since: {self.group_error}"}
        if pending.blocking:
            pending.ready = True  # transfers happen at the agreed step, all ranks together
        if in_thread:  # a queue put: the RPC does not wait for the thread
            self._prep_worker().put(lambda: self._prepare(pending, old, new))
        # Async: staging starts only once every rank has accepted the plan (see on_sums), so every
        # p2p op posted has its peer: an unmatched gloo op can only end in the group's timeout, and
        # a timed-out gloo wait closes the pair for every later plan.
        return {"accepted": True, "committed": False}

    def _global(self, ep_rank: int) -> int:
        return self.group_ranks[ep_rank]

    def _on_step_end(self) -> None:
        """After every engine step: let a paced staging thread start its next layer."""
        p = self.pending
        if p is not None and not p.ready:
            p.step_done.set()

    def _transfer(self, p: _Pending) -> None:
        """Stage every layer of p from the OLD placement (p.staged); sets p.ready or p.failed.

        Runs in the staging thread (async) or inside the agreed step (stop-the-world). Per layer and
        rank pair one message per weight (rows gathered with one index_select), so the thread takes the
        GIL a few times per layer instead of a few times per expert: every torch call releases and
        re-takes the GIL, and each re-take waits for the forward pass's thread to let go of it. Async
        staging starts on every rank at one agreed step (on_sums), so every op has its peer; once
        started, the exchange always runs to its end (a dropped plan's results are discarded).
        """
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        background = threading.current_thread() is not threading.main_thread()
        opts = p.opts
        if background:
            self.transfer_tids = [*self.transfer_tids[-7:], threading.get_native_id()]
            _tune_staging_thread(int(opts["nice"]), int(opts["omp_threads"]))
        injected = self.fail_next_transfer  # fault injection for tests (eplb_fail_next_transfer)
        self.fail_next_transfer = False
        try:
            deadline = t0 + float(opts["timeout_s"])
            stage_layer = self._stage_layer_per_slot if opts["per_slot"] else self._stage_layer
            for layer in p.plan.layers():
                if background and opts["paced"]:
                    # At most one layer per engine step, started when a step ends (the first one when
                    # the agreeing step ends); soft (an idle group does not step): after PACE_WAIT_S
                    # it goes on regardless.
                    p.step_done.clear()
                    p.step_done.wait(PACE_WAIT_S)
                # Dropped meanwhile (a peer failed)? The exchange still runs to its end: the peers
                # posted their side of it, and an op left without its peer would hang until timeout.
                t_layer = time.perf_counter()
                p.staged[layer] = stage_layer(p, layer, deadline)
                p.layer_ms.append((layer, t_layer, time.perf_counter()))
            if injected:
                raise RuntimeError("injected transfer failure")
            p.t_ready = time.perf_counter()
            p.ready = True
        except Exception as exc:  # reported through the step sync: every rank drops the plan
            if p.aborted:  # already dropped everywhere (a peer failed, or abort): the late echo
                logger.info("EPLB plan %d: dropped plan's transfer ended: %s", p.plan_id, exc)
                return
            logger.exception("EPLB plan %d: transfer failed", p.plan_id)
            p.failed = f"{type(exc).__name__}: {exc}"
            if not injected and self.group is not None:  # a gloo error leaves the pair closed
                self.group_error = p.failed
        finally:
            p.stage_ms += (time.perf_counter() - t0) * 1e3
            p.stage_cpu_ms += (time.thread_time() - cpu0) * 1e3

    def _inline_step(self, p: _Pending) -> None:
        """Inline staging, one call per engine step on the main thread (inside the step's DP sync):
        complete the piece posted at the previous step, then post the next one; one piece in flight.

        gloo's `is_completed` stays false until `wait` (no non-blocking test exists), so the wait here
        is a real wait, but on ops every peer posted at the previous step boundary (they all passed
        this step's all-reduce since) whose bytes gloo's I/O threads moved during that step's forward:
        it returns in microseconds (`wait_ms` in the plan history). A hung peer is bounded by the
        transfer group's gloo timeout, as for the staging thread.
        """
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        try:
            if p.inflight is not None:
                done, p.inflight = p.inflight, None
                self._wait(done.works, p, 0.0)
                p.wait_ms.append((time.perf_counter() - t0) * 1e3)
                if not p.todo or p.todo[0][0] != done.layer:  # the layer's last piece
                    p.staged[done.layer] = p.exchanges.pop(done.layer).staged
                    p.layer_ms.append((done.layer, done.t_post, time.perf_counter()))
            if p.todo:
                layer, piece, weight = p.todo.pop(0)
                if layer not in p.exchanges:
                    p.exchanges[layer] = self._layout(p, layer)
                tag = p.plan_id * 32768 + 2 * p.seq  # unique per piece (pieces < 8192, checked at accept)
                p.seq += 1
                p.inflight = self._post_piece(
                    p, p.exchanges[layer], piece, int(p.opts["slots_per_step"]), tag, weight
                )
                return
            if p.injected:
                raise RuntimeError("injected transfer failure")
            p.t_ready = time.perf_counter()
            p.ready = True
        except Exception as exc:  # reported through the step sync: every rank drops the plan
            logger.exception("EPLB plan %d: inline transfer failed", p.plan_id)
            p.failed = f"{type(exc).__name__}: {exc}"
            p.inflight, p.todo = None, []
            if not p.injected and self.group is not None:  # a gloo error leaves the pair closed
                self.group_error = p.failed
        finally:
            p.stage_ms = ((p.t_ready or time.perf_counter()) - p.t_started) * 1e3  # wall, start to ready
            cpu = (time.thread_time() - cpu0) * 1e3
            p.stage_cpu_ms += cpu  # main-thread CPU of these steps
            p.inline_steps.append(((time.perf_counter() - t0) * 1e3, cpu))

    def _tag(self, p: _Pending, layer: int) -> int:
        # Unique for the worker's life (plan ids only grow, < 40000; layers < 16384): a dropped plan's
        # messages may stay posted on the group and must never match a later plan's.
        return p.plan_id * 32768 + layer * 2

    def _wait(self, works: list[Any], p: _Pending, deadline: float) -> None:
        """Block on the works (GIL released; gloo's `is_completed` stays false until `wait`). Every
        op has its peer (staging starts on every rank at one agreed step), the group's timeout
        bounds a hung peer."""
        for w in works:
            w.wait()

    def _stage_layer(self, p: _Pending, layer: int, deadline: float) -> _Staged:
        ex = self._layout(p, layer)
        posted = self._post_piece(p, ex, 0, 0, self._tag(p, layer))
        self._wait(posted.works, p, deadline)
        return ex.staged

    def _layout(self, p: _Pending, layer: int) -> _Exchange:
        """`layer`'s exchange on this rank: where each incoming row lands in the receive buffers, which
        rows go to each peer (plan order on both sides, so sender and receiver agree), the tables."""
        me, spr = self.ep_rank, self.spr
        w13, w2 = self.layers[layer].routed.w13_weight.data, self.layers[layer].routed.w2_weight.data
        incoming: dict[int, list[Any]] = {}  # source rank -> ops writing a slot of this rank, plan order
        outgoing: dict[int, list[int]] = {}  # destination rank -> rows this rank sends, plan order
        for op in p.plan.ops_by_layer[layer]:
            if op.dst_rank == me:
                incoming.setdefault(op.src_rank, []).append(op)
            elif op.src_rank == me:
                outgoing.setdefault(op.dst_rank, []).append(op.src_slot - me * spr)
        n = sum(len(v) for v in incoming.values())
        buf13 = w13.new_empty((n, *w13.shape[1:]))
        buf2 = w2.new_empty((n, *w2.shape[1:]))
        rows: list[int] = []
        recv: list[tuple[int, int, list[int]]] = []
        for src_rank in sorted(incoming):
            ops = incoming[src_rank]
            recv.append((src_rank, len(rows), [op.src_slot - src_rank * spr for op in ops]))
            rows += [op.dst_slot - me * spr for op in ops]
        return _Exchange(layer, self._staged(p, layer, rows, buf13, buf2), recv, sorted(outgoing.items()))

    def _post_piece(
        self, p: _Pending, ex: _Exchange, piece: int, slots: int, tag: int, weight: int = -1
    ) -> _Posted:
        """Post piece `piece` of a layer's exchange: rows [piece*slots, (piece+1)*slots) of every rank
        pair's list (all of them when slots == 0), of weight `weight` (0: w13, 1: w2, -1: both), as
        non-blocking gloo irecv/isend (a contiguous run of send rows is sent as a view of the weights,
        others gathered by one index_select per weight and peer; rows this rank keeps are copied at
        once). The receive buffers hold the rows once the works complete."""
        import torch.distributed as dist

        me, s = self.ep_rank, ex.staged
        routed = self.layers[ex.layer].routed
        pairs = [(routed.w13_weight.data, s.w13), (routed.w2_weight.data, s.w2)]  # (weights, receive buffer)
        which = [0, 1] if weight < 0 else [weight]
        works: list[Any] = []
        keep: list[torch.Tensor] = []  # send buffers stay alive until their works complete
        t_post = time.perf_counter()

        def span(k: int) -> tuple[int, int]:
            return (piece * slots, min(k, (piece + 1) * slots)) if slots else (0, k)

        for src_rank, at, src_rows in ex.recv:
            lo, hi = span(len(src_rows))
            if lo >= hi:
                continue
            if src_rank == me:
                r0 = _run_start(src_rows[lo:hi])
                idx = None if r0 is not None else torch.tensor(src_rows[lo:hi], dtype=torch.int64)
                for i in which:
                    w, buf = pairs[i]
                    if r0 is not None:  # a contiguous run: a plain copy, no index tensor
                        buf[at + lo : at + hi].copy_(w[r0 : r0 + hi - lo])
                    else:
                        torch.index_select(w, 0, idx, out=buf[at + lo : at + hi])
            else:
                peer = self._global(src_rank)
                for i in which:
                    buf = pairs[i][1][at + lo : at + hi]
                    works.append(dist.irecv(buf, src=peer, group=self.group, tag=tag + i))
                    p.remote_bytes += buf.numel() * buf.element_size()
        for dst_rank, out_rows in ex.send:
            lo, hi = span(len(out_rows))
            if lo >= hi:
                continue
            r0 = _run_start(out_rows[lo:hi])
            idx = None if r0 is not None else torch.tensor(out_rows[lo:hi], dtype=torch.int64)
            peer = self._global(dst_rank)
            for i in which:
                w = pairs[i][0]
                # A contiguous run (always, one slot per piece) is sent as a view of the live weights,
                # no copy: they change only at commit, after every piece of every layer completed.
                keep.append(w[r0 : r0 + hi - lo] if r0 is not None else w.index_select(0, idx))
                works.append(dist.isend(keep[-1], dst=peer, group=self.group, tag=tag + i))
        return _Posted(ex.layer, works, keep, t_post)

    def _stage_layer_per_slot(self, p: _Pending, layer: int, deadline: float) -> _Staged:
        """The first implementation's data path (one message and a few torch calls per moved slot),
        kept as a baseline for benchmarks/eplb_online.py (plan option transfer.per_slot)."""
        import torch.distributed as dist

        me, spr = self.ep_rank, self.spr
        w13, w2 = self.layers[layer].routed.w13_weight.data, self.layers[layer].routed.w2_weight.data
        n13 = w13[0].numel()
        works, rows, mine, keep = [], [], [], []
        for op in p.plan.ops_by_layer[layer]:
            p.slot_seq += 1
            k = self._tag(p, 0) + 16384 + p.slot_seq  # within the plan's tag range while < 16k ops
            if op.dst_rank == me:
                if op.src_rank == me:
                    src = op.src_slot - me * spr
                    buf = torch.cat([w13[src].reshape(-1), w2[src].reshape(-1)])
                else:
                    buf = torch.empty(n13 + w2[0].numel(), dtype=w13.dtype)
                    works.append(dist.irecv(buf, src=self._global(op.src_rank), group=self.group, tag=k))
                    p.remote_bytes += buf.numel() * buf.element_size()
                rows.append(op.dst_slot - me * spr)
                mine.append(buf)
            elif op.src_rank == me:
                src = op.src_slot - me * spr
                keep.append(torch.cat([w13[src].reshape(-1), w2[src].reshape(-1)]))
                works.append(dist.isend(keep[-1], dst=self._global(op.dst_rank), group=self.group, tag=k))
        self._wait(works, p, deadline)
        buf13 = torch.stack([b[:n13].view(w13.shape[1:]) for b in mine]) if mine else w13[:0].clone()
        buf2 = torch.stack([b[n13:].view(w2.shape[1:]) for b in mine]) if mine else w2[:0].clone()
        return self._staged(p, layer, rows, buf13, buf2)

    def _staged(
        self, p: _Pending, layer: int, rows: list[int], buf13: torch.Tensor, buf2: torch.Tensor
    ) -> _Staged:
        """Everything the commit of `layer` needs, prepared off the step path."""
        new_row = p.plan.new_phy2log[layer : layer + 1]
        place = placement_from_phy2log(new_row, self.num_logical)
        table = torch.full((self.num_logical, self.cap), -1, dtype=torch.int64)
        table[:, : place.log2phy.shape[2]] = torch.from_numpy(place.log2phy[0])
        rc = torch.from_numpy(place.replica_count[0].copy())
        return _Staged(torch.tensor(rows, dtype=torch.int64), buf13, buf2, table, rc, new_row[0].copy())

    def _commit_layer(self, p: _Pending, layer: int) -> None:
        """Staged rows -> weights (one index_copy_ per weight, in place), then the new tables (in
        place). Everything else was prepared while staging."""
        s = p.staged[layer]
        lay = self.layers[layer]
        if s.rows.numel():
            lay.routed.w13_weight.data.index_copy_(0, s.rows, s.w13)
            lay.routed.w2_weight.data.index_copy_(0, s.rows, s.w2)
        lay.routing.log2phy.copy_(s.table)
        lay.routing.replica_count.copy_(s.replica_count)
        self.phy2log[layer] = s.new_row

    def _finish(self, p: _Pending, outcome: str) -> None:
        layers = p.plan.layers() if p.plan is not None else []
        self._record(
            p.plan_id, outcome, error=p.failed, prep_ms=p.prep_ms, prep_cpu_ms=p.prep_cpu_ms,
            prepare=str(p.opts["prepare"]), stage_ms=p.stage_ms, stage_cpu_ms=p.stage_cpu_ms, commit_ms_total=sum(p.commit_ms),
            commit_ms_max_step=max(p.commit_ms, default=0.0), commit_steps=len(p.commit_ms),
            steps_waited=p.steps_waited, remote_bytes=p.remote_bytes, layers=len(layers),
            moved_slots=sum(len(p.plan.ops_by_layer[x]) for x in layers),
            total_ms=(time.perf_counter() - p.t_received) * 1e3, blocking=p.blocking,
            t_received=p.t_received, t_ready=p.t_ready, t_finished=time.perf_counter(),
            transfer_layers=[[lay, (a - p.t_received) * 1e3, (b - a) * 1e3] for lay, a, b in p.layer_ms],
            wait_ms=[round(x, 3) for x in p.wait_ms], inline=bool(p.opts["inline"]),
            inline_steps=[[round(a, 3), round(b, 3)] for a, b in p.inline_steps],
        )  # fmt: skip
        with self.lock:
            if self.pending is p:
                self.pending = None

    def _record(self, plan_id: int, outcome: str, **info: Any) -> None:
        self.history.append({"plan_id": plan_id, "outcome": outcome, **info})
        del self.history[:-20]
        if getattr(self, "outcome_dir", None):
            self._write_outcome(self.history[-1])

    def set_outcome_dir(self, path: str | None) -> str | None:
        """Also write every plan record to `path`/plan-<id>.json (atomically, the last 20 kept), so that
        whoever waits for a plan on this host (the rank actor, parent of the engine core) reads it from
        there instead of asking the engine (every call into it runs on its stepping thread between steps).
        Returns the directory in use: None when it cannot be written (then pollers ask the engine)."""
        self.outcome_dir = None
        if path:
            try:
                os.makedirs(path, exist_ok=True)
                probe = os.path.join(path, ".probe")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
                self.outcome_dir = path
            except OSError:
                logger.warning("EPLB: cannot write plan outcomes to %s; pollers ask the engine", path)
        return self.outcome_dir

    def _write_outcome(self, rec: dict) -> None:
        d = self.outcome_dir
        assert d is not None
        path = os.path.join(d, f"plan-{int(rec['plan_id'])}.json")
        try:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(rec, f, default=lambda o: o.item() if hasattr(o, "item") else str(o))
            os.replace(tmp, path)  # readers see the whole record or nothing
            written = self.__dict__.setdefault("_outcome_files", deque())
            written.append(path)
            while len(written) > 20:
                old = written.popleft()
                if old != path:
                    try:
                        os.remove(old)
                    except OSError:
                        pass
        except (OSError, TypeError, ValueError):
            # The rank falls back to asking the engine (eplb_outcome) for a plan whose file never comes.
            logger.exception("EPLB plan %s: could not write its outcome file", rec.get("plan_id"))

    def abort(self, plan_id: int) -> bool:
        """Drop pending plan `plan_id` unless it is already committing. Safe only when agreement is
        impossible (some rank rejected the plan): the EPLB actor calls it in exactly that case."""
        p = self.pending
        if p is None or p.plan_id != plan_id or p.commit_layers or p.started:
            return False
        p.aborted = True
        p.failed = p.failed or "aborted"
        self._finish(p, "aborted")
        return True

    # ---- per-step agreement (npu_runtime.eplb_hooks step-sync participant) ------------------------
    num_rows = 5  # accepted id, its square, ready id, its square, failed

    def contribute(self) -> list[int]:
        p = self.pending
        if p is None or p.commit_layers:
            return [0] * self.num_rows
        # Accepted = prepared: every rank starts at the step where all have contributed the id.
        acc = p.plan_id if p.prepared and not (p.blocking or p.started) else 0
        ready = p.plan_id if p.ready else 0
        return [acc, acc * acc, ready, ready * ready, 1 if p.failed else 0]

    def on_sums(self, sums: list[int], dp_size: int) -> None:
        t0 = time.perf_counter()
        self.sync_steps += 1
        p = self.pending
        log = self.steplog
        try:
            if p is None:
                return
            log.plan_id = p.plan_id
            if p.commit_layers:  # agreed earlier: continue committing, same layers on every rank
                log.state = STEP_COMMIT
                self._commit_step(p)
                return
            p.steps_waited += 1
            log.state = STEP_READY if p.ready else STEP_STAGING
            s_acc, s_acc_sq, s_id, s_sq, s_fail = sums
            if s_fail > 0:
                # Some rank failed to stage: every rank sees it at this step and keeps the old placement.
                log.state = STEP_DROP
                p.aborted = True
                p.failed = p.failed or "another rank failed to stage the plan"
                if p.inflight is not None and self.group_error is None:
                    # Inline staging stopped mid-exchange on a peer: this rank's posted piece may never
                    # be matched, and waiting on it would hold the engine until gloo's timeout.
                    self.group_error = f"a peer failed while plan {p.plan_id}'s exchange was in flight"
                p.inflight, p.todo = None, []
                self._finish(p, "failed")
                return
            if not (p.blocking or p.started):
                # All ranks accepted the same id (sum == n*id and n*sum(id^2) == sum(id)^2): staging
                # starts on every rank at this step; paced, its first layer when this step ends.
                if s_acc == dp_size * p.plan_id and s_acc_sq * dp_size == s_acc * s_acc:
                    p.started = True
                    p.t_started = time.perf_counter()
                    if p.opts["inline"]:  # the first piece is posted right here, before this forward
                        p.injected, self.fail_next_transfer = self.fail_next_transfer, False
                        self._inline_step(p)
                    else:
                        threading.Thread(
                            target=self._transfer, args=(p,), name="eplb-stage", daemon=True
                        ).start()
                elif time.perf_counter() - p.t_received > float(p.opts["timeout_s"]):
                    # A peer never got it: nothing was posted, drop it here alone.
                    p.failed = f"TimeoutError: not every rank accepted plan {p.plan_id} within {p.opts['timeout_s']} s"
                    log.state = STEP_DROP
                    self._finish(p, "failed")
                return
            if p.opts["inline"] and not (p.blocking or p.ready or p.failed):
                self._inline_step(p)
                return
            # All ranks ready with the same id: sum == n*id and n*sum(id^2) == sum(id)^2.
            if p.ready and s_id == dp_size * p.plan_id and s_sq * dp_size == s_id * s_id:
                log.state = STEP_COMMIT
                if p.blocking:  # stop-the-world: every rank is here, so the p2p pairs match
                    log.state = STEP_STW
                    p.ready = False
                    self._transfer(p)
                    if self.group is not None and self.group_error is None:
                        # Every rank is in this step: agree on the outcome before anyone commits.
                        import torch.distributed as dist

                        flag = torch.tensor([1 if p.failed else 0], dtype=torch.int32)
                        dist.all_reduce(flag, group=self.group)
                        if flag.item() and not p.failed:
                            p.failed = "another rank failed to stage the plan"
                    if p.failed:
                        self._finish(p, "failed")
                        return
                p.commit_layers = list(p.plan.layers()) or [-1]  # -1: a no-op plan still commits
                self._commit_step(p, all_layers=p.blocking)
        finally:
            if p is None:  # the steady-state cost of the agreement (plan steps cost their commit)
                self.sync_us += (time.perf_counter() - t0) * 1e6
                self.sync_steps_idle += 1
            else:
                log.stall_ms = (time.perf_counter() - t0) * 1e3

    def _commit_step(self, p: _Pending, all_layers: bool = False) -> None:
        t0 = time.perf_counter()
        n = len(p.commit_layers) if all_layers else self.layers_per_step
        todo, p.commit_layers = p.commit_layers[:n], p.commit_layers[n:]
        for layer in todo:
            if layer >= 0:
                self._commit_layer(p, layer)
        p.commit_ms.append((time.perf_counter() - t0) * 1e3)
        if not p.commit_layers:
            self._finish(p, "committed")

    # ---- reporting -------------------------------------------------------------------------------
    def outcome(self, plan_id: int) -> dict | None:
        """Plan `plan_id`'s history record, or None while it is pending (or unknown). The cheap poll for
        a plan's end: `status()` copies the whole history (up to 20 records with per-step lists) across
        the engine's RPC, and the engine core runs every RPC on its stepping thread between steps."""
        for h in reversed(self.history):
            if h["plan_id"] == plan_id:
                return h
        return None

    def status(self) -> dict:
        p = self.pending
        return {
            "pid": os.getpid(),
            "main_tid": self.main_tid,
            "transfer_tids": list(self.transfer_tids),
            "ep_rank": self.ep_rank,
            "ep_size": self.ep_size,
            "dp_size": self.dp_size,
            "num_logical": self.num_logical,
            "num_physical": self.num_physical,
            "slots_per_rank": self.spr,
            "bytes_per_expert": self.bytes_per_expert,
            "pending": None
            if p is None
            else {
                "plan_id": p.plan_id,
                "ready": p.ready,
                "failed": p.failed,
                "committing": len(p.commit_layers),
            },
            "history": list(self.history),
            "outcome_dir": getattr(self, "outcome_dir", None),
            "staging_threads": sum(1 for t in threading.enumerate() if t.name == "eplb-stage"),
            "sync_steps": self.sync_steps,
            "sync_us_per_step": self.sync_us / self.sync_steps_idle if self.sync_steps_idle else 0.0,
        }


_STATE: EplbWorkerState | None = None


class EplbWorkerExtension:
    """Mixed into vLLM's worker (engine arg `worker_extension_cls="eplb.applier.EplbWorkerExtension"`).

    Every method runs in the worker process; reach them with `collective_rpc("eplb_...")`. Return
    values are plain lists/dicts so they cross vLLM's msgpack RPC.
    """

    def eplb_setup(
        self, num_redundant: int = 0, layers_per_step: int = 1, outcome_dir: str | None = None
    ) -> dict:
        """Enlarge weights to physical slots and install the routing tables (idempotent). Must run on
        every rank while the group is idle with its DP wave ended (it creates a process group, a
        collective that deadlocks against a peer still inside a step's all-reduce; see
        deployments.rank_group.wait_group_idle) and adds rows to the per-step DP all-reduce. `outcome_dir`:
        also write plan records there (see EplbWorkerState.set_outcome_dir; status["outcome_dir"])."""
        global _STATE
        if _STATE is None:
            _STATE = EplbWorkerState(self, num_redundant, layers_per_step)
        if outcome_dir is not None:
            _STATE.set_outcome_dir(outcome_dir)
        return self.eplb_status()

    def eplb_dp_steps(self) -> int:
        """DP steps this worker has taken part in, dummy batches included (available before
        eplb_setup: the rank group waits for it to stop moving before calling setup)."""
        from npu_runtime.eplb_hooks import dp_steps

        return dp_steps()

    def eplb_take_load(self) -> dict:
        """Drain recorded counts: {"counts": [[...]] int [layers, E], "steps", "record_us_per_call"}."""
        assert _STATE is not None, "eplb_setup first"
        return _STATE.recorder.take()

    def eplb_placement(self) -> list[list[int]]:
        """phy2log int [layers, E + R] in force now."""
        assert _STATE is not None, "eplb_setup first"
        return _STATE.phy2log.tolist()

    def eplb_stage(self, msg: dict) -> dict:
        assert _STATE is not None, "eplb_setup first"
        return _STATE.stage(msg)

    def eplb_abort(self, plan_id: int) -> bool:
        return _STATE.abort(int(plan_id)) if _STATE is not None else False

    def eplb_status(self) -> dict:
        return _STATE.status() if _STATE is not None else {"enabled": False}

    def eplb_outcome(self, plan_id: int) -> dict | None:
        """Plan `plan_id`'s history record (as in `eplb_status()["history"]`), None while pending:
        the small reply to poll a plan's end with (the full status is a much larger message)."""
        return _STATE.outcome(int(plan_id)) if _STATE is not None else None

    def eplb_step_log(self, since: float = 0.0) -> list[list[float]]:
        """Engine-side step times since perf_counter `since` (see StepLog for the fields)."""
        assert _STATE is not None, "eplb_setup first"
        return [list(e) for e in _STATE.steplog.since(float(since))]

    def eplb_thread_cpu(self) -> dict[str, dict]:
        """CPU time of every thread of this worker process (see thread_cpu_ms); keys are tids."""
        return {str(k): v for k, v in thread_cpu_ms().items()}

    def eplb_fail_next_transfer(self) -> bool:
        """Fault injection (tests): this rank's next staging raises, as a broken peer link would."""
        assert _STATE is not None, "eplb_setup first"
        _STATE.fail_next_transfer = True
        return True

    def eplb_set_recording(self, enabled: bool) -> bool:
        assert _STATE is not None, "eplb_setup first"
        _STATE.recorder.enabled = bool(enabled)
        return _STATE.recorder.enabled
