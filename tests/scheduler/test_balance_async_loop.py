"""BalanceAsyncScheduler inside vLLM's genuine async-scheduling loop, on a real CPU engine.

vLLM's CPU platform turns async scheduling off in ``CpuPlatform.check_and_update_config``
(``scheduler_config.async_scheduling = False``, "not required on CPU"). Nothing else in the path needs
CUDA: the CPU worker (``vllm/v1/worker/cpu/shm.py``, imported by ``cpu_worker``) replaces
``torch.cuda.Event/Stream/stream/current_stream`` with no-op placeholders, so the V1 model runner's
async output (``AsyncGPUModelRunnerOutput``, ``prev_sampled_token_ids``) works on CPU, and
``UniProcExecutor.supports_async_scheduling()`` is true. With the flag turned back on after the
platform hook (:func:`forced_async_scheduling`, test-only, this process only: the engine core is
in-process), ``VllmConfig.max_concurrent_batches`` is 2, ``EngineCore.step_fn`` is
``step_with_batch_queue`` and ``schedule()`` for step n+1 runs before ``update_from_output()`` of
step n, with the running requests' ``num_output_placeholders`` covering the token in flight.

What this does not give: wall-clock overlap. ``UniProcExecutor`` runs the forward pass inside
``execute_model()`` on the engine thread (the CPU has no device stream to run ahead), so only the
*ordering* is that of CUDA/NPU async scheduling (scheduler, placeholders, batch queue, async output,
stale outputs of preempted requests), not its timing. Serving on CPU keeps the platform's choice.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from scheduler.balance_scheduler import ManualGate

SYNC_CLS = "scheduler.balance_scheduler.BalanceScheduler"
ASYNC_CLS = "scheduler.balance_scheduler.BalanceAsyncScheduler"
AUTO_CLS = "scheduler.balance_scheduler.BalanceAutoScheduler"  # what dpserve's engine settings select


@contextmanager
def forced_async_scheduling() -> Iterator[None]:
    """Re-enable ``scheduler_config.async_scheduling`` right after the platform's config hook, for
    engines whose ``VllmConfig`` is built in this process while the context is open."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    saved = inspect.getattr_static(cls, "check_and_update_config")
    own = "check_and_update_config" in cls.__dict__
    original = cls.check_and_update_config  # bound to cls

    def check_and_update_config(klass, vllm_config) -> None:
        original(vllm_config)
        vllm_config.scheduler_config.async_scheduling = True

    cls.check_and_update_config = classmethod(check_and_update_config)
    try:
        yield
    finally:
        if own:
            cls.check_and_update_config = saved
        else:
            del cls.check_and_update_config


