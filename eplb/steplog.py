"""Engine-side step times in the worker (`StepLog`): the worker's step entry points wrapped to time
every engine step, real or DP dummy, and to run the EPLB pacing signal after each one.

Read by benchmarks/eplb_online.py through `eplb_step_log`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

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
