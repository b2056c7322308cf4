"""Plan outcome records of one worker: the last 20 in memory and, with an outcome directory, one file
per plan that the rank actor reads instead of calling into the engine
(deployments.rank_eplb.RankEplb.outcome_local)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Any

from eplb.pending import PendingPlan

logger = logging.getLogger("dpserve.eplb.applier")

KEEP = 20  # records (and files) kept


class OutcomeLog:
    """`records`: the last KEEP plan records ({"plan_id", "outcome", ...}), oldest first."""

    def __init__(self, outcome_dir: str | None = None) -> None:
        self.records: list[dict] = []
        self.outcome_dir: str | None = None
        self._files: deque[str] = deque()
        if outcome_dir is not None:
            self.set_dir(outcome_dir)

    def set_dir(self, path: str | None) -> str | None:
        """Also write every plan record to `path`/plan-<id>.json (atomically, the last KEEP kept), so that
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

    def record(self, plan_id: int, outcome: str, **info: Any) -> None:
        self.records.append({"plan_id": plan_id, "outcome": outcome, **info})
        del self.records[:-KEEP]
        if self.outcome_dir:
            self._write(self.records[-1])

    def outcome(self, plan_id: int) -> dict | None:
        """Plan `plan_id`'s record, or None while it is pending (or unknown)."""
        for h in reversed(self.records):
            if h["plan_id"] == plan_id:
                return h
        return None

    def _write(self, rec: dict) -> None:
        d = self.outcome_dir
        assert d is not None
        path = os.path.join(d, f"plan-{int(rec['plan_id'])}.json")
        try:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(rec, f, default=lambda o: o.item() if hasattr(o, "item") else str(o))
            os.replace(tmp, path)  # readers see the whole record or nothing
            self._files.append(path)
            while len(self._files) > KEEP:
                old = self._files.popleft()
                if old != path:
                    try:
                        os.remove(old)
                    except OSError:
                        pass
        except (OSError, TypeError, ValueError):
            # The rank falls back to asking the engine (eplb_outcome) for a plan whose file never comes.
            logger.exception("EPLB plan %s: could not write its outcome file", rec.get("plan_id"))


def plan_record(p: PendingPlan) -> dict[str, Any]:
    """The fields of a finished plan's record besides its id and outcome (times: ms; t_*: perf_counter)."""
    layers = p.plan.layers() if p.plan is not None else []
    return dict(
        error=p.failed, prep_ms=p.prep_ms, prep_cpu_ms=p.prep_cpu_ms,
        prepare=str(p.opts["prepare"]), stage_ms=p.stage_ms, stage_cpu_ms=p.stage_cpu_ms, commit_ms_total=sum(p.commit_ms),
        commit_ms_max_step=max(p.commit_ms, default=0.0), commit_steps=len(p.commit_ms),
        steps_waited=p.steps_waited, remote_bytes=p.remote_bytes, layers=len(layers),
        moved_slots=sum(len(p.plan.ops_by_layer[x]) for x in layers),
        total_ms=(time.perf_counter() - p.t_received) * 1e3, blocking=p.blocking,
        t_received=p.t_received, t_ready=p.t_ready, t_finished=time.perf_counter(),
        transfer_layers=[[lay, (a - p.t_received) * 1e3, (b - a) * 1e3] for lay, a, b in p.layer_ms],
        wait_ms=[round(x, 3) for x in p.wait_ms], inline=bool(p.opts["inline"]),
        inline_steps=[[round(a, 3), round(b, 3)] for a, b in p.inline_steps], pieces_posted=p.seq,
    )  # fmt: skip
