"""A rank's side of online EPLB: its worker's slots and tables, its load window, and plan outcomes.

The EPLB actor (eplb/actor.py) drives these through the rank actor (`DPRank.eplb_*`); the worker
side runs in the engine (eplb.applier.EplbWorkerExtension), reached by `call` (collective_rpc).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from deployments.config import EplbSection

# (worker-extension method, *args) -> its result in this rank's worker.
WorkerCall = Callable[..., Awaitable[Any]]
# Seconds without an outcome file after which the engine is asked (a write that failed).
OUTCOME_FILE_GRACE_S = 2.0


class RankEplb:
    """EPLB state of DP rank `rank`: set up by `setup()` (every rank together, while idle)."""

    def __init__(
        self,
        rank: int,
        config: EplbSection | None,
        call: WorkerCall,
        engine_running: Callable[[], bool],
        outcome_dir: str | None = None,
    ) -> None:
        """`outcome_dir`: where the worker's plan records are read from (set by `setup`; given here
        only by tests and tools that point at a worker's directory)."""
        self.rank = rank
        self.config = config or EplbSection()
        self.call = call
        self.engine_running = engine_running
        self.outcome_dir = outcome_dir
        self.misses: dict[int, float] = {}  # plan id -> since when it has had no file
        self.window: Any = None  # eplb.load.LoadWindow once set up: logical counts [layers, E]
        self.slot_window: Any = None  # LoadWindow of physical-slot counts [layers, E + R]
        self.ep_size = 1  # EP ranks the slots are spread over (from the worker's status)
        self.steps = 0  # engine steps in the window so far

    async def setup(self) -> dict[str, Any]:
        """Install physical slots and tables in the worker and start the LoadWindows (logical
        counts for the planner, physical-slot counts for the per-rank load)."""
        from eplb.load import LoadWindow

        # Plan records also land in a per-rank file the worker (in the engine core, our child on this
        # host) writes: pollers read it here instead of calling into the engine (outcome_local).
        outcome_dir = os.path.join(tempfile.gettempdir(), f"dpserve-eplb-{os.getpid()}-r{self.rank}")
        status = await self.call("eplb_setup", self.config.num_redundant, self.config.layers_per_step,
                                 outcome_dir)  # fmt: skip
        self.outcome_dir = status.get("outcome_dir")
        self.misses = {}
        placement = await self.call("eplb_placement")
        self.window = LoadWindow(len(placement), status["num_logical"], self.config.window_samples)
        self.slot_window = LoadWindow(len(placement), status["num_physical"], self.config.window_samples)
        self.ep_size = int(status.get("ep_size", 1))
        self.steps = 0
        return status

    async def collect(self) -> dict[str, Any]:
        """Drain the worker's counts into the LoadWindows (one sample per call); returns
        {"load": float [layers, E] window total per logical expert, "slot_load": float [layers, E + R]
        per physical slot, "rank_load": float [layers, ep_size] per EP rank (the sum of the slots it
        hosts: what each rank ran, however a replicated expert's tokens split), "steps": engine
        steps in the window so far, "samples", "complete", "record_us_per_call"}."""
        import numpy as np

        from eplb.stats import rank_sums

        taken = await self.call("eplb_take_load")
        self.window.add(np.asarray(taken["counts"], dtype=np.int64))
        self.slot_window.add(np.asarray(taken["physical"], dtype=np.int64))
        self.steps += int(taken["steps"])
        slot_load = self.slot_window.total()
        return {
            "rank": self.rank,
            "load": self.window.total().tolist(),
            "slot_load": slot_load.tolist(),
            "rank_load": rank_sums(slot_load, self.ep_size).tolist(),
            "steps": self.steps,
            "samples": self.window.steps_recorded,
            "complete": self.window.is_complete(),
            "record_us_per_call": taken["record_us_per_call"],
        }

    async def outcome_local(self, plan_id: int, wait_s: float = 0.0) -> dict[str, Any] | None:
        """Plan `plan_id`'s record (as the worker's `eplb_outcome`), None while it is pending, read from
        the file the worker writes when the plan ends: no call into the engine, whose stepping thread
        runs every call between steps. With `wait_s`, waits up to that long for the file here (checked
        every 50 ms), so a poller needs one call per plan instead of one per interval. Asks the engine
        instead when the worker writes no files, and every OUTCOME_FILE_GRACE_S without a file (a write
        that failed: the plan's end is still reported); raises when the engine is gone, as the engine
        call would."""
        d = self.outcome_dir
        pid = int(plan_id)
        t_end = time.monotonic() + max(0.0, float(wait_s))
        while True:
            if not self.engine_running():
                raise RuntimeError(f"DP rank {self.rank} engine is not running")
            if not d:
                return await self.call("eplb_outcome", pid)
            try:
                with open(os.path.join(d, f"plan-{pid}.json")) as f:
                    rec = json.load(f)
                self.misses.pop(pid, None)
                return rec
            except FileNotFoundError:
                pass
            for k in [k for k in self.misses if k < pid - 20]:
                del self.misses[k]
            t_miss = self.misses.setdefault(pid, time.monotonic())
            if time.monotonic() - t_miss >= OUTCOME_FILE_GRACE_S:  # ask the engine, again 2 s on
                self.misses[pid] = time.monotonic()
                rec = await self.call("eplb_outcome", pid)
                if rec is not None:
                    return rec
            if time.monotonic() >= t_end:
                return None
            await asyncio.sleep(min(0.05, max(0.0, t_end - time.monotonic())))

    def reset_window(self) -> None:
        """Forget the window (after a committed rebalance: the next plan sees the new regime)."""
        self.window.reset()
        self.slot_window.reset()
        self.steps = 0

    def remove_outcome_files(self) -> None:
        """Remove the plan records the worker wrote for this rank."""
        if self.outcome_dir:
            shutil.rmtree(self.outcome_dir, ignore_errors=True)
            self.outcome_dir = None
