"""Balance metrics over placement tables.

Shapes used throughout the EPLB package:
  load     float [layers, logical_experts]  tokens routed to each logical expert
  phy2log  int64 [layers, num_physical]     logical expert held by each physical slot;
                                            slot s lives on rank s // (num_physical // num_ranks)

These functions trust their inputs (no validation) because the planners call them in inner loops;
`eplb.plan.validate_placement` is the checked entry point.
"""

from __future__ import annotations

import numpy as np


def replica_counts(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """Replicas per logical expert: int64 [layers, num_logical] from phy2log [layers, num_physical]."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    layers = phy2log.shape[0]
    # Offsetting each layer's ids makes one bincount do every layer at once.
    flat = (phy2log + np.arange(layers, dtype=np.int64)[:, None] * num_logical).ravel()
    return np.bincount(flat, minlength=layers * num_logical).reshape(layers, num_logical)


def slot_loads(load: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    """Load served by each physical slot: float [layers, num_physical].

    A logical expert's load is split evenly over its replicas (the router spreads tokens round-robin).
    """
    load = np.asarray(load, dtype=np.float64)
    phy2log = np.asarray(phy2log, dtype=np.int64)
    counts = replica_counts(phy2log, load.shape[1])
    per_replica = load / np.maximum(counts, 1)
    return np.take_along_axis(per_replica, phy2log, axis=1)


def rank_loads(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """Load per rank: float [layers, num_ranks]; ranks own contiguous blocks of physical slots."""
    w = slot_loads(load, phy2log)
    return w.reshape(w.shape[0], num_ranks, -1).sum(axis=2)


def imbalance(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """Per-layer imbalance, float [layers]: max rank load / mean rank load (1.0 = perfect).

    A layer with no load at all counts as perfectly balanced (1.0) rather than NaN.
    """
    rl = rank_loads(load, phy2log, num_ranks)
    mean = rl.mean(axis=1)
    mx = rl.max(axis=1)
    out = np.ones_like(mean)
    nz = mean > 0
    out[nz] = mx[nz] / mean[nz]
    return out


def count_moves(old_phy2log: np.ndarray, new_phy2log: np.ndarray) -> int:
    """Number of physical slots (summed over layers) whose logical expert changed."""
    old = np.asarray(old_phy2log)
    new = np.asarray(new_phy2log)
    if old.shape != new.shape:
        raise ValueError(f"count_moves: shapes differ: {old.shape} vs {new.shape}")
    return int(np.count_nonzero(old != new))
