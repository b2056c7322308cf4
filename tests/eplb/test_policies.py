"""Placement policies: invariants every policy must keep, plus policy-specific behaviour."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from eplb.plan import PlanError, validate_placement
from eplb.policies import POLICIES, Placement, default_placement, placement_from_phy2log, rebalance
from eplb.policies.deepseek import balanced_packing, rebalance_global, replicate_experts
from eplb.policies.swift import SwiftParams, swift_batch, swift_layer
from eplb.stats import (
    count_moves,
    imbalance,
    logical_from_slots,
    rank_imbalance,
    rank_loads,
    rank_sums,
    slot_loads,
)


def skewed(layers: int, experts: int, seed: int, lo: float = 0.3, hi: float = 1.0) -> np.ndarray:
    """Zipf-like loads with a random exponent and expert order per layer."""
    rng = np.random.default_rng(seed)
    out = np.empty((layers, experts))
    for layer in range(layers):
        base = np.arange(1, experts + 1) ** -rng.uniform(lo, hi) * rng.lognormal(0, 0.3, experts)
        out[layer] = rng.permutation(base)
    return np.round(out * 1000)


# (layers, logical, ranks, redundant, nodes, groups)
CASES = [
    (3, 16, 4, 4, 2, 4),
    (2, 12, 4, 0, 1, 1),  # no redundancy: pure permutation
    (2, 8, 8, 0, 2, 2),  # one slot per rank
    (2, 6, 2, 2, 1, 1),
    (2, 32, 8, 8, 2, 8),
    (2, 64, 16, 16, 4, 8),
    (1, 4, 1, 0, 1, 1),  # a single rank: nothing to balance
]
LOAD_KINDS = ["skewed", "uniform", "zeros", "one_hot"]


def make_load(kind: str, layers: int, experts: int, seed: int = 0) -> np.ndarray:
    if kind == "skewed":
        return skewed(layers, experts, seed)
    if kind == "uniform":
        return np.full((layers, experts), 7.0)
    if kind == "zeros":
        return np.zeros((layers, experts))
    load = np.zeros((layers, experts))
    load[:, experts // 2] = 100.0
    return load


def check_placement(p: Placement, layers: int, experts: int, ranks: int, redundant: int) -> None:
    """Shape, dtype, every expert served, and log2phy/replica_count consistent with phy2log."""
    assert p.phy2log.shape == (layers, experts + redundant)
    assert p.phy2log.dtype == np.int64
    validate_placement(p.phy2log, experts, ranks)
    assert p.replica_count.shape == (layers, experts)
    assert (p.replica_count >= 1).all()
    assert (p.replica_count.sum(axis=1) == experts + redundant).all()
    for layer in range(layers):
        for e in range(experts):
            slots = p.log2phy[layer, e]
            real = slots[slots >= 0]
            assert len(real) == p.replica_count[layer, e]
            assert (slots[len(real) :] == -1).all()  # padding only at the end
            assert (p.phy2log[layer, real] == e).all()


@pytest.mark.parametrize("policy", ["deepseek", "deepseek_global", "deepseek_hierarchical", "swift"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("kind", LOAD_KINDS)
def test_invariants(policy: str, case: tuple, kind: str) -> None:
    layers, experts, ranks, redundant, nodes, groups = case
    load = make_load(kind, layers, experts)
    kw = {"num_nodes": nodes, "num_groups": groups}
    p = rebalance(policy, load, ranks, redundant, **kw)
    check_placement(p, layers, experts, ranks, redundant)
    base = default_placement(layers, experts, ranks, redundant)
    # Never worse than the input placement, layer by layer.
    assert (imbalance(load, p.phy2log, ranks) <= imbalance(load, base, ranks) + 1e-12).all()
    # Deterministic.
    assert np.array_equal(rebalance(policy, load, ranks, redundant, **kw).phy2log, p.phy2log)
    # Also when starting from another placement.
    cur = np.stack([np.random.default_rng(layer).permutation(base[layer]) for layer in range(layers)])
    q = rebalance(policy, load, ranks, redundant, current=cur, **kw)
    check_placement(q, layers, experts, ranks, redundant)
    assert (imbalance(load, q.phy2log, ranks) <= imbalance(load, cur, ranks) + 1e-12).all()


def test_registry_names() -> None:
    assert {"deepseek", "deepseek_hierarchical", "deepseek_global", "swift"} <= set(POLICIES)


def test_default_placement_layout() -> None:
    table = default_placement(2, 5, 4, 3)
    assert table.dtype == np.int64
    assert table.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]] * 2
    with pytest.raises(ValueError, match="evenly"):
        default_placement(2, 5, 3, 3)


def test_placement_from_phy2log_example() -> None:
    p = placement_from_phy2log(np.array([[2, 0, 2, 1, 2, 0]]), 3)
    assert p.replica_count.tolist() == [[2, 1, 3]]
    assert p.log2phy.tolist() == [[[1, 5, -1], [3, -1, -1], [0, 2, 4]]]


def test_replicate_gives_slots_to_heaviest_per_replica() -> None:
    counts = replicate_experts(np.array([[10.0, 1.0, 4.0, 1.0], [1.0, 1.0, 1.0, 9.0]]), 7)
    # Row 0: 10 -> 5 -> 3.33 (with 4 in between); row 1: 9 -> 4.5 -> 3 -> 2.25.
    assert counts.tolist() == [[3, 1, 2, 1], [1, 1, 1, 4]]


def test_balanced_packing_exact_counts_and_greedy_order() -> None:
    w = np.array([[9.0, 8.0, 7.0, 3.0, 2.0, 1.0]])
    bins, pos = balanced_packing(w, 2)
    # 9->b0, 8->b1, 7->b1 (lighter), 3->b0, 2->b0, 1->b1: loads 14 / 16... and 3 items each.
    assert bins.tolist() == [[0, 1, 1, 0, 0, 1]]
    assert sorted(zip(bins[0].tolist(), pos[0].tolist(), strict=True)) == [
        (b, i) for b in (0, 1) for i in range(3)
    ]


def test_global_is_near_optimal_when_possible() -> None:
    # 8 experts of equal load onto 4 ranks: perfect balance exists and greedy finds it.
    load = np.full((1, 8), 5.0)
    table = rebalance_global(load, 4, 0)
    assert imbalance(load, table, 4)[0] == pytest.approx(1.0)
    # A dominating expert gets the redundant slots.
    table = rebalance_global(np.array([[100.0, 1, 1, 1, 1, 1]]), 2, 2)
    assert (table[0] == 0).sum() == 3


def test_keeps_current_layer_when_plan_is_not_better() -> None:
    # Greedy packing puts two of expert 0's three replicas on one rank (imbalance 68/51.5), while the
    # default layout happens to be perfect: the default must be kept.
    load = np.array([[100.0, 1, 1, 1, 1, 1]])
    raw = rebalance_global(load, 2, 2)
    base = default_placement(1, 6, 2, 2)
    assert imbalance(load, raw, 2)[0] > imbalance(load, base, 2)[0]
    assert np.array_equal(rebalance("deepseek_global", load, 2, 2).phy2log, base)


def test_deepseek_beats_default_on_skewed_load() -> None:
    load = skewed(4, 64, seed=3)
    base = default_placement(4, 64, 16, 16)
    p = rebalance("deepseek", load, 16, 16)
    assert imbalance(load, p.phy2log, 16).mean() < 0.8 * imbalance(load, base, 16).mean()


def test_hierarchical_keeps_groups_on_one_node() -> None:
    layers, experts, ranks, redundant, nodes, groups = 4, 64, 16, 16, 4, 8
    load = skewed(layers, experts, seed=5, lo=0.8, hi=1.2)
    p = rebalance("deepseek_hierarchical", load, ranks, redundant, num_nodes=nodes, num_groups=groups)
    base = default_placement(layers, experts, ranks, redundant)
    changed = [layer for layer in range(layers) if not np.array_equal(p.phy2log[layer], base[layer])]
    assert changed, "skewed load should make the hierarchical plan win on some layer"
    slots_per_node = (experts + redundant) // nodes
    group_size = experts // groups
    for layer in changed:
        node_of_slot = np.arange(experts + redundant) // slots_per_node
        node_sets: dict[int, set[int]] = {}
        for slot, e in enumerate(p.phy2log[layer].tolist()):
            node_sets.setdefault(e // group_size, set()).add(int(node_of_slot[slot]))
        # Every group (all its experts and replicas) sits on exactly one node...
        assert all(len(s) == 1 for s in node_sets.values())
        # ...and each node holds groups / nodes groups.
        assert Counter(next(iter(s)) for s in node_sets.values()) == dict.fromkeys(
            range(nodes), groups // nodes
        )


def test_deepseek_auto_picks_hierarchical_or_global() -> None:
    load = skewed(2, 32, seed=1)
    auto = rebalance("deepseek", load, 8, 8, num_nodes=2, num_groups=4).phy2log
    hier = rebalance("deepseek_hierarchical", load, 8, 8, num_nodes=2, num_groups=4).phy2log
    glob = rebalance("deepseek_global", load, 8, 8, num_nodes=2, num_groups=4).phy2log
    assert np.array_equal(auto, hier)
    # Groups not divisible over nodes: auto falls back to global, the forced variant refuses.
    assert np.array_equal(rebalance("deepseek", load, 8, 8, num_nodes=2, num_groups=1).phy2log, glob)
    with pytest.raises(ValueError, match="hierarchical placement impossible"):
        rebalance("deepseek_hierarchical", load, 8, 8, num_nodes=2, num_groups=3)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"policy": "nope"}, KeyError, "unknown EPLB policy"),
        ({"load": np.ones(8)}, ValueError, "2-D"),
        ({"load": np.full((2, 8), np.nan)}, ValueError, "NaN"),
        ({"load": -np.ones((2, 8))}, ValueError, "negative"),
        ({"num_ranks": 5}, ValueError, "not divisible"),
        ({"num_ranks": 0}, ValueError, "num_ranks"),
        ({"num_redundant": -4}, ValueError, "num_redundant"),
        ({"current": np.zeros((2, 12), dtype=np.int64)}, PlanError, "no replica"),
        ({"current": default_placement(3, 8, 4, 4)}, ValueError, "shape"),
        ({"policy": "swift", "bogus": 1}, TypeError, "bogus"),
    ],
)
def test_rebalance_rejects_bad_input(kwargs: dict, exc: type, match: str) -> None:
    args = {"policy": "deepseek", "load": np.ones((2, 8)), "num_ranks": 4, "num_redundant": 4} | kwargs
    policy, load, ranks, redundant = (args.pop(k) for k in ("policy", "load", "num_ranks", "num_redundant"))
    with pytest.raises(exc, match=match):
        rebalance(policy, load, ranks, redundant, **args)


# --- swift -------------------------------------------------------------------------------------------


def test_swift_skips_balanced_layers() -> None:
    load = skewed(3, 32, seed=2)
    load[1] = 10.0
    load[1, :8] = 20.0  # experts 0..7 hold the redundant slots by default: every slot weighs 10
    cur = rebalance("deepseek_global", load, 8, 8).phy2log
    out = rebalance("swift", load, 8, 8, current=cur, threshold=1.5)
    assert count_moves(cur, out.phy2log) == 0
    new, log = swift_layer(load[1], default_placement(3, 32, 8, 8)[1], 8)
    assert log == [] and np.array_equal(new, default_placement(3, 32, 8, 8)[1])


@pytest.mark.parametrize("cap", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_swift_respects_pair_cap(cap: int, seed: int) -> None:
    load = skewed(4, 64, seed=seed, lo=0.6, hi=1.2)
    cur = default_placement(4, 64, 16, 16)
    out, logs = swift_batch(load, cur, 16, SwiftParams(max_pair_moves=cap, min_gain=0.0, target=1.0))
    assert any(logs), "skewed load must trigger moves"
    for layer_log in logs:
        per_pair = Counter((src, dst) for _, src, dst in layer_log if src != dst)
        assert max(per_pair.values(), default=0) <= cap
    validate_placement(out, 64, 16)


def test_swift_zero_budget_changes_nothing() -> None:
    load = skewed(2, 32, seed=4)
    cur = default_placement(2, 32, 8, 8)
    out = rebalance("swift", load, 8, 8, current=cur, max_pair_moves=0, reassign=False)
    assert np.array_equal(out.phy2log, cur)


def test_swift_max_swaps_bounds_moves() -> None:
    load = skewed(2, 32, seed=4)
    cur = default_placement(2, 32, 8, 8)
    out = rebalance("swift", load, 8, 8, current=cur, max_swaps=1, reassign=False)
    # One swap per layer changes at most 2 slots.
    assert 0 < count_moves(cur, out.phy2log) <= 2 * 2


def test_swift_reassigns_redundant_slots_to_hot_experts() -> None:
    load = np.ones((1, 8))
    load[0, 5] = 50.0  # the default gives the redundant slots to experts 0..3
    out = rebalance("swift", load, 4, 4)
    assert out.replica_count[0, 5] >= 4


@pytest.mark.parametrize("seed", [0, 1])
def test_swift_close_to_deepseek_with_far_fewer_moves(seed: int) -> None:
    """The design target at a DeepSeek-like shape (fewer layers to stay fast)."""
    layers, experts, ranks, redundant = 6, 256, 32, 32
    load = skewed(layers, experts, seed=seed, lo=0.3, hi=0.9)
    cur = default_placement(layers, experts, ranks, redundant)
    ds = rebalance("deepseek_global", load, ranks, redundant, current=cur).phy2log
    sw = rebalance("swift", load, ranks, redundant, current=cur).phy2log
    assert imbalance(load, sw, ranks).mean() <= 1.02 * imbalance(load, ds, ranks).mean()
    assert count_moves(cur, sw) <= 0.5 * count_moves(cur, ds)


def test_swift_steady_state_moves_little() -> None:
    load = skewed(4, 64, seed=7)
    first = rebalance("swift", load, 16, 16).phy2log
    later = np.round(load * np.random.default_rng(8).lognormal(0, 0.1, load.shape))
    again = rebalance("swift", later, 16, 16, current=first).phy2log
    fresh = rebalance("deepseek_global", later, 16, 16, current=first).phy2log
    assert count_moves(first, again) < count_moves(first, fresh) / 4


def test_rank_loads_split_replicas_evenly() -> None:
    load = np.array([[6.0, 2.0]])
    # Expert 0 on both ranks: each replica carries 3.
    assert rank_loads(load, np.array([[0, 1, 0, 1]]), 2).tolist() == [[4.0, 4.0]]
    assert imbalance(load, np.array([[0, 1, 0, 1]]), 2).tolist() == [1.0]
    assert imbalance(load, np.array([[0, 0, 1, 1]]), 2).tolist() == [pytest.approx(6 / 4)]
    assert imbalance(np.zeros((1, 2)), np.array([[0, 1]]), 2).tolist() == [1.0]
    assert count_moves(np.array([[0, 1, 0, 1]]), np.array([[0, 1, 1, 0]])) == 2


def test_slot_loads_measured_per_rank_and_back_to_logical() -> None:
    """Measured per-slot counts (the recorder's physical counts) against the even-split estimate."""
    phy2log = np.array([[0, 1, 0, 1], [1, 0, 0, 1]])  # 2 layers, 2 experts in 4 slots, 2 ranks
    measured = np.array([[6, 2, 0, 0], [1, 1, 5, 1]])  # layer 0: expert 0's replica on rank 1 idle
    assert rank_sums(measured, 2).tolist() == [[8, 0], [2, 6]]
    assert rank_imbalance(rank_sums(measured, 2)).tolist() == [2.0, 1.5]
    assert logical_from_slots(measured, phy2log, 2).tolist() == [[6, 2], [6, 2]]
    # The even split of the same logical load balances layer 0 perfectly: what the measured counts
    # show and the logical counts cannot.
    even = slot_loads(logical_from_slots(measured, phy2log, 2), phy2log)
    assert rank_sums(even, 2).tolist() == [[4.0, 4.0], [4.0, 4.0]]
    assert (rank_sums(even, 2) == rank_loads(np.array([[6.0, 2.0]] * 2), phy2log, 2)).all()
    assert rank_imbalance(np.zeros((1, 2))).tolist() == [1.0]
