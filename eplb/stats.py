"""Balance metrics over placement tables.

Shapes used throughout the EPLB package:
  load     float [layers, logical_experts]  tokens routed to each logical expert
  phy2log  int64 [layers, num_physical]     logical expert held by each physical slot;
                                            slot s lives on rank s // (num_physical // num_ranks)
  slot_load num  [layers, num_physical]     tokens each physical slot served (the recorder's
                                            physical counts, or `slot_loads` under an even split)

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

    A logical expert's load is split evenly over its replicas (the router splits each batch's tokens
    of an expert evenly over its replicas, eplb.slots.replica_index).
    """
    load = np.asarray(load, dtype=np.float64)
    phy2log = np.asarray(phy2log, dtype=np.int64)
    counts = replica_counts(phy2log, load.shape[1])
    per_replica = load / np.maximum(counts, 1)
    return np.take_along_axis(per_replica, phy2log, axis=1)


def rank_sums(slot_load: np.ndarray, num_ranks: int) -> np.ndarray:
    """Load per rank from load per physical slot: slot_load [layers, num_physical] -> [layers,
    num_ranks], the sum of each rank's contiguous block of slots (its dtype kept)."""
    w = np.asarray(slot_load)
    return w.reshape(w.shape[0], num_ranks, -1).sum(axis=2)


def rank_loads(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """Load per rank: float [layers, num_ranks]; ranks own contiguous blocks of physical slots."""
    return rank_sums(slot_loads(load, phy2log), num_ranks)


def logical_from_slots(slot_load: np.ndarray, phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """Load per logical expert from load per physical slot under one placement: slot_load [layers,
    num_physical], phy2log int [layers, num_physical] -> [layers, num_logical], each expert's
    replicas summed (the recorder's logical counts, where the placement held for the whole count)."""
    w = np.asarray(slot_load)
    out = np.zeros((w.shape[0], num_logical), dtype=w.dtype)
    np.add.at(out, (np.arange(w.shape[0])[:, None], np.asarray(phy2log, dtype=np.int64)), w)
    return out


def rank_imbalance(rank_load: np.ndarray) -> np.ndarray:
    """Per-layer max / mean over ranks of rank_load [layers, num_ranks]: float [layers], 1.0 for a
    layer with no load at all (perfectly balanced rather than NaN)."""
    rl = np.asarray(rank_load, dtype=np.float64)
    mean = rl.mean(axis=1)
    mx = rl.max(axis=1)
    out = np.ones_like(mean)
    nz = mean > 0
    out[nz] = mx[nz] / mean[nz]
    return out


def imbalance(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """Per-layer imbalance, float [layers]: max rank load / mean rank load (1.0 = perfect).

    A layer with no load at all counts as perfectly balanced (1.0) rather than NaN.
    """
    return rank_imbalance(rank_loads(load, phy2log, num_ranks))


def count_moves(old_phy2log: np.ndarray, new_phy2log: np.ndarray) -> int:
    """Number of physical slots (summed over layers) whose logical expert changed."""
    old = np.asarray(old_phy2log)
    new = np.asarray(new_phy2log)
    if old.shape != new.shape:
        raise ValueError(f"count_moves: shapes differ: {old.shape} vs {new.shape}")
    return int(np.count_nonzero(old != new))
