"""vLLM patches the online EPLB needs, installed by the dpserve plugin in every vLLM process.

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
from collections.abc import Callable
from typing import Any, Protocol

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
_APPLIED = False
_DP_STEPS = 0  # calls of the per-step DP all-reduce in this process (see dp_steps)


def register_step_sync(p: StepSyncParticipant) -> None:
    """Add a participant. Every DP rank must register the same participants (they change the shape
    of the per-step all-reduce)."""
    if p not in _PARTICIPANTS:
        _PARTICIPANTS.append(p)


def unregister_step_sync(p: StepSyncParticipant) -> None:
    if p in _PARTICIPANTS:
        _PARTICIPANTS.remove(p)


def _patch_router() -> None:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    if getattr(BaseRouter._apply_eplb_mapping, "_dpserve", False):
        return
    original: Callable[..., Any] = BaseRouter._apply_eplb_mapping

    def _apply_eplb_mapping(self, topk_ids):
        route = getattr(self, "_dpserve_route", None)
        if route is not None:
            return route(topk_ids)
        return original(self, topk_ids)

    _apply_eplb_mapping._dpserve = True  # type: ignore[attr-defined]
    BaseRouter._apply_eplb_mapping = _apply_eplb_mapping


def _patch_dp_sync() -> None:
    import torch
    import torch.distributed as dist
    from vllm.v1.worker import dp_utils

    if getattr(dp_utils._run_ar, "_dpserve", False):
        return
    original = dp_utils._run_ar

    def _run_ar(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch, cudagraph_mode,
                parallel_config):  # fmt: skip
        global _DP_STEPS
        _DP_STEPS += 1
        if not _PARTICIPANTS:
            return original(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch,
                            cudagraph_mode, parallel_config)  # fmt: skip
        # Same layout as vLLM's (rows 0..3), extra rows appended; the caller only reads rows 0..3.
        dp_size = parallel_config.data_parallel_size
        dp_rank = parallel_config.data_parallel_rank
        extra = sum(p.num_rows for p in _PARTICIPANTS)
        device, group = dp_utils._get_device_and_group(parallel_config)
        t = torch.zeros(4 + extra, dp_size, dtype=torch.int32)
        t[0][dp_rank] = orig_num_tokens_per_ubatch
        t[1][dp_rank] = padded_num_tokens_per_ubatch
        t[2][dp_rank] = 1 if should_ubatch else 0
        t[3][dp_rank] = cudagraph_mode
        row = 4
        for p in _PARTICIPANTS:
            vals = p.contribute()
            for i, v in enumerate(vals):
                t[row + i][dp_rank] = int(v)
            row += p.num_rows
        t = t.to(device)
        dist.all_reduce(t, group=group)
        sums_all = t[4:].sum(dim=1).cpu().tolist()
        row = 0
        for p in _PARTICIPANTS:
            try:
                p.on_sums([int(x) for x in sums_all[row : row + p.num_rows]], dp_size)
            except Exception:  # a participant must never break the engine step
                logger.exception("dpserve step-sync participant failed")
            row += p.num_rows
        return t[:4]

    _run_ar._dpserve = True  # type: ignore[attr-defined]
    dp_utils._run_ar = _run_ar


def dp_steps() -> int:
    """DP steps this process has taken part in (dummy batches included). Unchanged on every rank
    over a while means the DP wave has ended: no rank is inside a step's collectives, so a new
    collective (a process group's creation) cannot interleave with one."""
    return _DP_STEPS


def install() -> None:
    """Install both patches once per process (called from the dpserve vLLM plugin)."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_router()
    _patch_dp_sync()
    _APPLIED = True
