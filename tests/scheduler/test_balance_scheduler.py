"""The balance scheduler gates waiting-request admission around a real vLLM scheduler.

The engine test runs a real in-process vLLM engine (no mocks): the gate is held closed by a
``ManualGate`` installed on the engine's own scheduler, then opened.
"""

from __future__ import annotations

import os

import pytest

from scheduler.balance_scheduler import BalanceConfig, ManualGate, _restore_waiting


class _Req:
    """Stand-in for queue ordering only (the queues never look inside FCFS items)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_restore_waiting_puts_requeued_requests_first_in_order() -> None:
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    hidden = FCFSRequestQueue()
    for n in ("w1", "w2", "w3"):
        hidden.add_request(_Req(n))
    stand_in = FCFSRequestQueue()
    # schedule() preempts p2 then p1: each prepend_request puts it at the front -> [p1, p2].
    stand_in.prepend_request(_Req("p2"))
    stand_in.prepend_request(_Req("p1"))
    _restore_waiting(hidden, stand_in)
    assert [r.name for r in hidden] == ["p1", "p2", "w1", "w2", "w3"]


def test_restore_waiting_empty_stand_in_keeps_queue() -> None:
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    hidden = FCFSRequestQueue([_Req("a"), _Req("b")])
    _restore_waiting(hidden, FCFSRequestQueue())
    assert [r.name for r in hidden] == ["a", "b"]


def test_balance_config_validation() -> None:
    assert BalanceConfig.from_additional_config({}).transport == "zmq"
    with pytest.raises(ValueError, match="transport"):
        BalanceConfig.from_additional_config({"dpserve_balance": {"transport": "grpc"}})
    cfg = BalanceConfig.from_additional_config({"dpserve_balance": {"transport": "none", "lead": 2}})
    assert (cfg.transport, cfg.lead) == ("none", 2)
    with pytest.raises(ValueError, match="unknown key"):
        BalanceConfig.from_additional_config({"dpserve_balance": {"polcy": "x"}})
    with pytest.raises(ValueError, match="lead"):
        BalanceConfig.from_additional_config({"dpserve_balance": {"lead": 0}})


def test_engine_settings_balance_args(tiny_model_dir: str) -> None:
    from deployments.config import EngineSettings

    s = EngineSettings(
        model=tiny_model_dir,
        balance={"policy": "any_at_cap", "lead": 2, "timeout_s": 3},
        engine_kwargs={"additional_config": {"other": 1}},
    )
    args = s.engine_args(0, "127.0.0.1", 1234)
    # async_scheduling unset: vLLM decides when it builds the config; the auto class follows it.
    assert args["scheduler_cls"] == "scheduler.balance_scheduler.BalanceAutoScheduler"
    for flag, cls in ((True, "BalanceAsyncScheduler"), (False, "BalanceScheduler")):
        explicit = EngineSettings(model=tiny_model_dir, balance={}, engine_kwargs={"async_scheduling": flag})
        assert (
            explicit.engine_args(0, "127.0.0.1", 1)["scheduler_cls"] == f"scheduler.balance_scheduler.{cls}"
        )
    # Only the scheduler's keys reach the engine; the user's own additional_config is kept.
    assert args["additional_config"] == {"other": 1, "dpserve_balance": {"lead": 2}}
    assert "scheduler_cls" not in EngineSettings(model=tiny_model_dir).engine_args(0, "127.0.0.1", 1)


def _in_process_engine(model_dir: str, scheduler_cls: str):
    """A real in-process vLLM engine with a balance scheduler and no coordinator (gate by hand)."""
    # In-process engine core (fast start, scheduler reachable); restored after, so that Ray workers
    # started later in the session do not inherit it.
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    llm = LLM(
        model=model_dir,
        enforce_eager=True,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=2,
        scheduler_cls=scheduler_cls,
        additional_config={"dpserve_balance": {"transport": "none"}},
        seed=0,
    )
    if saved is None:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    return llm


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str):
    llm = _in_process_engine(tiny_model_dir, "scheduler.balance_scheduler.BalanceScheduler")
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _hold_then_admit(llm) -> None:
    """Gate open: 2 requests run; gate closed: 2 more wait while the first 2 finish; gate open: the
    held ones run to completion with the same greedy output (nothing lost)."""
    from vllm import SamplingParams

    llm_engine = llm.llm_engine
    sched = _scheduler(llm)
    gate = ManualGate(admit=True)
    sched.gate_client = gate
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9, 10]}

    # Two requests admitted while the gate is open: they run.
    for i in range(2):
        llm_engine.add_request(f"r{i}", prompt, params)
    llm_engine.step()
    assert len(sched.running) == 2

    # Gate closed: two more wait even though r0/r1 finish and free their slots; r0/r1 keep decoding.
    gate.admit = False
    for i in range(2, 4):
        llm_engine.add_request(f"r{i}", prompt, params)
    finished: dict[str, list[int]] = {}
    for _ in range(30):
        for out in llm_engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
    assert set(finished) == {"r0", "r1"}
    assert len(sched.running) == 0 and len(sched.waiting) == 2
    assert sched.gate_stats.held_steps > 0
    assert all(r.num_computed_tokens == 0 for r in sched.waiting)

    # Gate open: the held requests are admitted and complete; nothing lost, same greedy output.
    gate.admit = True
    for _ in range(40):
        for out in llm_engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        if not llm_engine.has_unfinished_requests():
            break
    assert set(finished) == {"r0", "r1", "r2", "r3"}
    assert all(len(t) == 8 for t in finished.values())
    assert finished["r2"] == finished["r0"]
    assert len(sched.waiting) == 0


@pytest.mark.slow
def test_engine_gate_holds_waiting_and_keeps_running(engine) -> None:
    from scheduler.balance_scheduler import BalanceScheduler

    sched = _scheduler(engine)
    assert isinstance(sched, BalanceScheduler)
    trace_from = sched.step_trace.seq
    _hold_then_admit(engine)

    # The step trace saw it all, and the engine-core utility (what DPRank.balance_stats calls) serves it.
    from scheduler.step_trace import IDX, step_kind

    stats = engine.llm_engine.engine_core.engine_core.dpserve_balance_stats(trace_from)
    rows = stats["trace"]
    assert rows == sched.step_trace.rows(trace_from) and stats["trace_seq"] == trace_from + len(rows)
    first = rows[0]
    assert (first[IDX["admit"]], first[IDX["new_reqs"]], first[IDX["prefill_tokens"]]) == (1, 2, 12)
    held = [r for r in rows if not r[IDX["admit"]] and r[IDX["waiting"]] == 2]
    assert held and all(r[IDX["new_reqs"]] == 0 and r[IDX["waiting_after"]] == 2 for r in held)
    assert any(step_kind(r) == "decode" and r[IDX["decode_tokens"]] == 2 for r in rows)
    # 4 requests x 8 tokens: each prefill step yields one token per new request, decode steps the rest.
    assert sum(r[IDX["new_reqs"]] + r[IDX["decode_tokens"]] for r in rows) == 4 * 8


@pytest.mark.slow
def test_engine_gate_closed_with_empty_running_then_open(engine) -> None:
    """A closed gate with nothing running holds everything (an all-waiting rank idles) without
    losing requests; a request preempted meanwhile would sit at the queue front (see unit test)."""
    from vllm import SamplingParams

    llm_engine = engine.llm_engine
    sched = _scheduler(engine)
    gate = ManualGate(admit=False)
    sched.gate_client = gate
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i in range(3):
        llm_engine.add_request(f"q{i}", {"prompt_token_ids": [11, 12, 13, i + 20]}, params)
    for _ in range(5):
        assert not [o for o in llm_engine.step() if o.finished]
    # vLLM suffixes internal request ids; the queue order (arrival order) must be unchanged.
    assert len(sched.running) == 0
    assert [r.request_id.split("-")[0] for r in sched.waiting] == ["q0", "q1", "q2"]
    gate.admit = True
    done = set()
    for _ in range(40):
        done |= {o.request_id for o in llm_engine.step() if o.finished}
        if not llm_engine.has_unfinished_requests():
            break
    assert done == {"q0", "q1", "q2"}


def test_async_variant_uses_the_same_gate() -> None:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from scheduler.balance_scheduler import BalanceAsyncScheduler, BalanceSchedulerMixin

    assert issubclass(BalanceAsyncScheduler, AsyncScheduler)
    assert BalanceAsyncScheduler.schedule is BalanceSchedulerMixin.schedule
    # The mixin must come first so its schedule() wraps vLLM's.
    assert BalanceAsyncScheduler.__mro__[1] is BalanceSchedulerMixin


@pytest.mark.slow
def test_async_variant_gates_a_real_engine(tiny_model_dir: str) -> None:
    """BalanceAsyncScheduler (vLLM's AsyncScheduler + the gate) on a real engine in the synchronous
    loop (vLLM's CPU platform forces async scheduling off). The async loop itself (batch queue of 2,
    placeholders for tokens in flight) runs in ``test_balance_async_loop.py``, with the flag forced on."""
    from scheduler.balance_scheduler import BalanceAsyncScheduler

    llm = _in_process_engine(tiny_model_dir, "scheduler.balance_scheduler.BalanceAsyncScheduler")
    try:
        assert isinstance(_scheduler(llm), BalanceAsyncScheduler)
        _hold_then_admit(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
