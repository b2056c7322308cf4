"""The EPLB worker extension: the `eplb_*` methods vLLM's worker gains.

Engine argument ``worker_extension_cls="eplb.applier.EplbWorkerExtension"``; each method runs in the
worker process, reached with ``collective_rpc("eplb_...")``, on the engine core's stepping thread
between steps. The work is in the modules by concern:

* eplb.slots: physical slots and routing tables (the model surgery, `LayerRouting`);
* eplb.agreement: accepting a plan, the per-step agreement with the other DP ranks, commit;
* eplb.exchange: the data paths that move expert rows (inline pieces, staging thread, blocking);
* eplb.outcomes: plan records and the per-plan files the rank actor reads;
* eplb.steplog, eplb.threads: step times and per-thread CPU for benchmarks/eplb_online.py.
* eplb.ascend: the same on vllm-ascend (its MoE layers, load and step), picked when the worker runs it.
"""

from __future__ import annotations

from eplb.agreement import EplbWorkerState
from eplb.messages import PlanMessage
from eplb.threads import thread_cpu_ms

_STATE: EplbWorkerState | None = None


class EplbWorkerExtension:
    """Mixed into vLLM's worker. Return values are plain lists/dicts so they cross vLLM's msgpack RPC."""

    def eplb_setup(
        self, num_redundant: int = 0, layers_per_step: int = 1, outcome_dir: str | None = None
    ) -> dict:
        """Enlarge weights to physical slots and install the routing tables (idempotent). Must run on
        every rank while the group is idle with its DP wave ended (it creates a process group, a
        collective that deadlocks against a peer still inside a step's all-reduce; see
        deployments.rank_group.wait_group_idle) and adds rows to the per-step DP all-reduce. `outcome_dir`:
        also write plan records there (see OutcomeLog.set_dir; status["outcome_dir"])."""
        global _STATE
        if _STATE is None:
            from eplb.ascend.worker import is_ascend_worker

            if is_ascend_worker(self):  # vllm-ascend's MoE layers and step (eplb.ascend)
                from eplb.ascend.worker import state_from_worker

                _STATE = state_from_worker(self, num_redundant, layers_per_step)
            else:
                _STATE = EplbWorkerState.from_worker(self, num_redundant, layers_per_step)
        if outcome_dir is not None:
            _STATE.outcomes.set_dir(outcome_dir)
        return self.eplb_status()

    def eplb_dp_steps(self) -> int:
        """DP steps this worker has taken part in, dummy batches included (available before
        eplb_setup: the rank group waits for it to stop moving before calling setup)."""
        from eplb.ascend.worker import install_step_sync, is_ascend_worker
        from npu_runtime.eplb_hooks import dp_steps

        if is_ascend_worker(self):  # its runner's DP all-reduce counts the steps once wrapped
            install_step_sync(self.model_runner)
        return dp_steps()

    def eplb_take_load(self) -> dict:
        """Drain recorded counts: {"counts": [[...]] int [layers, E] per logical expert, "physical":
        [[...]] int [layers, E + R] per physical slot, "steps", "calls", "record_us_per_call"}."""
        assert _STATE is not None, "eplb_setup first"
        return _STATE.slots.recorder.take()

    def eplb_placement(self) -> list[list[int]]:
        """phy2log int [layers, E + R] in force now."""
        assert _STATE is not None, "eplb_setup first"
        return _STATE.slots.phy2log.tolist()

    def eplb_stage(self, msg: dict) -> dict:
        """Accept a plan (a PlanMessage.to_dict); see EplbWorkerState.stage."""
        assert _STATE is not None, "eplb_setup first"
        return _STATE.stage(PlanMessage.from_dict(msg))

    def eplb_abort(self, plan_id: int) -> bool:
        return _STATE.abort(int(plan_id)) if _STATE is not None else False

    def eplb_status(self) -> dict:
        return _STATE.status() if _STATE is not None else {"enabled": False}

    def eplb_outcome(self, plan_id: int) -> dict | None:
        """Plan `plan_id`'s history record (as in `eplb_status()["history"]`), None while pending:
        the small reply to poll a plan's end with (the full status is a much larger message)."""
        return _STATE.outcome(int(plan_id)) if _STATE is not None else None

    def eplb_step_log(self, since: float = 0.0) -> list[list[float]]:
        """Engine-side step times since perf_counter `since` (see eplb.steplog.StepLog for the fields)."""
        assert _STATE is not None, "eplb_setup first"
        return [list(e) for e in _STATE.steplog.since(float(since))]

    def eplb_thread_cpu(self) -> dict[str, dict]:
        """CPU time of every thread of this worker process (see thread_cpu_ms); keys are tids."""
        return {str(k): v for k, v in thread_cpu_ms().items()}

    def eplb_fail_next_transfer(self) -> bool:
        """Fault injection (tests): this rank's next staging raises, as a broken peer link would."""
        assert _STATE is not None, "eplb_setup first"
        _STATE.exchanger.fail_next_transfer = True
        return True

    def eplb_set_recording(self, enabled: bool) -> bool:
        assert _STATE is not None, "eplb_setup first"
        _STATE.slots.recorder.enabled = bool(enabled)
        return _STATE.slots.recorder.enabled


__all__ = ["EplbWorkerExtension", "EplbWorkerState"]
