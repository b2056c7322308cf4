"""vLLM scheduler subclasses that apply the DP prefill gate (balance scheduling).

Select with the engine argument ``scheduler_cls="scheduler.balance_scheduler.BalanceAutoScheduler"``
(``BalanceAsyncScheduler`` when vLLM's final config runs async scheduling, else ``BalanceScheduler``;
either can also be named directly) and configure with
``additional_config={"dpserve_balance": {...}}`` (see :class:`BalanceConfig`).

How the gate is applied
-----------------------
The gate only ever touches *admission from the waiting queue*. We never copy vLLM's ``schedule()``:
on a step whose gate is closed we hide ``self.waiting`` from ``super().schedule()`` behind an empty
queue of the same type, and put everything back in a ``finally``. Running requests are scheduled as
usual. Requests that ``schedule()`` itself pushes to the waiting queue while it is hidden (preempted
requests, skipped requests) land in the stand-in queue and are merged back *in front of* the original
waiting requests in their order, which is where vLLM would have put them (``prepend_request``).
``kv_holding_waiting`` (waiting requests that already hold KV blocks, e.g. async KV loads) is left
visible on purpose: holding them back would pin KV memory without balancing anything. While hidden,
vLLM's own ``get_request_counts()`` inside ``schedule()`` sees no waiting requests; it only feeds
``long_prefill_token_threshold`` sizing and upstream's ``prefill_capacity_bound`` (used with
``--prefill-schedule-interval``), both about admitting prefills, which a closed gate does not do.

Step counting (why the hook below exists)
-----------------------------------------
The decision for step s must be the same on every rank. vLLM's ``DPEngineCoreProc`` keeps
``step_counter`` (incremented in ``_has_global_unfinished_reqs`` once per busy-loop iteration, reset
to 0 with ``current_wave += 1`` at the end of a wave), which vLLM itself relies on being identical
across DP ranks (``_should_throttle_prefills``). Every rank reaches that point every step, including
idle ranks that only run dummy batches and never call ``schedule()``. So we wrap that method (one
small class patch in npu_runtime.vllm_patches, feature ``balance``) to report counts at the lockstep point
and key every decision by ``(current_wave, step_counter)``.

Pipelining (no round trip on the critical path)
-----------------------------------------------
At the lockstep point after step n-1 (counter now n) a rank sends its counts for n and asks for the
decision for step ``n + lead``; the coordinator freezes that decision the first time any rank asks for
it, from one snapshot, so every rank gets the same answer. ``schedule()`` for step m uses the answer
requested at step ``m - lead``, which has had ``lead`` whole steps to arrive.

Transports (``transport``): ``"zmq"`` (default; ``scheduler/gate_transport.py``): one non-blocking
ZMQ send per report to a socket the coordinator actor serves, the reply read without blocking — about
0.2 ms of the engine-core thread per step, caches cold after the forward, and more wall time when the
cores are shared (``benchmarks/results/gate_client_cost.md``). ``"ray"`` (:class:`RayGateClient`): a Ray actor call per report and a Ray
future per decision — milliseconds per step (see ``benchmarks/results/balance_transport.md``).
``"none"``: no coordinator.

Documented fallbacks (identical on every rank by construction unless noted):
* steps ``0 .. horizon + lead - 1`` of a wave have no decision yet: admit (as vLLM does after idle);
* the decision is not back within ``wait_ms``: admit, and count it (``fallback_steps``). Only this case
  and the next can make ranks differ for a step; they cost balance, never correctness (the gate guards
  no collective, so it cannot deadlock);
* the coordinator is down (zmq: no reply for ``dead_after_s`` after a report): admit on every step
  without waiting, while the address is looked up again in a background thread (the actor restarts,
  ``max_restarts=-1``, on a new address); decisions resume with the first reply of the restarted
  actor, which starts with empty state and its creation-time policy;
* the coordinator cannot be reached at start-up: admit, and keep looking it up in the background
  (zmq; the ray transport admits on every step from then on, logged once).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue, create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler

from npu_runtime import ascend_patches, ascend_scheduler, vllm_patches
from scheduler.gate_report import BalanceConfig, StepKey
from scheduler.gate_transport import ZmqGateClient, coordinator_actor
from scheduler.step_trace import StepTrace

logger = logging.getLogger("dpserve.balance")


class GateClient(Protocol):
    """Where the scheduler gets decisions from (the coordinator, or a fixed gate in tests)."""

    def report(self, key: StepKey, running: int, waiting: int, max_num_seqs: int, lead: int) -> None:
        """Publish this rank's counts at lockstep step ``key`` and request the decision for ``+lead``."""

    def decision(self, key: StepKey, wait_s: float) -> bool | None:
        """The admit decision for ``key``; ``None`` when there is none (caller applies the fallback)."""


