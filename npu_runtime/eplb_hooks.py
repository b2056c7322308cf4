"""The online EPLB's hooks into vLLM's step: what the patches in npu_runtime.vllm_patches call.

Two generic hooks, with no EPLB logic here (npu_runtime must not import eplb/; the rank-side
applier in `eplb.applier` attaches duck-typed objects to them):

* Routing: `BaseRouter._apply_eplb_mapping` (logical -> physical expert ids, a no-op on CPU) is
  patched to call `router._dpserve_route(topk_ids)` when a router has one. The applier installs a
  callable that records per-expert token counts and maps logical ids to physical slots through
  tables it updates in place. Patched at class level before any model is built, so a compiled
  graph traces the patched method; the tables it reads are tensors updated in place only. (Tested
  in eager mode, the CPU default; attaching `_dpserve_route` after a graph was traced without it
  would not be seen by that graph.)
* Per-step agreement: `vllm.v1.worker.dp_utils._run_ar` is the all-reduce every DP rank runs once
  per engine step (dummy batches included) to agree on padding. When a step-sync participant is
  registered, extra rows ride on that same all-reduce: no additional collective per step, and every
  rank sees the same sums at the same step, which is what a consistent table switch needs.
"""

from __future__ import annotations

import logging
from typing import Protocol

logger = logging.getLogger("dpserve.eplb_hooks")


class StepSyncParticipant(Protocol):
    """Something that contributes `num_rows` int32 values per DP step and acts on their sums."""

    num_rows: int

    def contribute(self) -> list[int]:
        """This rank's values for this step (len == num_rows)."""

    def on_sums(self, sums: list[int], dp_size: int) -> None:
        """Sums over all DP ranks of every rank's contribution (same on every rank)."""


# At most one participant (the EPLB applier of this worker); a list keeps the wire format explicit.
_PARTICIPANTS: list[StepSyncParticipant] = []
_DP_STEPS = 0  # calls of the per-step DP all-reduce in this process (see dp_steps)


def register_step_sync(p: StepSyncParticipant) -> None:
    """Add a participant. Every DP rank must register the same participants (they change the shape
    of the per-step all-reduce)."""
    if p not in _PARTICIPANTS:
        _PARTICIPANTS.append(p)


def unregister_step_sync(p: StepSyncParticipant) -> None:
    if p in _PARTICIPANTS:
        _PARTICIPANTS.remove(p)


def count_dp_step() -> None:
    """Called by the patched `_run_ar` once per DP step (npu_runtime.vllm_patches)."""
    global _DP_STEPS
    _DP_STEPS += 1


def extra_rows() -> int:
    """Rows the participants add to this step's all-reduce (0: vLLM's own all-reduce runs)."""
    return sum(p.num_rows for p in _PARTICIPANTS)


def contributions() -> list[int]:
    """This rank's values for this step, every participant's rows in registration order."""
    values: list[int] = []
    for p in _PARTICIPANTS:
        mine = [int(v) for v in p.contribute()][: p.num_rows]
        values += mine + [0] * (p.num_rows - len(mine))
    return values


def deliver_sums(sums: list[int], dp_size: int) -> None:
    """Hand each participant its rows of the summed all-reduce (the same on every rank)."""
    row = 0
    for p in _PARTICIPANTS:
        try:
            p.on_sums(sums[row : row + p.num_rows], dp_size)
        except Exception:  # a participant must never break the engine step
            logger.exception("dpserve step-sync participant failed")
        row += p.num_rows


def dp_steps() -> int:
    """DP steps this process has taken part in (dummy batches included). Unchanged on every rank
    over a while means the DP wave has ended: no rank is inside a step's collectives, so a new
    collective (a process group's creation) cannot interleave with one."""
    return _DP_STEPS
