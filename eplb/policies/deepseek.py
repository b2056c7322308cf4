"""DeepSeek-style EPLB (after the public algorithm; this is an independent implementation).

Two steps, both vectorised over a batch dimension B (layers, or layers x nodes):
  1. replicate: give each redundant slot to the expert with the highest load / replica_count;
  2. pack: place the physical replicas onto ranks, heaviest first, each onto the lightest rank that still
     has a free slot, so every rank ends with exactly slots_per_rank replicas.
The hierarchical variant first packs expert groups onto nodes (so the experts of one group, which the
router's group-limited top-k tends to pick together, stay inside a node), then replicates and packs inside
each node. The global variant ignores groups and nodes.

The output ignores the current placement entirely: it is the balance reference, not movement-aware.
"""

from __future__ import annotations

import numpy as np


def replicate_experts(load: np.ndarray, num_physical: int) -> np.ndarray:
    """Replica counts int64 [B, E] for load float [B, E] over num_physical >= E slots.

    Each extra slot goes to the expert with the highest per-replica load (ties: lowest expert id),
    which minimises the largest per-replica load.
    """
    batch, num_experts = load.shape
    if num_physical < num_experts:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_experts} experts")
    counts = np.ones((batch, num_experts), dtype=np.int64)
    rows = np.arange(batch)
    for _ in range(num_physical - num_experts):
        best = np.argmax(load / counts, axis=1)
        counts[rows, best] += 1
    return counts


