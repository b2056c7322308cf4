"""Per-layer token counts, recorded in the worker from the router: per logical expert and per
physical slot.

The router hook (`eplb.slots.LayerRouting.__call__`) calls `record(layer, topk_ids, phys_ids)` with
the LOGICAL ids of every routed token and the PHYSICAL slots it sent them to (the replica it picked
for each token). Counts accumulate into two preallocated int64 tensors, `counts` [num_layers,
num_logical] and `physical` [num_layers, num_physical] (one bincount + add_ each per layer call, no
Python loop over tokens); the rank actor drains both with `take()` through a worker-extension RPC and
feeds its LoadWindows.

Why both: the planner needs the logical load (what each expert is asked for, whatever the placement),
and only the physical counts say how a replicated expert's tokens split over its replicas (the router
picks a replica by token index, which need not split evenly), hence what each rank actually ran. A
slot never changes rank, only the expert it holds, so a rank's load (the sum of its slots) stays
exact across a plan committed between two takes.

Under DP with an all-gather MoE (CPU, AgRs), every rank routes all gathered tokens through the same
tables, so each rank's counts, logical and physical, are already the global counts; dummy batches of
idle ranks are counted too (a small bias toward the experts a dummy batch picks).
"""

from __future__ import annotations

import time

import numpy as np
import torch


class ExpertLoadRecorder:
    """Accumulates counts int64 [num_layers, num_logical] and physical int64 [num_layers,
    num_physical]; `steps` counts forward passes. `num_physical` defaults to num_logical (no
    redundant slots)."""

    def __init__(self, num_layers: int, num_logical: int, num_physical: int | None = None) -> None:
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.num_physical = num_logical if num_physical is None else int(num_physical)
        if self.num_physical < num_logical:
            raise ValueError(f"{self.num_physical} physical slots for {num_logical} logical experts")
        self.counts = torch.zeros(num_layers, num_logical, dtype=torch.int64)
        self.physical = torch.zeros(num_layers, self.num_physical, dtype=torch.int64)
        self.enabled = True
        self.steps = 0  # forward passes seen by layer 0 since the last take()
        self.record_ns = 0  # time spent in record() since the last take() (cost accounting)
        self.calls = 0

    def record(self, layer: int, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> None:
        """Add one layer call's routed tokens: topk_ids int [tokens, top_k] logical ids and, where the
        caller maps them, phys_ids int [tokens, top_k] the physical slot each went to."""
        if not self.enabled:
            return
        t0 = time.perf_counter_ns()
        if layer == 0:
            self.steps += 1
        flat = topk_ids.reshape(-1)
        if flat.numel():
            # bincount (not index_add_ of ones) avoids a ones tensor; minlength keeps the shape fixed
            # (a longer result, an id out of range, fails in add_ instead of being dropped).
            self.counts[layer].add_(torch.bincount(flat.to(torch.int64), minlength=self.num_logical))
            if phys_ids is not None:
                pflat = phys_ids.reshape(-1).to(torch.int64)
                self.physical[layer].add_(torch.bincount(pflat, minlength=self.num_physical))
        self.calls += 1
        self.record_ns += time.perf_counter_ns() - t0

    def take(self) -> dict:
        """Drain: {"counts": int64 [num_layers, num_logical], "physical": int64 [num_layers,
        num_physical] (both nested lists), "steps", "calls", "record_us_per_call"}."""
        counts = self.counts.numpy().copy()
        physical = self.physical.numpy().copy()
        self.counts.zero_()
        self.physical.zero_()
        out = {
            "counts": counts.tolist(),
            "physical": physical.tolist(),
            "steps": self.steps,
            "record_us_per_call": (self.record_ns / self.calls / 1e3) if self.calls else 0.0,
            "calls": self.calls,
        }
        self.steps = 0
        self.record_ns = 0
        self.calls = 0
        return out


def counts_array(taken: dict) -> np.ndarray:
    """The logical counts of a `take()` result as int64 [num_layers, num_logical]."""
    return np.asarray(taken["counts"], dtype=np.int64)


def physical_array(taken: dict) -> np.ndarray:
    """The per-slot counts of a `take()` result as int64 [num_layers, num_physical]."""
    return np.asarray(taken["physical"], dtype=np.int64)