def _engine(model_dir: str, scheduler_cls: str, force_async: bool, **kwargs):
    """A real in-process vLLM engine (uniproc executor) with a balance scheduler and no coordinator."""
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core (and its config) in this process
    from vllm import LLM

    settings = dict(enforce_eager=True, dtype="float32", max_model_len=256, max_num_seqs=2, seed=0)
    settings.update(kwargs)
    try:
        with forced_async_scheduling() if force_async else _nullcontext():
            llm = LLM(
                model=model_dir,
                scheduler_cls=scheduler_cls,
                additional_config={"dpserve_balance": {"transport": "none"}},
                **settings,
            )
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    return llm


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _assert_loop(llm, async_loop: bool) -> None:
    """Which engine loop this engine really runs."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.engine.core import EngineCore

    core = _core(llm)
    runner = core.model_executor.driver_worker.worker.model_runner
    assert core.vllm_config.scheduler_config.async_scheduling is async_loop
    assert runner.use_async_scheduling is async_loop
    assert isinstance(core.scheduler, AsyncScheduler) is async_loop
    if async_loop:
        assert core.batch_queue is not None and core.batch_queue_size == 2
        assert core.step_fn.__func__ is EngineCore.step_with_batch_queue
    else:
        assert core.batch_queue is None and core.step_fn.__func__ is EngineCore.step


@dataclass
class Call:
    """What one ``schedule()`` call saw and did (recorded around the engine's own scheduler)."""

    in_flight: int  # batches in the engine's batch queue when schedule() was entered
    placeholders: dict[str, int]  # running request -> num_output_placeholders at entry
    admit: bool
    waiting: int  # waiting requests at entry
    new: list[str]  # requests admitted by this call
    scheduled: dict[str, int]  # request -> tokens scheduled
    running_after: list[str]  # running requests when schedule() returned

    @property
    def preempted(self) -> set[str]:
        """Requests this call preempted (only schedule() itself removes running requests)."""
        return set(self.placeholders) - set(self.running_after)


@dataclass
class Recorder:
    """Observes (does not replace) the engine scheduler's ``schedule()``."""

    calls: list[Call] = field(default_factory=list)

    def install(self, llm) -> None:
        core = _core(llm)
        sched = core.scheduler
        inner = sched.schedule  # the class's schedule(): BalanceSchedulerMixin around vLLM's

        def schedule(*args, **kwargs):
            in_flight = len(core.batch_queue) if core.batch_queue is not None else 0
            placeholders = {_name(r.request_id): r.num_output_placeholders for r in sched.running}
            waiting = len(sched.waiting)
            out = inner(*args, **kwargs)
            self.calls.append(
                Call(in_flight, placeholders, bool(sched.last_admit), waiting,
                     [_name(r.req_id) for r in out.scheduled_new_reqs],
                     {_name(k): v for k, v in out.num_scheduled_tokens.items()},
                     [_name(r.request_id) for r in sched.running])
            )  # fmt: skip
            return out

        sched.schedule = schedule

    def uninstall(self, llm) -> None:
        _core(llm).scheduler.__dict__.pop("schedule", None)


def _name(request_id: str) -> str:
    return request_id.split("-")[0]  # vLLM suffixes the ids it is given


def _step_until(llm, done, finished: dict[str, list[int]], limit: int = 200) -> None:
    for _ in range(limit):
        if done():
            return
        for out in llm.llm_engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
    assert done(), "engine did not reach the expected state"


PROMPTS = {f"r{i}": [5 + i, 6, 7, 8 + 2 * i, 9, 10 + i] for i in range(4)}


def _running_behind_open_gate(llm, prompts: dict[str, list[int]], names: tuple[str, ...], max_tokens: int):
    """An open ManualGate on the engine's scheduler and requests `names` admitted and running.
    Returns (submit, gate, finished): submit(name) adds prompts[name] with the same greedy params;
    finished collects each finished request's tokens as `_step_until` steps."""
    from vllm import SamplingParams

    eng, sched = llm.llm_engine, _core(llm).scheduler
    gate = ManualGate(admit=True)
    sched.gate_client = gate
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    finished: dict[str, list[int]] = {}

    def submit(name: str) -> None:
        eng.add_request(name, {"prompt_token_ids": prompts[name]}, params)

    for name in names:
        submit(name)
    _step_until(llm, lambda: len(sched.running) == len(names), finished)
    return submit, gate, finished


def _hold_then_admit(llm, rec: Recorder) -> dict[str, list[int]]:
    """Gate open: r0/r1 admitted. Gate closed: r2/r3 wait while r0/r1 keep decoding to the end.
    Gate open: r2/r3 admitted and finish. Returns each request's greedy tokens."""
    eng, sched = llm.llm_engine, _core(llm).scheduler
    submit, gate, finished = _running_behind_open_gate(llm, PROMPTS, ("r0", "r1"), max_tokens=8)

    gate.admit = False
    closed_from = len(rec.calls)
    for r in ("r2", "r3"):
        submit(r)
    _step_until(llm, lambda: {"r0", "r1"} <= set(finished), finished)
    _step_until(llm, lambda: len(sched.running) == 0, finished, limit=5)
    # Held: not admitted, not started, still in arrival order; the running ones decoded meanwhile.
    assert [_name(r.request_id) for r in sched.waiting] == ["r2", "r3"]
    assert all(r.num_computed_tokens == 0 for r in sched.waiting)
    closed = rec.calls[closed_from:]
    assert closed and all(not c.admit and not c.new for c in closed)
    assert any(set(c.scheduled) == {"r0", "r1"} and c.waiting == 2 for c in closed)
    assert sched.gate_stats.held_steps > 0

    gate.admit = True
    _step_until(llm, lambda: not eng.has_unfinished_requests(), finished)
    assert sorted(finished) == ["r0", "r1", "r2", "r3"]
    assert all(len(t) == 8 for t in finished.values())
    assert len(sched.waiting) == 0 and len(sched.running) == 0
    return finished


@pytest.fixture(scope="module")
def sync_reference(tiny_model_dir: str) -> dict[str, list[int]]:
    """The same scenario on the synchronous loop (the platform's choice: the auto class builds a
    BalanceScheduler)."""
    from scheduler.balance_scheduler import BalanceScheduler

    llm = _engine(tiny_model_dir, AUTO_CLS, force_async=False)
    try:
        _assert_loop(llm, async_loop=False)
        assert type(_core(llm).scheduler) is BalanceScheduler
        rec = Recorder()
        rec.install(llm)
        out = _hold_then_admit(llm, rec)
        assert all(c.in_flight == 0 for c in rec.calls)  # sync: never a batch in flight
        return out
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.slow
def test_async_loop_gate_holds_and_admits_with_batches_in_flight(tiny_model_dir: str, sync_reference) -> None:
    from scheduler.balance_scheduler import BalanceAsyncScheduler
    from scheduler.step_trace import IDX

    llm = _engine(tiny_model_dir, AUTO_CLS, force_async=True)
    rec = Recorder()
    try:
        _assert_loop(llm, async_loop=True)
        sched = _core(llm).scheduler
        assert type(sched) is BalanceAsyncScheduler  # the auto class followed the forced flag
        rec.install(llm)
        trace_from = sched.step_trace.seq
        finished = _hold_then_admit(llm, rec)
        # The overlap path really ran: schedule() was entered with the previous batch still in the
        # queue, its running requests holding a placeholder for the token in flight - also on steps
        # whose gate was closed with requests waiting.
        overlapped = [c for c in rec.calls if c.in_flight >= 1 and c.placeholders]
        assert overlapped and all(n >= 1 for c in overlapped for n in c.placeholders.values())
        assert any(not c.admit and c.waiting == 2 and set(c.scheduled) == {"r0", "r1"} for c in overlapped)
        assert max(c.in_flight for c in rec.calls) == 1  # batch queue of 2: one in flight + this one
        # No empty batch while requests still had tokens to produce: at most one per request wave
        # (the step whose running requests all have their last token in flight).
        assert sum(1 for c in rec.calls if not c.scheduled) <= 2
        # Same greedy tokens as the synchronous loop, request by request.
        assert finished == sync_reference
        # The step trace's rows match what schedule() returned, one row per call.
        rows = sched.step_trace.rows(trace_from)
        assert len(rows) == len(rec.calls)
        for row, call in zip(rows, rec.calls, strict=True):
            assert row[IDX["admit"]] == int(call.admit) and row[IDX["new_reqs"]] == len(call.new)
            assert row[IDX["prefill_tokens"]] + row[IDX["decode_tokens"]] == sum(call.scheduled.values())
        # Every output token was scheduled exactly once: 4 prefills (1 token each) + decodes.
        assert sum(r[IDX["new_reqs"]] + r[IDX["decode_tokens"]] for r in rows) == 4 * 8
    finally:
        rec.uninstall(llm)
        llm.llm_engine.engine_core.shutdown()


# ---- preemption: a tiny KV cache (5 blocks of 32 tokens) cannot hold two 70-token requests ------
SMALL_KV = dict(block_size=32, num_gpu_blocks_override=5, max_model_len=128)
LONG = {f"p{i}": [20 + i, 21, 22 + 3 * i, 23, 24, 25 + i, 26, 27, 28, 29 + i] for i in range(3)}
LONG_TOKENS = 60


def _preempt_while_closed(llm, rec: Recorder) -> tuple[dict[str, list[int]], set[str]]:
    """Gate open: p0/p1 run. Gate closed with p2 waiting: p0/p1 grow until the KV cache runs out and
    vLLM preempts one; it goes back in front of p2, is held (not re-admitted) while the gate is closed,
    and nothing is lost when the gate opens. Returns the tokens and the requests preempted while closed."""
    eng, sched = llm.llm_engine, _core(llm).scheduler
    submit, gate, finished = _running_behind_open_gate(llm, LONG, ("p0", "p1"), max_tokens=LONG_TOKENS)

    gate.admit = False
    closed_from = len(rec.calls)
    submit("p2")
    _step_until(llm, lambda: any(c.preempted for c in rec.calls[closed_from:]), finished)
    preempted = set().union(*(c.preempted for c in rec.calls[closed_from:]))
    # Preempted requests sit in front of the held one, in vLLM's order; their KV was released.
    waiting = [_name(r.request_id) for r in sched.waiting]
    assert waiting[-1] == "p2" and set(waiting[:-1]) == preempted
    assert all(r.num_computed_tokens == 0 for r in sched.waiting)

    # Still closed: the survivor decodes to the end, the preempted request is not re-admitted.
    _step_until(llm, lambda: len(sched.running) == 0, finished, limit=400)
    assert [_name(r.request_id) for r in sched.waiting] == waiting
    assert not any(c.new for c in rec.calls[closed_from:])
    assert set(finished) == {"p0", "p1"} - preempted

    gate.admit = True
    _step_until(llm, lambda: not eng.has_unfinished_requests(), finished, limit=600)
    assert sorted(finished) == ["p0", "p1", "p2"]
    assert all(len(t) == LONG_TOKENS for t in finished.values())
    return finished, preempted


@pytest.mark.slow
def test_async_loop_preempted_requests_not_lost_or_reordered(tiny_model_dir: str) -> None:
    """The same preemption scenario on the sync loop and on the async loop: same requests preempted,
    same greedy tokens; on the async loop the preemption hits a request with a token in flight (its
    stale output arrives after it went back to the waiting queue)."""
    results = {}
    for cls, force_async in ((SYNC_CLS, False), (ASYNC_CLS, True)):
        llm = _engine(tiny_model_dir, cls, force_async=force_async, **SMALL_KV)
        rec = Recorder()
        try:
            _assert_loop(llm, async_loop=force_async)
            rec.install(llm)
            results[force_async] = _preempt_while_closed(llm, rec)
            hits = [c for c in rec.calls if c.preempted]
            if force_async:
                assert any(
                    c.in_flight == 1 and all(c.placeholders[n] >= 1 for n in c.preempted) for c in hits
                )
            else:
                assert all(c.in_flight == 0 for c in rec.calls)
        finally:
            rec.uninstall(llm)
            llm.llm_engine.engine_core.shutdown()
    assert results[True] == results[False]
