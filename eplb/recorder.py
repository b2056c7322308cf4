"""Per-layer, per-logical-expert token counts, recorded in the worker from the router.

The router hook (`eplb.slots.LayerRouting.__call__`) calls `record(layer, topk_ids)` with the
LOGICAL ids of every routed token. Counts accumulate into one preallocated int64 tensor
[num_layers, num_logical] (one bincount + add_ per layer call, no Python loop over tokens); the rank
actor drains them with `take()` through a worker-extension RPC and feeds its LoadWindow.

Under DP with an all-gather MoE (CPU, AgRs), every rank routes all gathered tokens, so each rank's
counts are already the global counts; dummy batches of idle ranks are counted too (a small bias
toward the experts a dummy batch picks).
"""

from __future__ import annotations

import time

import numpy as np
import torch


class ExpertLoadRecorder:
    """Accumulates counts int64 [num_layers, num_logical]; `steps` counts forward passes."""

    def __init__(self, num_layers: int, num_logical: int) -> None:
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.counts = torch.zeros(num_layers, num_logical, dtype=torch.int64)
        self.enabled = True
        self.steps = 0  # forward passes seen by layer 0 since the last take()
        self.record_ns = 0  # time spent in record() since the last take() (cost accounting)
        self.calls = 0

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add one layer call's routed tokens: topk_ids int [tokens, top_k], logical ids."""
        if not self.enabled:
            return
        t0 = time.perf_counter_ns()
        if layer == 0:
            self.steps += 1
        flat = topk_ids.reshape(-1)
        if flat.numel():
            # bincount (not index_add_ of ones) avoids a ones tensor; minlength keeps the shape fixed.
            self.counts[layer].add_(torch.bincount(flat.to(torch.int64), minlength=self.num_logical))
        self.calls += 1
        self.record_ns += time.perf_counter_ns() - t0

    def take(self) -> dict:
        """Drain: {"counts": int64 [num_layers, num_logical] as nested lists, "steps", "record_us_per_call"}."""
        counts = self.counts.numpy().copy()
        self.counts.zero_()
        out = {
            "counts": counts.tolist(),
            "steps": self.steps,
            "record_us_per_call": (self.record_ns / self.calls / 1e3) if self.calls else 0.0,
            "calls": self.calls,
        }
        self.steps = 0
        self.record_ns = 0
        self.calls = 0
        return out


def counts_array(taken: dict) -> np.ndarray:
    """The counts of a `take()` result as int64 [num_layers, num_logical]."""
    return np.asarray(taken["counts"], dtype=np.int64)
