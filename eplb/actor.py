"""The EPLB actor: pulls load windows from the ranks, plans off the serving path, pushes plans.

`EplbController` is a plain class (unit-testable with fake ranks); `EplbActor` is it as a Ray actor.
A background thread runs `cycle()` every `interval_s`:

1. pull every rank's window (`rank.eplb_collect()`; each rank drains its worker's counters into
   its LoadWindow). Under the all-gather MoE every rank counts all tokens, so the ranks' windows are
   averaged (scale does not matter to the policies, only proportions do);
2. once the window covers `window_steps` engine steps (`first_window_steps` until the first plan is
   committed: eplb.pacing.plan_due, the rule the simulator calls too): run the policy
   (eplb.policies.rebalance) with the ranks' current placement; a policy that raises is logged,
   counted and skipped;
3. commit only if it gains enough: sum over layers of the max rank load must fall below
   `threshold` (0.95, vllm-ascend) x the current one;
4. build and validate the TransferPlan (eplb.plan), push it to every rank (`eplb_stage`: the
   ranks stage in the background and switch together, see eplb.agreement), wait for every rank to
   report the outcome (`rank.eplb_outcome_local(plan_id, outcome_wait_s)`: the rank waits for the
   record in the file its worker writes when the plan ends, no call into the engine, whose stepping
   thread runs every call between steps; polled again after `poll_interval_s` if it is not there),
   then export metrics and reset the windows.

Serving never waits on any of this: the ranks only ever receive short RPCs.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

import numpy as np

from eplb.messages import PlanMessage
from eplb.pacing import plan_due
from eplb.plan import PlanError, build_transfer_plan, validate_plan
from eplb.policies import rebalance
from eplb.stats import imbalance, rank_imbalance, rank_loads
from npu_runtime import metric_names as names

logger = logging.getLogger("dpserve.eplb.actor")

DEFAULTS: dict[str, Any] = {
    "policy": "swift",
    "params": {},
    "num_redundant": 0,
    "window_steps": 1000,
    # The first plan's window (None: a full window_steps). A group starts on the start-up placement
    # with every rank prefilling, the steps where imbalance costs most: a short first window lets the
    # first plan land inside them (benchmarks/results/sim_eplb_gap_note.md).
    "first_window_steps": None,
    "interval_s": 5.0,
    "threshold": 0.95,
    "plan_timeout_s": 120.0,
    # Seconds between polls of the ranks for a pushed plan's outcome (`eplb_outcome_local`: a file read
    # in the rank actor; it asks the engine - an RPC on the stepping thread - only when there is no file).
    "poll_interval_s": 0.2,
    # Each poll waits in the rank up to this long for the outcome file (one call per plan and rank
    # instead of one per poll_interval_s: every call wakes processes on the cores the forwards run on).
    "outcome_wait_s": 5.0,
    "blocking": False,  # stop-the-world application (for comparison benchmarks)
    # How the ranks stage each plan: overrides of eplb.messages.TRANSFER_DEFAULTS sent with it.
    "transfer": {},
}


class _Metrics:
    """ray.util.metrics instruments (names from npu_runtime.metric_names); no-ops outside Ray."""

    def __init__(self) -> None:
        try:
            from ray.util import metrics

            self.imbalance = metrics.Gauge(names.EPLB_IMBALANCE, "per-layer expert load imbalance",
                                           tag_keys=("layer", "phase"))  # fmt: skip
            self.rebalances = metrics.Counter(names.EPLB_REBALANCES_TOTAL, "expert placements committed")
            self.duration = metrics.Histogram(names.EPLB_REBALANCE_DURATION_MS, "plan + apply time (ms)",
                                              boundaries=[1, 5, 10, 50, 100, 500, 1000, 5000, 20000])  # fmt: skip
            self.bytes_moved = metrics.Counter(names.EPLB_BYTES_MOVED_TOTAL, "expert weight bytes moved")
        except Exception:  # no Ray worker context (plain unit use)
            self.imbalance = self.rebalances = self.duration = self.bytes_moved = None

    def imbalance_per_layer(self, values: np.ndarray, phase: str) -> None:
        if self.imbalance is not None:
            for layer, v in enumerate(values.tolist()):
                self.imbalance.set(float(v), tags={"layer": str(layer), "phase": phase})

    def committed(self, duration_ms: float, remote_bytes: int) -> None:
        if self.rebalances is not None:
            self.rebalances.inc()
            self.duration.observe(duration_ms)
            if remote_bytes:
                self.bytes_moved.inc(remote_bytes)


class EplbController:
    """Plans and pushes placements for one rank group.

    ranks: handles with `eplb_collect()`, `eplb_reset_window()`, `eplb_outcome_local(plan_id)` and
    `eplb_call(method, *args)` (the
    DPRank actor's EPLB methods); config: DEFAULTS keys.
    """

    def __init__(self, ranks: list[Any], config: dict[str, Any] | None = None) -> None:
        self.ranks = list(ranks)
        self.config = {**DEFAULTS, **(config or {})}
        self.metrics = _Metrics()
        self.current: np.ndarray | None = None  # phy2log int64 [layers, P] the ranks hold
        self.num_logical = 0
        self.num_ranks = 1
        self.bytes_per_expert = 0
        self._next_plan_id = 1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.state: dict[str, Any] = {
            "phase": "created",
            "cycles": 0,
            "window_steps": 0,
            "rebalances": 0,
            "skipped_no_gain": 0,
            "policy_failures": 0,
            "plan_failures": 0,
            "last_error": None,
            "last_plan": None,
            "imbalance": None,
            "measured_imbalance": None,
            "history": [],
        }

    # ---- lifecycle -------------------------------------------------------------------------------
    def _get(self, refs: Any) -> Any:
        import ray

        return ray.get(refs)

    def initialize(self) -> dict[str, Any]:
        """Learn sizes and the placement the ranks hold (all ranks must agree)."""
        placements = self._get([r.eplb_call.remote("eplb_placement") for r in self.ranks])
        first = np.asarray(placements[0], dtype=np.int64)
        if any(not np.array_equal(first, np.asarray(p)) for p in placements[1:]):
            raise RuntimeError("ranks disagree on the expert placement")
        statuses = self._get([r.eplb_call.remote("eplb_status") for r in self.ranks])
        status = statuses[0]
        # Plan ids must be new to every rank: outcomes are looked up by id in the ranks' histories.
        seen = [int(h["plan_id"]) for s in statuses for h in s.get("history", [])]
        self._next_plan_id = max([self._next_plan_id - 1, *seen]) + 1
        self.current = first
        self.num_logical = int(status["num_logical"])
        self.num_ranks = int(status["ep_size"])
        self.bytes_per_expert = int(status["bytes_per_expert"])
        self.state["phase"] = "collecting"
        return self.get_state()

    def start(self) -> dict[str, Any]:
        """Initialize if needed and run `cycle()` every interval_s in a background thread."""
        if self.current is None:
            self.initialize()
        if self._thread is None:
            self._stop.clear()  # a start after stop() runs again
            self._thread = threading.Thread(target=self._loop, name="eplb-controller", daemon=True)
            self._thread.start()
        return self.get_state()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(float(self.config["interval_s"])):
            try:
                self.cycle()
            except Exception as exc:  # never let the balancer die silently: keep going, report it
                logger.exception("EPLB cycle failed")
                self.state["last_error"] = f"cycle: {type(exc).__name__}: {exc}"

    # ---- one cycle -------------------------------------------------------------------------------
    def cycle(self) -> str:
        """Pull windows; plan/commit when a window is complete. Returns what happened."""
        with self._lock:
            self.state["cycles"] += 1
            windows = self._get([r.eplb_collect.remote() for r in self.ranks])
            load = np.mean([np.asarray(w["load"], dtype=np.float64) for w in windows], axis=0)
            steps = min(int(w["steps"]) for w in windows)
            self.state["window_steps"] = steps
            self.state["record_us_per_call"] = max(float(w.get("record_us_per_call", 0.0)) for w in windows)
            if all("rank_load" in w for w in windows):
                # Per layer, max/mean of what the ranks ran over the window (physical-slot counts):
                # unlike `imbalance`, it does not assume a replicated expert's tokens split evenly.
                ran = np.mean([np.asarray(w["rank_load"], dtype=np.float64) for w in windows], axis=0)
                self.state["measured_imbalance"] = rank_imbalance(ran).tolist()
            first = self.config["first_window_steps"]
            due = plan_due(steps, int(self.config["window_steps"]),
                           None if first is None else int(first), int(self.state["rebalances"]))  # fmt: skip
            if not due or load.sum() <= 0:
                return "collecting"
            return self._rebalance(load)

    def _rebalance(self, load: np.ndarray) -> str:
        t0 = time.perf_counter()
        cfg = self.config
        # Plan from what the ranks hold now: a plan that timed out here (an idle DP group does not
        # step, so it cannot commit) may have committed since, and a pending one must finish first.
        statuses = self._get([r.eplb_call.remote("eplb_status") for r in self.ranks])
        if any(st.get("pending") for st in statuses):
            return "plan_pending"
        placements = [np.asarray(p, dtype=np.int64) for p in self._get([r.eplb_call.remote("eplb_placement")
                                                                        for r in self.ranks])]  # fmt: skip
        if any(not np.array_equal(placements[0], p) for p in placements[1:]):
            self.state["last_error"] = "ranks disagree on the placement"
            return "ranks_disagree"
        self.current = placements[0]
        self.state["phase"] = "planning"
        try:
            placement = rebalance(cfg["policy"], load, self.num_ranks, int(cfg["num_redundant"]),
                                  current=self.current, **dict(cfg.get("params") or {}))  # fmt: skip
        except Exception as exc:
            logger.exception("EPLB policy %r failed; keeping the current placement", cfg["policy"])
            self.state["policy_failures"] += 1
            self.state["last_error"] = f"policy {cfg['policy']}: {type(exc).__name__}: {exc}"
            self.state["phase"] = "collecting"
            self._event("policy_failed", error=self.state["last_error"], trace=traceback.format_exc(limit=3))
            return "policy_failed"
        new = placement.phy2log
        imb_before = imbalance(load, self.current, self.num_ranks)
        imb_after = imbalance(load, new, self.num_ranks)
        cur_max = float(rank_loads(load, self.current, self.num_ranks).max(axis=1).sum())
        new_max = float(rank_loads(load, new, self.num_ranks).max(axis=1).sum())
        self.state["imbalance"] = {"current": imb_before.tolist(), "planned": imb_after.tolist()}
        self.metrics.imbalance_per_layer(imb_before, names.PHASE_BEFORE)
        plan_ms = (time.perf_counter() - t0) * 1e3
        if not new_max < float(cfg["threshold"]) * cur_max:
            self.state["skipped_no_gain"] += 1
            self.state["phase"] = "collecting"
            self._event("skipped_no_gain", cur_max=cur_max, new_max=new_max, plan_ms=plan_ms)
            self._reset_windows()
            return "skipped_no_gain"
        try:
            plan = build_transfer_plan(self.current, new, self.num_ranks, self.num_logical)
            validate_plan(plan, self.num_logical)
        except PlanError as exc:
            logger.error("EPLB plan rejected before sending: %s", exc)
            self.state["plan_failures"] += 1
            self.state["last_error"] = f"plan: {exc}"
            self.state["phase"] = "collecting"
            self._event("plan_invalid", error=str(exc))
            return "plan_invalid"
        plan_ms = (time.perf_counter() - t0) * 1e3
        outcome = self.push(new, plan_stats=plan.stats(self.bytes_per_expert))
        duration_ms = (time.perf_counter() - t0) * 1e3
        # The event goes in first and the counters last: get_state() runs on another thread, and a
        # reader that sees rebalances == n must also see the n-th committed event and placement.
        self._event(outcome["outcome"], plan_id=outcome["plan_id"], plan_ms=plan_ms, duration_ms=duration_ms,
                    cur_max=cur_max, new_max=new_max,
                    **{k: v for k, v in outcome.items() if k not in ("outcome", "plan_id")})  # fmt: skip
        if outcome["outcome"] == "committed":
            self.current = new
            self.metrics.imbalance_per_layer(imb_after, names.PHASE_AFTER)
            self.metrics.committed(duration_ms, int(outcome["remote_bytes"]))
            self._reset_windows()
            self.state["phase"] = "collecting"
            self.state["rebalances"] += 1
        else:
            self.state["last_error"] = f"plan {outcome['plan_id']}: {outcome.get('error')}"
            self.state["phase"] = "collecting"
            self.state["plan_failures"] += 1
        return outcome["outcome"]

    def push(self, new: np.ndarray, plan_stats: dict | None = None) -> dict[str, Any]:
        """Send the plan current -> new to every rank and wait for every rank's outcome."""
        plan_id = self._next_plan_id
        self._next_plan_id += 1
        self.state["phase"] = "applying"
        msg = PlanMessage(plan_id, self.current, new, self.num_ranks, blocking=bool(self.config["blocking"]),
                          transfer=dict(self.config.get("transfer") or {}))  # fmt: skip
        stats = plan_stats or {}
        self.state["last_plan"] = {"plan_id": plan_id, "num_ops": stats.get("num_ops"),
                                   "remote_bytes": stats.get("remote_bytes")}  # fmt: skip
        replies = self._get([r.eplb_call.remote("eplb_stage", msg.to_dict()) for r in self.ranks])
        if not all(rep.get("accepted") for rep in replies):
            # Nobody can have committed (that needs every rank ready): drop it where it was accepted.
            self._get([r.eplb_call.remote("eplb_abort", plan_id) for r in self.ranks])
            errors = [rep.get("error") for rep in replies if not rep.get("accepted")]
            return {"plan_id": plan_id, "outcome": "rejected", "error": errors, "remote_bytes": 0}
        deadline = time.monotonic() + float(self.config["plan_timeout_s"])
        poll_s = float(self.config["poll_interval_s"])
        while True:
            wait = max(0.0, min(float(self.config["outcome_wait_s"]), deadline - time.monotonic()))
            found = self._get([r.eplb_outcome_local.remote(plan_id, wait) for r in self.ranks])
            if all(f is not None for f in found):
                break
            if time.monotonic() > deadline:
                return {
                    "plan_id": plan_id,
                    "outcome": "timeout",
                    "error": "ranks did not finish",
                    "remote_bytes": 0,
                }
            time.sleep(poll_s)
        outcomes = {f["outcome"] for f in found}
        return {
            "plan_id": plan_id,
            "outcome": "committed" if outcomes == {"committed"} else "failed",
            "error": [f.get("error") for f in found if f.get("error")],
            "remote_bytes": sum(int(f.get("remote_bytes", 0)) for f in found),
            "stage_ms_max": max(float(f.get("stage_ms", 0.0)) for f in found),
            "commit_ms_max_step": max(float(f.get("commit_ms_max_step", 0.0)) for f in found),
            "steps_waited": max(int(f.get("steps_waited", 0)) for f in found),
        }

    def _reset_windows(self) -> None:
        self._get([r.eplb_reset_window.remote() for r in self.ranks])

    def _event(self, kind: str, **info: Any) -> None:
        self.state["history"].append({"t": time.time(), "event": kind, **info})
        del self.state["history"][:-20]

    # ---- reporting -------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Status for /dpserve/status: phase, counters, last plan, last error, recent events."""
        out = dict(self.state)
        out["history"] = list(self.state["history"])
        out["config"] = dict(self.config)
        out["placement"] = self.current.tolist() if self.current is not None else None
        out["alive"] = self._thread is not None and self._thread.is_alive()
        return out


class EplbActor(EplbController):
    """EplbController as a restartable Ray actor.

    Everything it needs (the rank handles and the config) is a constructor argument, so when the
    actor dies and Ray restarts it (`max_restarts`, see deployments.rank_group.start_eplb) the new
    instance rebuilds itself: it re-reads the placement and plan-id history from the ranks (the
    ranks, not the actor, hold the truth) and, if `autostart` is on, resumes its cycles. It retries
    that every `resume_retry_s` until it succeeds or is stopped (a rank may be busy or re-forming).
    Load counted while it was down stays in the ranks' windows; a plan it had pushed finishes or
    fails on the ranks without it (the ranks agree among themselves) and is planned around.
    """

    def __init__(self, ranks: list[Any], config: dict[str, Any] | None = None) -> None:
        super().__init__(ranks, config)
        import ray

        self.state["restarted"] = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.state["started_at"] = time.time()
        if self.state["restarted"]:
            logger.warning("EPLB actor restarted; re-initializing from the ranks")
            self.state["phase"] = "resuming"
            threading.Thread(target=self._resume, name="eplb-resume", daemon=True).start()

    def _resume(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.initialize()
                if self.config.get("autostart", True):
                    self.start()
                self.state["resumed_at"] = time.time()
                self._event("resumed", after_s=round(self.state["resumed_at"] - self.state["started_at"], 3))
                return
            except Exception as exc:
                logger.warning("EPLB actor: resuming failed (%s); retrying", exc)
                self.state["last_error"] = f"resume: {type(exc).__name__}: {exc}"
                self._stop.wait(float(self.config.get("resume_retry_s", 2.0)))


def eplb_actor_class():
    """EplbActor as a Ray actor (max_concurrency 4: get_state answers while a cycle runs)."""
    import ray

    return ray.remote(max_concurrency=4)(EplbActor)
