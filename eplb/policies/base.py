"""Placement data type and the helpers every policy shares.

Kept apart from `eplb.policies.__init__` so policy modules can import it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eplb.stats import imbalance, replica_counts


@dataclass
class Placement:
    """A complete expert placement for every MoE layer.

    phy2log:       int64 [layers, num_ranks * slots_per_rank]  logical expert held by each physical slot
    log2phy:       int64 [layers, logical_experts, max_replicas] physical slots of each expert, -1 padded
    replica_count: int64 [layers, logical_experts]
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    replica_count: np.ndarray


def placement_from_phy2log(phy2log: np.ndarray, num_logical: int) -> Placement:
    """Build log2phy [layers, num_logical, max_replicas] and replica_count from phy2log [layers, P].

    Slots of one expert are listed in increasing physical index, so the table is deterministic.
    """
    phy2log = np.ascontiguousarray(phy2log, dtype=np.int64)
    layers, num_phys = phy2log.shape
    counts = replica_counts(phy2log, num_logical)
    max_rep = max(int(counts.max()) if counts.size else 0, 1)
    # A stable sort by expert id groups each expert's slots in slot order; the rank of a slot inside
    # its group is its position minus the group's start offset.
    order = np.argsort(phy2log, axis=1, kind="stable")
    sorted_exp = np.take_along_axis(phy2log, order, axis=1)
    starts = np.cumsum(counts, axis=1) - counts
    pos = np.arange(num_phys)[None, :] - np.take_along_axis(starts, sorted_exp, axis=1)
    log2phy = np.full((layers, num_logical, max_rep), -1, dtype=np.int64)
    rows = np.broadcast_to(np.arange(layers)[:, None], order.shape)
    log2phy[rows, sorted_exp, pos] = order
    return Placement(phy2log=phy2log, log2phy=log2phy, replica_count=counts)


def default_placement(num_layers: int, num_logical: int, num_ranks: int, num_redundant: int) -> np.ndarray:
    """Identity-like phy2log int64 [num_layers, num_logical + num_redundant].

    Expert i sits in slot i; redundant slot num_logical + j holds expert j % num_logical. Every layer is
    the same. This is what a rank loads at start-up before any load has been observed.
    """
    num_phys = num_logical + num_redundant
    if num_ranks <= 0 or num_phys % num_ranks:
        raise ValueError(f"{num_phys} physical slots cannot be split evenly over {num_ranks} ranks")
    row = np.arange(num_phys, dtype=np.int64) % num_logical
    return np.tile(row, (num_layers, 1))


def keep_better(
    load: np.ndarray, new: np.ndarray, current: np.ndarray, num_ranks: int, rel_tol: float = 1e-9
) -> np.ndarray:
    """Per layer, keep `current` unless `new` is strictly more balanced.

    Guarantees a policy never makes a layer worse, and that a layer with no gain costs no transfers.
    All arrays are [layers, ...]; returns a new phy2log [layers, num_physical].
    """
    imb_new = imbalance(load, new, num_ranks)
    imb_cur = imbalance(load, current, num_ranks)
    better = imb_new < imb_cur * (1.0 - rel_tol)
    return np.where(better[:, None], new, current).astype(np.int64)