def expand_replicas(load: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Physical items for counts int64 [B, E] (rows summing to P).

    Returns (item_expert int64 [B, P], item_weight float [B, P]); items of one expert are adjacent and
    each carries load / count.
    """
    batch, num_experts = counts.shape
    num_phys = int(counts[0].sum())
    ids = np.tile(np.arange(num_experts, dtype=np.int64), batch)
    item_expert = np.repeat(ids, counts.ravel()).reshape(batch, num_phys)
    per_replica = load / counts
    item_weight = np.take_along_axis(per_replica, item_expert, axis=1)
    return item_expert, item_weight


def balanced_packing(weights: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack items float [B, N] into num_bins bins of exactly N / num_bins items each.

    Heaviest item first, onto the lightest bin that is not full (ties: lowest bin index).
    Returns (bin int64 [B, N], position inside the bin int64 [B, N]).
    """
    batch, num_items = weights.shape
    if num_items % num_bins:
        raise ValueError(f"{num_items} items cannot be split evenly over {num_bins} bins")
    cap = num_items // num_bins
    rows = np.arange(batch)
    order = np.argsort(-weights, axis=1, kind="stable")
    bin_of = np.empty((batch, num_items), dtype=np.int64)
    pos_of = np.empty((batch, num_items), dtype=np.int64)
    if cap == 1:
        # One item per bin: the greedy rule degenerates to "item i goes to bin i".
        bin_of[rows[:, None], order] = np.arange(num_items)
        pos_of[:] = 0
        return bin_of, pos_of
    bin_load = np.zeros((batch, num_bins))
    bin_cnt = np.zeros((batch, num_bins), dtype=np.int64)
    for i in range(num_items):
        item = order[:, i]
        # Full bins are masked with +inf so argmin only sees bins with room.
        target = np.argmin(np.where(bin_cnt < cap, bin_load, np.inf), axis=1)
        bin_of[rows, item] = target
        pos_of[rows, item] = bin_cnt[rows, target]
        bin_load[rows, target] += weights[rows, item]
        bin_cnt[rows, target] += 1
    return bin_of, pos_of


def replicate_and_pack(load: np.ndarray, num_physical: int, num_bins: int) -> np.ndarray:
    """Local placement int64 [B, num_physical]: expert index (into load's columns) held by each slot.

    load float [B, E]; slots are bin-major (bin b owns slots b*cap .. b*cap+cap-1).
    """
    counts = replicate_experts(load, num_physical)
    item_expert, item_weight = expand_replicas(load, counts)
    bin_of, pos_of = balanced_packing(item_weight, num_bins)
    cap = num_physical // num_bins
    out = np.empty_like(item_expert)
    rows = np.broadcast_to(np.arange(load.shape[0])[:, None], item_expert.shape)
    out[rows, bin_of * cap + pos_of] = item_expert
    return out


def rebalance_global(load: np.ndarray, num_ranks: int, num_redundant: int) -> np.ndarray:
    """Global policy: phy2log int64 [layers, E + num_redundant] for load float [layers, E]."""
    num_phys = load.shape[1] + num_redundant
    return replicate_and_pack(load, num_phys, num_ranks)


def check_hierarchical(
    num_logical: int, num_ranks: int, num_redundant: int, num_nodes: int, num_groups: int
) -> None:
    """Raise ValueError unless groups, nodes and ranks divide evenly as the hierarchical policy needs."""
    num_phys = num_logical + num_redundant
    problems = []
    if num_nodes < 1 or num_groups < 1:
        problems.append("num_nodes and num_groups must be >= 1")
    else:
        if num_logical % num_groups:
            problems.append(f"{num_logical} experts not divisible into {num_groups} groups")
        if num_groups % num_nodes:
            problems.append(f"{num_groups} groups not divisible over {num_nodes} nodes")
        if num_ranks % num_nodes:
            problems.append(f"{num_ranks} ranks not divisible over {num_nodes} nodes")
        if num_phys % num_ranks:
            problems.append(f"{num_phys} slots not divisible over {num_ranks} ranks")
    if problems:
        raise ValueError("hierarchical placement impossible: " + "; ".join(problems))


def rebalance_hierarchical(
    load: np.ndarray, num_ranks: int, num_redundant: int, num_nodes: int, num_groups: int
) -> np.ndarray:
    """Hierarchical policy: phy2log int64 [layers, E + num_redundant] for load float [layers, E].

    Node n owns ranks n*R/N .. (n+1)*R/N - 1 and therefore a contiguous block of P/N slots; every expert
    of a group, with all its replicas, lives on the node its group was packed onto.
    """
    layers, num_logical = load.shape
    check_hierarchical(num_logical, num_ranks, num_redundant, num_nodes, num_groups)
    num_phys = num_logical + num_redundant
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes

    # 1. groups -> nodes, balancing summed group load.
    group_load = load.reshape(layers, num_groups, group_size).sum(axis=2)
    g_node, g_pos = balanced_packing(group_load, num_nodes)
    node_groups = np.empty_like(g_node)  # [layers, num_groups]: group at node-major position
    rows = np.broadcast_to(np.arange(layers)[:, None], g_node.shape)
    node_groups[rows, g_node * groups_per_node + g_pos] = np.arange(num_groups)
    # Node-local expert index -> logical expert, [layers, num_logical], node-major.
    mlog2log = (node_groups[:, :, None] * group_size + np.arange(group_size)).reshape(layers, num_logical)

    # 2 + 3. replicate and pack inside each node; (layer, node) is the batch dimension.
    per_node = num_logical // num_nodes
    node_load = np.take_along_axis(load, mlog2log, axis=1).reshape(layers * num_nodes, per_node)
    local = replicate_and_pack(node_load, num_phys // num_nodes, num_ranks // num_nodes)

    # Map node-local indices back to logical ids.
    local = local.reshape(layers, num_nodes, -1) + (np.arange(num_nodes) * per_node)[None, :, None]
    return np.take_along_axis(mlog2log, local.reshape(layers, num_phys), axis=1)


def hierarchical_applicable(
    num_logical: int, num_ranks: int, num_redundant: int, num_nodes: int, num_groups: int
) -> bool:
    """True when the hierarchical variant is both meaningful (several nodes) and possible."""
    if num_nodes <= 1:
        return False
    try:
        check_hierarchical(num_logical, num_ranks, num_redundant, num_nodes, num_groups)
    except ValueError:
        return False
    return True


def policy_deepseek(
    load: np.ndarray,
    num_ranks: int,
    num_redundant: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    current: np.ndarray | None = None,
) -> np.ndarray:
    """'deepseek': hierarchical when num_nodes > 1 and the group/node/rank counts divide, else global."""
    if hierarchical_applicable(load.shape[1], num_ranks, num_redundant, num_nodes, num_groups):
        return rebalance_hierarchical(load, num_ranks, num_redundant, num_nodes, num_groups)
    return rebalance_global(load, num_ranks, num_redundant)


def policy_deepseek_hierarchical(
    load: np.ndarray,
    num_ranks: int,
    num_redundant: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    current: np.ndarray | None = None,
) -> np.ndarray:
    """'deepseek_hierarchical': always hierarchical; raises ValueError when the counts do not divide."""
    return rebalance_hierarchical(load, num_ranks, num_redundant, num_nodes, num_groups)


def policy_deepseek_global(
    load: np.ndarray,
    num_ranks: int,
    num_redundant: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    current: np.ndarray | None = None,
) -> np.ndarray:
    """'deepseek_global': ignore groups and nodes, pack over all ranks."""
    return rebalance_global(load, num_ranks, num_redundant)
