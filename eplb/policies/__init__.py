"""Expert placement policies.

    rebalance(policy, load, num_ranks, num_redundant, ...) -> Placement

Policies (POLICIES keys):
  deepseek               DeepSeek EPLB: hierarchical when num_nodes > 1 and groups/nodes/ranks divide
                         evenly, else global. Best balance, ignores the current placement.
  deepseek_hierarchical  always hierarchical (expert groups packed onto nodes first); ValueError if the
                         counts do not divide.
  deepseek_global        replicate + pack over all ranks, groups and nodes ignored.
  swift                  movement-aware: starts from `current`, skips balanced layers, caps moves per
                         rank pair (params: threshold, min_gain, max_pair_moves, max_swaps, reassign).

Every policy result is post-processed so that no layer gets worse than the input placement (`current`, or
`default_placement` when none is given): such layers keep the input unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from eplb.policies.base import Placement, default_placement, keep_better, placement_from_phy2log
from eplb.policies.deepseek import policy_deepseek, policy_deepseek_global, policy_deepseek_hierarchical
from eplb.policies.swift import SwiftParams, policy_swift

__all__ = [
    "POLICIES",
    "Placement",
    "SwiftParams",
    "default_placement",
    "placement_from_phy2log",
    "rebalance",
]

# name -> fn(load, num_ranks, num_redundant, *, num_nodes, num_groups, current, **params) -> phy2log
POLICIES: dict[str, Callable[..., np.ndarray]] = {
    "deepseek": policy_deepseek,
    "deepseek_hierarchical": policy_deepseek_hierarchical,
    "deepseek_global": policy_deepseek_global,
    "swift": policy_swift,
}


def _check_inputs(load: np.ndarray, num_ranks: int, num_redundant: int, current: np.ndarray | None) -> None:
    """Raise ValueError for inputs no policy can plan with."""
    if load.ndim != 2 or load.shape[0] < 1 or load.shape[1] < 1:
        raise ValueError(
            f"load must be a non-empty 2-D array [layers, logical_experts], got shape {load.shape}"
        )
    if not np.all(np.isfinite(load)):
        raise ValueError("load contains NaN or infinite values")
    if np.any(load < 0):
        raise ValueError("load contains negative values")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if num_redundant < 0:
        raise ValueError(f"num_redundant must be >= 0, got {num_redundant}")
    num_phys = load.shape[1] + num_redundant
    if num_phys % num_ranks:
        raise ValueError(
            f"{load.shape[1]} experts + {num_redundant} redundant = {num_phys} slots, not divisible by {num_ranks} ranks"
        )
    if current is not None:
        # Imported here: eplb.plan imports this package for Placement helpers.
        from eplb.plan import validate_placement

        validate_placement(current, load.shape[1], num_ranks)
        if current.shape != (load.shape[0], num_phys):
            raise ValueError(
                f"current placement has shape {current.shape}, expected {(load.shape[0], num_phys)}"
            )


def rebalance(
    policy: str,
    load: np.ndarray,
    num_ranks: int,
    num_redundant: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    current: np.ndarray | None = None,
    **params: object,
) -> Placement:
    """Plan a placement for load float [layers, logical_experts].

    current: optional phy2log int64 [layers, logical_experts + num_redundant] the ranks hold now.
    params: policy-specific knobs (only `swift` takes any). Raises ValueError (PlanError for a malformed
    `current`) on bad inputs and KeyError for an unknown policy.
    """
    if policy not in POLICIES:
        raise KeyError(f"unknown EPLB policy {policy!r}; choose from {sorted(POLICIES)}")
    load = np.asarray(load, dtype=np.float64)
    if current is not None:
        current = np.asarray(current)
    _check_inputs(load, num_ranks, num_redundant, current)
    num_logical = load.shape[1]
    baseline = (
        current.astype(np.int64)
        if current is not None
        else default_placement(load.shape[0], num_logical, num_ranks, num_redundant)
    )
    new = POLICIES[policy](
        load, num_ranks, num_redundant, num_nodes=num_nodes, num_groups=num_groups, current=baseline, **params
    )
    new = keep_better(load, new, baseline, num_ranks)
    return placement_from_phy2log(new, num_logical)
