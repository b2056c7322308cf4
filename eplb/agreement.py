"""Applying a plan on one worker: accept, the per-step agreement with the other DP ranks, commit.

The plan's way from the EPLB actor to here: docs/design.md, "An EPLB plan".

0. Accept: `stage` (an RPC on the engine's stepping thread) does only the cheap checks (id, options,
   group size, stale start placement, well-formed tables); an async plan is then prepared on a
   background thread (nice 19, one OpenMP thread: TransferPlan diff and validation, pieces, every
   layer's exchange layout, receive buffers and commit tables; transfer option `prepare`: "step" does
   it all in the RPC), and the rank counts as having accepted the plan only once that is done (a plan
   failing there is dropped by every rank through the failed row below). When DP > 1, every step's DP
   padding all-reduce carries [accepted_id, id^2, ready_id, id^2, failed] (npu_runtime.eplb_hooks);
   all ranks see the same sums at the same step. Staging starts on every rank at the step where all
   accepted the same id, so every p2p op has its peer (a plan a peer never got is dropped after
   `timeout_s` with nothing posted).
1. Stage: one of the data paths of eplb.exchange (inline pieces at step boundaries by default).
2. Agree: all ready with the same id -> every rank starts committing at that step; any failure ->
   every rank drops the plan (old placement stays everywhere). Inline, a rank whose exchange fails
   stops posting; its peers see that in the next step's sums before they wait, drop the plan and mark
   the transfer group unusable (their last posted piece has no peer), never blocking the step.
3. Commit: `layers_per_step` layers per step: one index_copy_ per weight, then the tables.
   Every rank does layer k at the same step, so gathered tokens never see mixed tables.
With DP == 1 there is nobody to agree with: stage and commit happen inside the RPC, between steps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from eplb.exchange import Exchanger, piece_bytes, pieces
from eplb.messages import TRANSFER_DEFAULTS, PlanMessage
from eplb.outcomes import OutcomeLog, plan_record
from eplb.pending import PendingPlan
from eplb.plan import PlanError, TransferPlan, build_transfer_plan, check_pair, validate_plan
from eplb.slots import ModelSlots
from eplb.steplog import STEP_COMMIT, STEP_DROP, STEP_READY, STEP_STAGING, STEP_STW, StepLog
from eplb.threads import BackgroundQueue, tune_staging_thread

logger = logging.getLogger("dpserve.eplb.applier")


def ep_transfer_group(ep_size: int, backend: str) -> tuple[Any, list[int]]:
    """The process group expert transfers use: vLLM's EP ranks over `backend`, or (None, []) without
    EP. A collective over the default group: every worker calls it at the same time (set-up, idle)."""
    if ep_size <= 1:
        return None, []
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_ep_group

    ranks = list(get_ep_group().ranks)
    group = dist.new_group(
        ranks=ranks, backend=backend, timeout=timedelta(seconds=TRANSFER_DEFAULTS["timeout_s"])
    )
    return group, ranks


class EplbWorkerState:
    """All EPLB state of one worker process: its slots, exchange, agreement and outcome records.

    Built from plain data (tests: `slots` over any tensors, `exchanger` over any gloo group) or from a
    vLLM worker by `from_worker`, which also installs the hooks.
    """

    # Step-sync rows: accepted id, its square, ready id, its square, failed, last step's compute (µs).
    num_rows = 6

    def __init__(
        self,
        slots: ModelSlots,
        dp_size: int = 1,
        exchanger: Exchanger | None = None,
        layers_per_step: int = 1,
        steplog: StepLog | None = None,
        outcomes: OutcomeLog | None = None,
    ) -> None:
        self.slots = slots
        self.dp_size = int(dp_size)
        self.exchanger = exchanger or Exchanger(slots)
        self.layers_per_step = max(1, int(layers_per_step))
        self.steplog = steplog or StepLog()
        self.steplog.on_end.append(self._on_step_end)
        self.outcomes = outcomes or OutcomeLog()
        self.prep = BackgroundQueue(
            "eplb-prep", int(TRANSFER_DEFAULTS["nice"]), int(TRANSFER_DEFAULTS["omp_threads"])
        )
        self.main_tid = threading.get_native_id()
        self.lock = threading.Lock()
        self.pending: PendingPlan | None = None
        self.last_plan_id = 0
        self.sync_steps = 0
        self.sync_steps_idle = 0
        self.sync_us = 0.0

    @classmethod
    def from_worker(cls, worker: Any, num_redundant: int, layers_per_step: int = 1) -> EplbWorkerState:
        """Model surgery on a vLLM worker (eplb.slots), its transfer group, step timing and the
        per-step agreement hook. A collective: every worker of the group calls it at the same time."""
        from npu_runtime import vllm_patches

        # The model surgery below and the routing / step-sync hooks need vLLM's symbols as
        # npu_runtime.vllm_patches declares them, patched before the model was built (by the plugin).
        vllm_patches.require("eplb")
        if "eplb" not in vllm_patches.installed():
            raise vllm_patches.VllmPatchError(
                f"EPLB needs dpserve's vLLM plugin to patch vLLM {vllm_patches.vllm_version()} before the "
                "model is built; it did not run in this worker (DPSERVE_DISABLE_PLUGIN=1?)"
            )
        slots = ModelSlots.from_model(worker, num_redundant)
        group, group_ranks = ep_transfer_group(slots.ep_size, "gloo")
        steplog = StepLog()
        steplog.install(worker)
        dp_size = int(worker.vllm_config.parallel_config.data_parallel_size)
        state = cls(slots, dp_size, Exchanger(slots, group, group_ranks), layers_per_step, steplog)
        if dp_size > 1:
            from npu_runtime import eplb_hooks

            state.prep.start()  # started here, not in the first plan's RPC
            eplb_hooks.register_step_sync(state)
        return state

    # ---- accepting a plan ------------------------------------------------------------------------
    def _check_start(self, msg: PlanMessage) -> tuple[np.ndarray, np.ndarray]:
        """The cheap checks (group size, stale start placement, both tables well-formed: vectorised): (old, new)
        phy2log. A malformed plan is rejected here, before anything moves; the op-level diff and checks
        (build_transfer_plan, validate_plan) are the heavy part."""
        s = self.slots
        old = np.asarray(msg.old, dtype=np.int64)
        new = np.asarray(msg.new, dtype=np.int64)
        if msg.num_ranks != s.ep_size:
            raise PlanError(f"plan is for {msg.num_ranks} EP ranks, this group has {s.ep_size}")
        if old.shape != s.phy2log.shape or not np.array_equal(old, s.phy2log):
            raise PlanError("plan starts from a placement this rank does not hold (stale plan)")
        check_pair(old, new, s.ep_size, s.num_logical)
        return old, new

    def _build_plan(
        self, old: np.ndarray, new: np.ndarray, opts: dict
    ) -> tuple[TransferPlan, list[tuple[int, int, int]], list[float]]:
        """The heavy part: TransferPlan (diff + validation), its pieces and, with fit_step, the
        seconds each piece is expected to take (piece_latency_ms plus its busiest rank pair's bytes at
        link_gb_per_s)."""
        s = self.slots
        plan = build_transfer_plan(old, new, s.ep_size, s.num_logical)
        validate_plan(plan, s.num_logical)
        slots, split = int(opts["slots_per_step"]), bool(opts["split_weights"])
        todo = pieces(plan, s.ep_size, slots, split)
        if len(todo) >= 8192:  # their tags must stay inside the plan's tag range
            raise PlanError(f"{len(todo)} pieces: raise slots_per_step")
        todo_s: list[float] = []
        if opts["fit_step"] and todo:
            rate, latency = float(opts["link_gb_per_s"]) * 1e9, float(opts["piece_latency_ms"]) / 1e3
            w13, w2 = s.weights(todo[0][0])
            slot_bytes = (w13[0].numel() * w13.element_size(), w2[0].numel() * w2.element_size())
            todo_s = [latency + b / rate for b in piece_bytes(plan, s.ep_size, slots, split, slot_bytes)]
        return plan, todo, todo_s

    def _prepare(self, p: PendingPlan, old: np.ndarray, new: np.ndarray) -> None:
        """Background preparation of an async plan (transfer option prepare="thread"): plan, pieces and,
        inline, every layer's exchange (receive buffers, commit tables). Sets p.prepared (the rank then
        contributes the id to the start agreement) or p.failed (every rank drops the plan at the next
        step's sums)."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        tune_staging_thread(int(p.opts["nice"]), int(p.opts["omp_threads"]))
        try:
            p.plan, p.todo, p.todo_s = self._build_plan(old, new, p.opts)
            if p.opts["inline"]:
                for layer in p.plan.layers():
                    if p.aborted:
                        return
                    p.exchanges[layer] = self.exchanger.layout(p, layer)
            p.prepared = True
        except Exception as exc:  # reported through the step sync (the failed row)
            if not p.aborted:
                logger.warning("EPLB plan %d: preparation failed: %s", p.plan_id, exc)
                p.failed = f"{type(exc).__name__}: {exc}"
        finally:
            p.prep_ms = (time.perf_counter() - t0) * 1e3
            p.prep_cpu_ms = (time.thread_time() - cpu0) * 1e3

    def stage(self, msg: PlanMessage) -> dict:
        """Accept plan `msg`; never blocks serving (DP > 1: the exchange runs over later steps).
        Returns {"accepted", "committed"?, "error"?}."""
        plan_id = msg.plan_id
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
            try:
                opts = msg.options()
            except PlanError as exc:
                self.outcomes.record(plan_id, "rejected", error=str(exc))
                return {"accepted": False, "error": str(exc)}
            # Async plans on DP > 1 are prepared off the stepping thread (see TRANSFER_DEFAULTS["prepare"]).
            in_thread = self.dp_size > 1 and not msg.blocking and opts["prepare"] == "thread"
            t0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                old, new = self._check_start(msg)
                plan, todo, todo_s = (None, [], []) if in_thread else self._build_plan(old, new, opts)
            except (PlanError, ValueError, KeyError) as exc:
                self.outcomes.record(plan_id, "rejected", error=str(exc))
                return {"accepted": False, "error": str(exc)}
            pending = PendingPlan(plan_id, plan, blocking=msg.blocking, opts=opts)  # type: ignore[arg-type]
            pending.todo, pending.todo_s = todo, todo_s
            pending.prepared = not in_thread
            if not in_thread:
                pending.prep_ms = (time.perf_counter() - t0) * 1e3
                pending.prep_cpu_ms = (time.thread_time() - cpu0) * 1e3
            self.pending = pending
        if self.dp_size == 1:
            # Single engine: this RPC runs between steps, so apply everything right here.
            self.exchanger.transfer(pending)
            if pending.failed:
                self._finish(pending, "failed")
                return {"accepted": False, "error": pending.failed}
            t0 = time.perf_counter()
            for layer in plan.layers():
                self._commit_layer(pending, layer)
            pending.commit_ms.append((time.perf_counter() - t0) * 1e3)
            self._finish(pending, "committed")
            return {"accepted": True, "committed": True}
        if self.exchanger.group_error:
            self._finish(pending, "rejected")
            return {
                "accepted": False,
                "error": f"transfer group unusable since: {self.exchanger.group_error}",
            }
        if pending.blocking:
            pending.ready = True  # transfers happen at the agreed step, all ranks together
        if in_thread:  # a queue put: the RPC does not wait for the thread
            self.prep.put(lambda: self._prepare(pending, old, new))
        # Async: staging starts only once every rank has accepted the plan (see on_sums), so every
        # p2p op posted has its peer: an unmatched gloo op can only end in the group's timeout, and
        # a timed-out gloo wait closes the pair for every later plan.
        return {"accepted": True, "committed": False}

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

    def _on_step_end(self) -> None:
        """After every engine step: let a paced staging thread start its next layer."""
        p = self.pending
        if p is not None and not p.ready:
            p.step_done.set()

    # ---- per-step agreement (npu_runtime.eplb_hooks step-sync participant) ------------------------
    def contribute(self) -> list[int]:
        p = self.pending
        if p is None or p.commit_layers:
            return [0] * self.num_rows
        # Accepted = prepared: every rank starts at the step where all have contributed the id.
        acc = p.plan_id if p.prepared and not (p.blocking or p.started) else 0
        ready = p.plan_id if p.ready else 0
        return [acc, acc * acc, ready, ready * ready, 1 if p.failed else 0, self._last_step_us()]

    def _last_step_us(self) -> int:
        """This rank's previous engine step without its EPLB work at the agreement point (µs), kept
        small enough that the group's sum fits the int32 row."""
        if not self.steplog.entries:
            return 0
        e = self.steplog.entries[-1]  # (t_start, exec_ms, step_ms, tokens, reqs, state, plan_id, stall_ms)
        us = max(0.0, (e[2] - e[7]) * 1e3)
        return int(min(us, 5e6, (2**31 - 1) // max(1, self.dp_size)))

    def on_sums(self, sums: list[int], dp_size: int) -> None:
        t0 = time.perf_counter()
        self.sync_steps += 1
        p = self.pending
        log = self.steplog
        ex = self.exchanger
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
            s_acc, s_acc_sq, s_id, s_sq, s_fail, s_step_us = sums
            step_s = s_step_us / dp_size / 1e6  # the ranks' mean: the same on every rank
            if s_fail > 0:
                # Some rank failed to stage: every rank sees it at this step and keeps the old placement.
                log.state = STEP_DROP
                p.aborted = True
                p.failed = p.failed or "another rank failed to stage the plan"
                if p.inflight and ex.group_error is None:
                    # Inline staging stopped mid-exchange on a peer: this rank's posted piece may never
                    # be matched, and waiting on it would hold the engine until gloo's timeout.
                    ex.group_error = f"a peer failed while plan {p.plan_id}'s exchange was in flight"
                p.inflight, p.todo, p.todo_s = [], [], []
                self._finish(p, "failed")
                return
            if not (p.blocking or p.started):
                # All ranks accepted the same id (sum == n*id and n*sum(id^2) == sum(id)^2): staging
                # starts on every rank at this step; paced, its first layer when this step ends.
                if s_acc == dp_size * p.plan_id and s_acc_sq * dp_size == s_acc * s_acc:
                    p.started = True
                    p.t_started = time.perf_counter()
                    if p.opts["inline"]:  # the first piece is posted right here, before this forward
                        p.injected, ex.fail_next_transfer = ex.fail_next_transfer, False
                        ex.inline_step(p, step_s)
                    else:
                        threading.Thread(
                            target=ex.transfer, args=(p,), name="eplb-stage", daemon=True
                        ).start()
                elif time.perf_counter() - p.t_received > float(p.opts["timeout_s"]):
                    # A peer never got it: nothing was posted, drop it here alone.
                    p.failed = f"TimeoutError: not every rank accepted plan {p.plan_id} within {p.opts['timeout_s']} s"
                    log.state = STEP_DROP
                    self._finish(p, "failed")
                return
            if p.opts["inline"] and not (p.blocking or p.ready or p.failed):
                ex.inline_step(p, step_s)
                return
            # All ranks ready with the same id: sum == n*id and n*sum(id^2) == sum(id)^2.
            if p.ready and s_id == dp_size * p.plan_id and s_sq * dp_size == s_id * s_id:
                log.state = STEP_COMMIT
                if p.blocking:  # stop-the-world: every rank is here, so the p2p pairs match
                    log.state = STEP_STW
                    p.ready = False
                    ex.transfer(p)
                    if ex.group is not None and ex.group_error is None:
                        # Every rank is in this step: agree on the outcome before anyone commits.
                        import torch.distributed as dist

                        flag = torch.tensor([1 if p.failed else 0], dtype=torch.int32)
                        dist.all_reduce(flag, group=ex.group)
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

    # ---- commit ----------------------------------------------------------------------------------
    def _commit_layer(self, p: PendingPlan, layer: int) -> None:
        """Staged rows -> weights, then the new tables (everything else was prepared while staging)."""
        s = p.staged[layer]
        self.slots.commit(layer, s.rows, s.w13, s.w2, s.table, s.replica_count, s.new_row)

    def _commit_step(self, p: PendingPlan, all_layers: bool = False) -> None:
        t0 = time.perf_counter()
        n = len(p.commit_layers) if all_layers else self.layers_per_step
        todo, p.commit_layers = p.commit_layers[:n], p.commit_layers[n:]
        for layer in todo:
            if layer >= 0:
                self._commit_layer(p, layer)
        p.commit_ms.append((time.perf_counter() - t0) * 1e3)
        if not p.commit_layers:
            self._finish(p, "committed")

    def _finish(self, p: PendingPlan, outcome: str) -> None:
        self.outcomes.record(p.plan_id, outcome, **plan_record(p))
        with self.lock:
            if self.pending is p:
                self.pending = None

    # ---- reporting -------------------------------------------------------------------------------
    def outcome(self, plan_id: int) -> dict | None:
        """Plan `plan_id`'s record, or None while it is pending (or unknown). The cheap poll for a
        plan's end: `status()` copies the whole history (up to 20 records with per-step lists) across
        the engine's RPC, and the engine core runs every RPC on its stepping thread between steps."""
        return self.outcomes.outcome(plan_id)

    def status(self) -> dict:
        p, s = self.pending, self.slots
        return {
            "pid": os.getpid(),
            "main_tid": self.main_tid,
            "transfer_tids": list(self.exchanger.transfer_tids),
            "ep_rank": s.ep_rank,
            "ep_size": s.ep_size,
            "dp_size": self.dp_size,
            "num_logical": s.num_logical,
            "num_physical": s.num_physical,
            "slots_per_rank": s.spr,
            "bytes_per_expert": s.bytes_per_expert,
            "pending": None
            if p is None
            else {
                "plan_id": p.plan_id,
                "ready": p.ready,
                "failed": p.failed,
                "committing": len(p.commit_layers),
            },
            "history": list(self.outcomes.records),
            "outcome_dir": self.outcomes.outcome_dir,
            "staging_threads": sum(1 for t in threading.enumerate() if t.name == "eplb-stage"),
            "sync_steps": self.sync_steps,
            "sync_us_per_step": self.sync_us / self.sync_steps_idle if self.sync_steps_idle else 0.0,
        }
