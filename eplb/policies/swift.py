"""Movement-aware rebalancing (in the spirit of vllm-ascend's SwiftBalancer; independent implementation).

DeepSeek-style planning recomputes the whole table, so nearly every slot changes and every expert's
weights cross the network. This policy starts from the placement the ranks already hold and only makes
changes that pay for themselves, per layer:

  1. skip the layer if its imbalance (max/mean rank load) is already <= `threshold`;
  2. re-assign redundant slots, but only as many as needed to bring the largest per-replica load down
     to the optimum the DeepSeek replication step would reach (surplus replicas donate their slot);
  3. greedy swaps: take the most loaded rank, find the slot swap with any other rank that lowers the
     pair's maximum the most, apply it if the gain is >= `min_gain` x mean rank load; repeat.

Every transfer is charged to an ordered rank pair (src -> dst); no pair carries more than `max_pair_moves`
experts per layer, which bounds the per-link traffic of one rebalance step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from eplb.policies.base import default_placement, keep_better
from eplb.policies.deepseek import replicate_experts
from eplb.stats import imbalance, replica_counts


@dataclass(frozen=True)
class SwiftParams:
    """Tuning knobs (defaults tuned on the DeepSeek-V3-scale benchmark, benchmarks/eplb_planner.py).

    threshold:      layers whose imbalance (max/mean rank load) is <= this are left alone.
    target:         stop swapping in a layer once its imbalance is <= this.
    min_gain:       a swap must lower the most loaded rank by at least this fraction of the mean rank load.
    move_price:     among swaps that gain enough, prefer ones touching already-changed slots, valued at
                    this fraction of the mean rank load per avoided transfer.
    max_pair_moves: experts moved from one rank to another (ordered pair) per layer, by either step.
    max_swaps:      swaps per layer (None: num_physical, a safety bound only).
    partners:       lightest ranks tried as swap partners per step (None: all; fewer is faster).
    reassign:       allow step 2 (changing which experts own the redundant slots).
    replica_slack:  step 2 aims at the optimal largest per-replica load times (1 + replica_slack).
    """

    threshold: float = 1.05
    target: float = 1.015
    min_gain: float = 0.005
    move_price: float = 0.01
    max_pair_moves: int = 2
    max_swaps: int | None = None
    partners: int | None = 16
    reassign: bool = True
    replica_slack: float = 0.0


# One logged transfer: (kind, src_rank, dst_rank); a swap logs both directions.
Move = tuple[str, int, int]


def min_replicas(load: np.ndarray, num_physical: int, slack: float = 0.0) -> np.ndarray:
    """Fewest replicas per expert that reach DeepSeek's optimal largest per-replica load.

    load float [B, E] -> int64 [B, E] (>= 1). Replicas beyond this are surplus that may donate a slot;
    experts below it must gain replicas or the hottest one alone caps the achievable balance.
    """
    target = replicate_experts(load, num_physical)
    best_max = (load / target).max(axis=1, keepdims=True) * (1.0 + slack)
    # Tiny slack so that an expert sitting exactly at the optimum is not rounded up by float error.
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.ceil(load / (best_max * (1 + 1e-9)))
    need = np.nan_to_num(need, nan=1.0, posinf=1.0)
    return np.maximum(need, 1).astype(np.int64)


def _reassign_redundant(
    load: np.ndarray,
    p2l: np.ndarray,
    need: np.ndarray,
    num_ranks: int,
    used: np.ndarray,
    cap: int,
    log: list[Move],
) -> None:
    """Step 2 on one layer, in place; runs before any swap, so `used` is still all zero on entry.

    load float [E], p2l int64 [P], need int64 [E] (see `min_replicas`), used int64 [R, R] moves per
    ordered rank pair. Surplus replicas on the most loaded ranks are released; the missing replicas,
    heaviest first, go to the released slot on the least loaded rank (a local copy if that rank already
    holds the expert, else charged to the holder with the fewest moves to it, within `cap`).
    """
    num_logical = load.shape[0]
    num_phys = p2l.shape[0]
    spr = num_phys // num_ranks
    counts = np.bincount(p2l, minlength=num_logical)
    deficit = np.maximum(need - counts, 0)
    total = int(deficit.sum())
    if total == 0:
        return
    surplus = np.maximum(counts - need, 0)
    slot_rank = np.arange(num_phys) // spr
    rank_load = (load / counts)[p2l].reshape(num_ranks, spr).sum(axis=1)

    # Release surplus replicas, most loaded ranks first (ties: lower slot).
    cand = np.flatnonzero(surplus[p2l] > 0)
    cand = cand[np.lexsort((cand, -rank_load[slot_rank[cand]]))]
    # Keep each expert's first `surplus` candidates (in that order), then the first `total` overall.
    by_expert = np.argsort(p2l[cand], kind="stable")
    exp_sorted = p2l[cand][by_expert]
    first = np.searchsorted(exp_sorted, exp_sorted, side="left")
    occurrence = np.empty_like(by_expert)
    occurrence[by_expert] = np.arange(cand.size) - first
    freed = cand[occurrence < surplus[p2l[cand]]][:total].tolist()
    is_freed = np.zeros(num_phys, dtype=bool)
    is_freed[freed] = True
    final = counts - np.bincount(p2l[freed], minlength=num_logical) + deficit
    per_rep = load / final
    base = np.where(is_freed, 0.0, per_rep[p2l]).reshape(num_ranks, spr).sum(axis=1)

    free_by_rank: dict[int, list[int]] = {}
    for j in freed:
        free_by_rank.setdefault(int(slot_rank[j]), []).append(j)
    heap = [(float(base[r]), r) for r in free_by_rank]
    heapq.heapify(heap)
    items = np.repeat(np.arange(num_logical), deficit)
    items = items[np.argsort(-per_rep[items], kind="stable")]
    # Plain Python containers: this loop runs once per new replica and numpy scalar access is slow.
    holders: dict[int, set[int]] = {int(e): set() for e in np.flatnonzero(deficit)}
    mine = np.flatnonzero(np.isin(p2l, list(holders)) & ~is_freed)
    for e, r in zip(p2l[mine].tolist(), slot_rank[mine].tolist(), strict=True):
        holders[e].add(r)
    pair_used: dict[tuple[int, int], int] = {}
    for e in items.tolist():
        hold = holders[e]
        skipped = []
        chosen = None
        while heap:
            rl, r = heapq.heappop(heap)
            if r in hold or any(pair_used.get((h, r), 0) < cap for h in hold):
                chosen = (rl, r)
                break
            skipped.append((rl, r))
        for item in skipped:
            heapq.heappush(heap, item)
        if chosen is None:
            continue  # no rank may receive it under the pair cap; its freed slot keeps the old expert
        rl, r = chosen
        j = free_by_rank[r].pop()
        if r in hold:
            log.append(("reassign", r, r))
        else:
            src = min(sorted(hold), key=lambda h: pair_used.get((h, r), 0))
            pair_used[(src, r)] = pair_used.get((src, r), 0) + 1
            log.append(("reassign", src, r))
        p2l[j] = e
        hold.add(r)
        if free_by_rank[r]:
            heapq.heappush(heap, (rl + float(per_rep[e]), r))
    for (src, dst), n in pair_used.items():
        used[src, dst] += n


def _greedy_swaps(
    load: np.ndarray,
    p2l: np.ndarray,
    original: np.ndarray,
    num_ranks: int,
    used: np.ndarray,
    params: SwiftParams,
    logs: list[list[Move]],
) -> None:
    """Step 3, in place, vectorised over layers (each layer runs its own greedy sequence).

    load float [B, E], p2l/original int64 [B, P], used int64 [B, R, R]; logs[b] gets layer b's swaps.
    Every iteration does one swap in each layer that is still improving.
    """
    batch, num_phys = p2l.shape
    spr = num_phys // num_ranks
    counts = replica_counts(p2l, load.shape[1])
    # Swaps keep replica counts, so slot weights travel with their slots.
    weights = np.take_along_axis(load / np.maximum(counts, 1), p2l, axis=1).reshape(batch, num_ranks, spr)
    experts = p2l.reshape(batch, num_ranks, spr)  # a view: writes land in p2l
    orig = original.reshape(batch, num_ranks, spr)
    changed = (experts != orig).astype(np.float64)
    rank_load = weights.sum(axis=2)
    mean = rank_load.mean(axis=1)
    min_gain = np.maximum(params.min_gain * mean, 1e-12 * mean)  # always demand a real gain
    target = params.target * mean
    price = params.move_price * mean
    cap = params.max_pair_moves
    max_swaps = num_phys if params.max_swaps is None else params.max_swaps
    k = num_ranks if params.partners is None else max(1, min(params.partners, num_ranks))
    active = np.arange(batch)
    for _ in range(max_swaps):
        if active.size == 0:
            return
        n = active.size
        rows = np.arange(n)
        rl = rank_load[active]  # [n, R]
        a = rl.argmax(axis=1)
        la = rl[rows, a]
        # Partners: other ranks whose pair with `a` still has budget both ways; others get +inf.
        pair_ok = (used[active, a, :] < cap) & (used[active, :, a] < cap)
        partner = np.where(pair_ok, rl, np.inf)
        partner[rows, a] = np.inf
        # Only the `k` lightest allowed ranks are tried as partners: the best swap for the most loaded
        # rank is almost always with a light one, and this keeps the work per iteration small.
        if k < num_ranks:
            cand = np.argpartition(partner, k - 1, axis=1)[:, :k]  # [n, k] rank ids
            partner = np.take_along_axis(partner, cand, axis=1)
        else:
            cand = np.broadcast_to(np.arange(num_ranks), (n, num_ranks))
        w = weights[active]
        wb = w[rows[:, None], cand]  # [n, k, S]
        # d[n, i, c, j]: load leaving rank a when its slot i swaps with slot j of candidate c. Two
        # replicas of one expert weigh the same, so d == 0 there and the gain test rejects the no-op.
        d = w[rows, a][:, :, None, None] - wb[:, None, :, :]
        new_max = np.maximum(la[:, None, None, None] - d, partner[:, None, :, None] + d).reshape(n, -1)
        ch = changed[active]
        # Prefer slots that already differ from the original placement: changing them again costs no
        # extra transfer.
        bonus = (ch[rows, a][:, :, None, None] + ch[rows[:, None], cand][:, None, :, :]).reshape(n, -1)
        flat = (new_max - price[active, None] * bonus).argmin(axis=1)
        gain = la - new_max[rows, flat]
        weak = gain < min_gain[active]
        if weak.any():
            # The cheapest good-looking swap gains too little: fall back to the best gain outright.
            flat[weak] = new_max[weak].argmin(axis=1)
            gain[weak] = la[weak] - new_max[weak, flat[weak]]
        go = (gain >= min_gain[active]) & (la > target[active])
        if not go.any():
            return
        lay, a, flat = active[go], a[go], flat[go]
        i, c, j = np.unravel_index(flat, (spr, cand.shape[1], spr))
        b = cand[go][np.arange(lay.size), c]
        wi, wj = weights[lay, a, i].copy(), weights[lay, b, j].copy()
        ei, ej = experts[lay, a, i].copy(), experts[lay, b, j].copy()
        weights[lay, a, i], weights[lay, b, j] = wj, wi
        experts[lay, a, i], experts[lay, b, j] = ej, ei
        changed[lay, a, i] = ej != orig[lay, a, i]
        changed[lay, b, j] = ei != orig[lay, b, j]
        rank_load[lay, a] += wj - wi
        rank_load[lay, b] += wi - wj
        used[lay, a, b] += 1
        used[lay, b, a] += 1
        for layer, ra, rb in zip(lay.tolist(), a.tolist(), b.tolist(), strict=True):
            logs[layer] += [("swap", ra, rb), ("swap", rb, ra)]
        active = lay


def swift_batch(
    load: np.ndarray,
    current: np.ndarray,
    num_ranks: int,
    params: SwiftParams = SwiftParams(),
) -> tuple[np.ndarray, list[list[Move]]]:
    """Plan layers independently: load float [B, E], current int64 [B, P] -> (phy2log [B, P], logs).

    Layers at or below `params.threshold` come back unchanged with an empty log. logs[b] lists every
    transfer charged to a rank pair in layer b; it is what the pair cap bounds.
    """
    current = np.asarray(current, dtype=np.int64)
    batch, num_phys = current.shape
    out = current.copy()
    logs: list[list[Move]] = [[] for _ in range(batch)]
    todo = np.flatnonzero(imbalance(load, current, num_ranks) > params.threshold)
    if todo.size == 0:
        return out, logs
    sub_load, sub = load[todo], out[todo]
    sub_logs: list[list[Move]] = [[] for _ in range(todo.size)]
    used = np.zeros((todo.size, num_ranks, num_ranks), dtype=np.int64)
    if params.reassign and num_phys > load.shape[1]:
        need = min_replicas(sub_load, num_phys, params.replica_slack)
        for k in range(todo.size):
            _reassign_redundant(
                sub_load[k], sub[k], need[k], num_ranks, used[k], params.max_pair_moves, sub_logs[k]
            )
    _greedy_swaps(sub_load, sub, current[todo], num_ranks, used, params, sub_logs)
    out[todo] = sub
    for k, layer in enumerate(todo.tolist()):
        logs[layer] = sub_logs[k]
    return out, logs


def swift_layer(
    load: np.ndarray, current: np.ndarray, num_ranks: int, params: SwiftParams = SwiftParams()
) -> tuple[np.ndarray, list[Move]]:
    """One layer: load float [E], current int64 [P] -> (new phy2log int64 [P], transfer log)."""
    out, logs = swift_batch(load[None, :], np.asarray(current)[None, :], num_ranks, params)
    return out[0], logs[0]


def policy_swift(
    load: np.ndarray,
    num_ranks: int,
    num_redundant: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    current: np.ndarray | None = None,
    **params: object,
) -> np.ndarray:
    """'swift': movement-aware policy; phy2log int64 [layers, E + num_redundant].

    current defaults to `default_placement`. Nodes and groups are ignored. Unknown params raise TypeError.
    """
    p = SwiftParams(**params)  # type: ignore[arg-type]
    layers, num_logical = load.shape
    if current is None:
        current = default_placement(layers, num_logical, num_ranks, num_redundant)
    current = np.asarray(current, dtype=np.int64)
    out, _ = swift_batch(load, current, num_ranks, p)
    return keep_better(load, out, current, num_ranks)
