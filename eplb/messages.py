"""The EPLB plan message the EPLB actor (or a benchmark) sends to every rank's worker (`eplb_stage`).

Pure module: plain data and its one codec (`PlanMessage.to_dict` / `PlanMessage.from_dict`), the form
that crosses Ray and vLLM's msgpack RPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eplb.plan import PlanError

# How a plan is staged; a plan message may override any of these under "transfer".
TRANSFER_DEFAULTS: dict[str, Any] = {
    "nice": 19,  # OS priority of the staging thread (Linux: per thread); 0 leaves it alone
    "omp_threads": 1,  # OpenMP threads of the staging thread's own copies; 0 leaves it alone
    "paced": True,  # at most one layer's transfer started per engine step, right after the step
    "timeout_s": 30.0,  # a plan not accepted by every rank by then is dropped (a peer never got it)
    "per_slot": False,  # staging thread: one message per moved slot (a baseline for benchmarks)
    # No staging thread: each step boundary (on the engine's main thread) completes the piece posted
    # one step earlier and posts the next one; gloo's own I/O threads move the bytes during the forward.
    # False: the staging thread (nice, omp_threads, paced, per_slot apply to it only).
    "inline": True,
    # Inline staging: at most this many slots per rank pair in one step's piece of a layer (0: the whole
    # layer in one piece). Every rank derives the same pieces from the plan. One slot is a contiguous
    # row: sent straight from the weights, no gather copy.
    "slots_per_step": 1,
    "split_weights": False,  # inline: a piece's w13 and w2 rows in two successive steps (half the bytes each)
    # Inline: post, at each step boundary, as many pieces as the group's last step would hide
    # (eplb.pacing.layers_this_step over the pieces' seconds at link_gb_per_s, the step time the ranks'
    # mean from the step sync, so every rank posts the same pieces), at least one. False: one per step.
    "fit_step": False,
    # What fit_step assumes a piece costs: its busiest rank pair's bytes at link_gb_per_s (GB/s), plus
    # piece_latency_ms for posting and matching its messages.
    "link_gb_per_s": 1.0,
    "piece_latency_ms": 0.0,
    # Where an async plan is prepared (TransferPlan diff and validation, pieces; inline: every layer's
    # exchange layout, receive buffers and commit tables): "thread" - `eplb_stage` returns after the cheap
    # checks and a background thread (nice, one OpenMP thread) prepares it; the rank contributes the id to
    # the start agreement only once that is done. "step" - all of it inside the `eplb_stage` RPC (on the
    # engine's stepping thread), a layer's layout when its first piece is posted.
    "prepare": "thread",
}


def transfer_options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """TRANSFER_DEFAULTS with `overrides`; PlanError names unknown keys and out-of-range fit_step costs."""
    unknown = set(overrides) - set(TRANSFER_DEFAULTS)
    if unknown:
        raise PlanError(f"unknown transfer options {sorted(unknown)}; known: {sorted(TRANSFER_DEFAULTS)}")
    opts = {**TRANSFER_DEFAULTS, **overrides}
    rate, latency = opts["link_gb_per_s"], opts["piece_latency_ms"]
    if not (
        isinstance(rate, (int, float)) and rate > 0 and isinstance(latency, (int, float)) and latency >= 0
    ):
        raise PlanError(f"link_gb_per_s must be > 0 and piece_latency_ms >= 0, got {rate!r} and {latency!r}")
    return opts


@dataclass(frozen=True)
class PlanMessage:
    """Move the EP group from placement ``old`` to ``new``.

    old, new:  phy2log int [layers, E + R] (nested lists or an array; checked by the worker, which
               rejects a malformed or stale plan before anything moves)
    num_ranks: EP ranks the plan is for
    blocking:  stop-the-world: transfer and commit every layer inside one agreed step
    transfer:  overrides of TRANSFER_DEFAULTS (unknown keys are rejected by `options`)
    """

    plan_id: int
    old: Any
    new: Any
    num_ranks: int
    blocking: bool = False
    transfer: Mapping[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """TRANSFER_DEFAULTS with this message's overrides (`transfer_options`)."""
        return transfer_options(self.transfer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_id": int(self.plan_id),
            "old": np.asarray(self.old).tolist(),
            "new": np.asarray(self.new).tolist(),
            "num_ranks": int(self.num_ranks),
            "blocking": bool(self.blocking),
            "transfer": dict(self.transfer),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanMessage:
        return cls(
            plan_id=int(d["plan_id"]),
            old=d["old"],
            new=d["new"],
            num_ranks=int(d["num_ranks"]),
            blocking=bool(d.get("blocking", False)),
            transfer=dict(d.get("transfer") or {}),
        )