class ManualGate:
    """A gate set by hand: every step gets ``admit`` (tests, and operators forcing the gate)."""

    def __init__(self, admit: bool = True) -> None:
        self.admit = admit
        self.reports: deque[tuple[StepKey, int, int]] = deque(maxlen=1024)

    def report(self, key: StepKey, running: int, waiting: int, max_num_seqs: int, lead: int) -> None:
        self.reports.append((key, running, waiting))

    def decision(self, key: StepKey, wait_s: float) -> bool | None:
        return self.admit


class RayGateClient:
    """Talks to the BalanceCoordinator actor from the engine-core process.

    The engine core is a subprocess of the rank actor, not a Ray worker: it joins the cluster as a
    driver (``ray.init(address=...)``) on first use. Calls are fire-and-forget ``.remote()``; the
    returned futures are kept per step key and read (without blocking, or up to ``wait_s``) when that
    step is scheduled.
    """

    def __init__(self, cfg: BalanceConfig, rank: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self._actor: Any = None
        self._broken = False
        self._failing = False  # decisions failing (coordinator dead/restarting): log once per outage
        self._pending: dict[StepKey, tuple[list[Any], int]] = {}
        self.client_s = 0.0  # time spent in this client (submit + wait), for cost-per-step reports
        self.calls = 0
        self.late = 0  # decisions not back within wait_s (fallback applied)

    def _connect(self) -> Any:
        if self._actor is not None or self._broken:
            return self._actor
        try:
            self._actor = coordinator_actor(self.cfg)
            logger.info("rank %d: connected to balance coordinator %r", self.rank, self.cfg.coordinator_name)
        except Exception:
            # Without a coordinator the gate stays open (plain vLLM) rather than stalling the rank.
            logger.exception("rank %d: cannot reach the balance coordinator; gate stays open", self.rank)
            self._broken = True
        return self._actor

    def report(self, key: StepKey, running: int, waiting: int, max_num_seqs: int, lead: int) -> None:
        t0 = time.perf_counter()
        horizon = self.cfg.horizon
        actor = self._connect()
        if actor is not None:
            wave, step = key
            ref = actor.report.remote(
                self.cfg.report(
                    self.rank, key, running, waiting, max_num_seqs, lead, self.client_s, self.calls, self.late
                )
            )
            # One holder per call: the first step of the span resolves the future, the others reuse it.
            holder: list[Any] = [ref, None]
            for i in range(horizon):
                self._pending[(wave, step + lead + i)] = (holder, i)
            # Futures of steps that will never be scheduled (wave ended early) must not pile up.
            if len(self._pending) > 64 + horizon:
                for k in sorted(self._pending)[: -(16 + horizon)]:
                    del self._pending[k]
        self.calls += 1
        self.client_s += time.perf_counter() - t0

    def decision(self, key: StepKey, wait_s: float) -> bool | None:
        entry = self._pending.pop(key, None)
        if entry is None:
            return None
        holder, index = entry
        if holder[1] is not None:
            return bool(holder[1][index])
        t0 = time.perf_counter()
        try:
            import ray

            ready, _ = ray.wait([holder[0]], timeout=wait_s)
            if not ready:
                self.late += 1
                return None
            holder[1] = ray.get(ready[0])
            if self._failing:
                logger.info("rank %d: balance coordinator answers again", self.rank)
                self._failing = False
            return bool(holder[1][index])
        except Exception:
            if not self._failing:  # once per outage, not once per step
                logger.exception("rank %d: balance decision for %s failed; admitting", self.rank, key)
                self._failing = True
            return None
        finally:
            self.client_s += time.perf_counter() - t0


def make_gate_client(cfg: BalanceConfig, rank: int) -> GateClient | None:
    """The client for ``cfg.transport``, connected. Connecting joins Ray and looks the coordinator up
    (seconds): done at scheduler start-up, never inside a lockstep step."""
    if cfg.transport == "zmq":
        client: ZmqGateClient | RayGateClient = ZmqGateClient(cfg, rank)
        client.connect()
        return client
    if cfg.transport == "ray":
        client = RayGateClient(cfg, rank)
        client._connect()
        return client
    return None


@dataclass
class GateStats:
    """Per-rank counters of what the gate did (exposed through ``balance_stats()``)."""

    steps: int = 0  # schedule() calls
    closed_steps: int = 0  # steps the gate was closed
    held_steps: int = 0  # closed steps that actually held back waiting requests
    no_decision_steps: int = 0  # first steps of a wave (rule: admit)
    fallback_steps: int = 0  # decision late or missing: admitted by fallback
    lockstep_reports: int = 0


def _restore_waiting(original: RequestQueue, stand_in: RequestQueue) -> None:
    """Put back the hidden waiting queue, with whatever ``schedule()`` queued meanwhile in front.

    vLLM ``prepend_request``s preempted/skipped requests; pushing the stand-in's items onto the
    original front-to-back in reverse keeps their order and puts them ahead (FCFS). A priority queue
    orders by priority anyway.
    """
    for request in reversed(list(stand_in)):
        original.prepend_request(request)


class BalanceSchedulerMixin:
    """Gates waiting-request admission around ``super().schedule()``; see the module docstring."""

    # Attributes provided by vLLM's Scheduler.
    waiting: RequestQueue
    running: list[Any]
    policy: Any
    vllm_config: Any
    max_num_running_reqs: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The lockstep hook and the stats utility (npu_runtime.vllm_patches, normally installed by
        # the plugin); a vLLM whose symbols do not fit refuses the scheduler here, before any step.
        vllm_patches.require("balance")
        vllm_patches.install(["balance"])
        # On Ascend the class must derive from the Scheduler vllm-ascend's patches bound (its DP loop
        # calls balance_gather on it): refused here, before any step, when it does not.
        expected = ascend_scheduler.expected_in_force()
        if expected is not None:
            ascend_patches.require("ascend_balance")
        ascend_scheduler.check_scheduler_class(type(self), expected)
        super().__init__(*args, **kwargs)
        self.balance_config = BalanceConfig.from_additional_config(self.vllm_config.additional_config)
        parallel = self.vllm_config.parallel_config
        self.dp_rank = int(parallel.data_parallel_rank)
        # With DP > 1 the step key comes from the DP engine core (lockstep counter); alone, a rank
        # counts its own schedule() calls (no peers to agree with).
        self._dp_mode = int(parallel.data_parallel_size) > 1
        self._core: Any = None
        self._own_step = 0
        self.gate_stats = GateStats()
        self.last_admit: bool | None = None
        self.step_trace = StepTrace()  # one row per schedule(): see scheduler/step_trace.py
        self.gate_client: GateClient | None = make_gate_client(self.balance_config, self.dp_rank)

    # ---- step keys and reports -----------------------------------------------------------------
    def _current_key(self) -> StepKey:
        if self._dp_mode:
            core = self._core
            # Before the first lockstep point (very first step) there is no core yet: step 0.
            return (int(core.current_wave), int(core.step_counter)) if core is not None else (0, 0)
        return (0, self._own_step)

    def _report(self, key: StepKey) -> None:
        if self.gate_client is None:
            return
        running, waiting = self.get_request_counts()  # type: ignore[attr-defined]
        self.gate_client.report(key, running, waiting, self.max_num_running_reqs, self.balance_config.lead)

    def on_lockstep(self, core: Any) -> None:
        """Called by the DP engine core at its lockstep point, every step, on every rank."""
        self._core = core
        step = int(core.step_counter)
        if step % self.balance_config.horizon == 0:  # same steps on every rank
            self.gate_stats.lockstep_reports += 1
            self._report((int(core.current_wave), step))

    def gate_admits(self, key: StepKey) -> bool:
        """The gate for step ``key``: the coordinator's decision, or the documented fallback."""
        client = self.gate_client
        if client is None:
            return True
        decision = client.decision(key, self.balance_config.wait_ms / 1e3)
        if decision is None:
            # The first covered step of a wave is horizon + lead (first report at counter horizon);
            # earlier steps never have a decision on any rank.
            if key[1] < self.balance_config.horizon + self.balance_config.lead:
                self.gate_stats.no_decision_steps += 1
            else:
                self.gate_stats.fallback_steps += 1
            return True
        return decision

    # ---- the gate ------------------------------------------------------------------------------
    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        """vLLM's schedule(), with the waiting queue hidden on steps whose gate is closed; each call
        leaves one row in ``self.step_trace``."""
        t0 = time.perf_counter()
        key = self._current_key()
        running, waiting = len(self.running), len(self.waiting)
        out = self._gated_schedule(*args, **kwargs)
        self.step_trace.record_step(
            key, t0, bool(self.last_admit), running, waiting, out, len(self.running), len(self.waiting)
        )
        return out

    def _gated_schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        if not self._dp_mode and self._own_step % self.balance_config.horizon == 0:
            self._report((0, self._own_step))
        key = self._current_key()
        self._own_step += 1
        admit = self.gate_admits(key)
        self.last_admit = admit
        self.gate_stats.steps += 1
        if admit:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        self.gate_stats.closed_steps += 1
        if len(self.waiting) == 0:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        self.gate_stats.held_steps += 1
        hidden = self.waiting
        self.waiting = create_request_queue(self.policy)
        try:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            stand_in, self.waiting = self.waiting, hidden
            _restore_waiting(hidden, stand_in)

    def balance_stats(self, trace_from: int | None = None) -> dict[str, Any]:
        """Gate counters of this rank, plus client cost when talking to a coordinator.

        ``trace_seq`` is the number of steps traced so far; with ``trace_from`` the answer also holds
        the trace rows with ``seq >= trace_from`` (``trace``; fields: ``scheduler.step_trace.FIELDS``).
        From the engine's client: the engine-core utility ``dpserve_balance_stats`` (``DPRank``).
        """
        out: dict[str, Any] = asdict(self.gate_stats)
        out["trace_seq"] = self.step_trace.seq
        if trace_from is not None:
            out["trace"] = self.step_trace.rows(trace_from)
        client = self.gate_client
        if isinstance(client, RayGateClient | ZmqGateClient):
            out["client_ms_total"] = client.client_s * 1e3
            out["client_calls"] = client.calls
            out["client_late"] = client.late
        if isinstance(client, ZmqGateClient):
            out.update(client.stats())
        return out


class BalanceScheduler(BalanceSchedulerMixin, Scheduler):
    """vLLM's Scheduler with the DP prefill gate."""


class BalanceAsyncScheduler(BalanceSchedulerMixin, AsyncScheduler):
    """vLLM's AsyncScheduler (async scheduling, CUDA/NPU) with the DP prefill gate."""


class BalanceAutoScheduler:
    """``scheduler_cls`` for engines that leave ``async_scheduling`` to vLLM: builds a
    :class:`BalanceAsyncScheduler` when the final config (after the platform hook) runs the async loop,
    else a :class:`BalanceScheduler`. Never instantiated itself.

    Why: vLLM turns async scheduling on by default where the platform allows it (CUDA; the CPU platform
    forces it off) and keeps a custom ``scheduler_cls`` as given. A plain ``Scheduler`` subclass in the
    async loop (``step_with_batch_queue``) adds no output placeholders, so every other ``schedule()``
    finds nothing to run: measured on a real CPU engine with async scheduling forced on, 16
    ``schedule()`` calls (8 empty batches) for 8 tokens of two requests instead of 9
    (the gate scenario of ``tests/scheduler/test_balance_async_loop.py``).

    On Ascend, vllm-ascend's platform patches rebind vLLM's ``Scheduler`` to its own balance
    scheduler; the class built here derives from the one bound at engine start
    (``npu_runtime.ascend_scheduler.class_in_force``), not the one bound when this module was imported.
    """

    def __new__(cls, *args: Any, vllm_config: Any, **kwargs: Any) -> BalanceSchedulerMixin:  # type: ignore[misc]
        async_scheduling = bool(vllm_config.scheduler_config.async_scheduling)
        static = BalanceAsyncScheduler if async_scheduling else BalanceScheduler
        # Resolved now, from the classes bound at engine start (after vllm-ascend's patches rebound
        # vLLM's Scheduler, where it runs): npu_runtime.ascend_scheduler.
        target = ascend_scheduler.class_in_force(BalanceSchedulerMixin, static, async_scheduling)
        return target(*args, vllm_config=vllm_config, **kwargs)


SCHEDULER_CLS = f"{__name__}.BalanceScheduler"
ASYNC_SCHEDULER_CLS = f"{__name__}.BalanceAsyncScheduler"
AUTO_SCHEDULER_CLS = f"{__name__}.BalanceAutoScheduler"
