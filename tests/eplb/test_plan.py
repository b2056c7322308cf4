"""Transfer plans: building, simulating, and rejecting malformed tables and ops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from eplb.plan import (
    PlanError,
    TransferOp,
    TransferPlan,
    apply_plan_to_table,
    build_transfer_plan,
    validate_placement,
    validate_plan,
)
from eplb.policies import default_placement, rebalance
from eplb.stats import count_moves


def random_loads(layers: int, experts: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.pareto(1.5, (layers, experts)) * 100 + 1


@pytest.mark.parametrize("policy", ["deepseek_global", "swift"])
@pytest.mark.parametrize(("experts", "ranks", "redundant"), [(16, 4, 4), (32, 8, 8), (12, 4, 0), (8, 8, 0)])
def test_plan_turns_old_into_new(policy: str, experts: int, ranks: int, redundant: int) -> None:
    old = default_placement(3, experts, ranks, redundant)
    new = rebalance(policy, random_loads(3, experts, seed=experts), ranks, redundant, current=old).phy2log
    plan = build_transfer_plan(old, new, ranks, experts)
    validate_plan(plan, experts)
    assert np.array_equal(apply_plan_to_table(old, plan), new)
    assert sum(len(ops) for ops in plan.ops_by_layer.values()) == count_moves(old, new)
    assert plan.layers() == sorted(plan.layers())
    # Deterministic.
    assert build_transfer_plan(old, new, ranks, experts).ops_by_layer == plan.ops_by_layer


def test_no_change_no_ops() -> None:
    old = default_placement(2, 8, 4, 4)
    plan = build_transfer_plan(old, old.copy(), 4, 8)
    assert plan.layers() == [] and plan.ops() == []
    assert plan.stats(100)["total_bytes"] == 0


def test_source_prefers_local_copy() -> None:
    # 2 ranks x 3 slots. Old: rank0 [0 1 2], rank1 [3 0 1]. New: rank0 [0 2 3], rank1 [3 0 1].
    old = np.array([[0, 1, 2, 3, 0, 1]])
    new = np.array([[0, 2, 3, 3, 0, 1]])
    plan = build_transfer_plan(old, new, 2, 4)
    ops = {op.dst_slot: op for op in plan.ops()}
    # Slot 1 (rank 0) wants expert 2, which rank 0 holds in slot 2: local copy.
    assert (ops[1].src_rank, ops[1].src_slot, ops[1].expert) == (0, 2, 2)
    # Slot 2 (rank 0) wants expert 3, only on rank 1.
    assert (ops[2].src_rank, ops[2].src_slot, ops[2].expert) == (1, 3, 3)
    stats = plan.stats(10)
    assert stats["num_ops"] == 2 and stats["local_ops"] == 1
    assert stats["bytes_per_rank_pair"] == {(0, 0): 10, (1, 0): 10}
    assert stats["bytes_per_layer"] == {0: 20}
    assert stats["remote_bytes"] == 10 and stats["max_send_bytes"] == 10 and stats["max_recv_bytes"] == 10


def test_sources_spread_over_holder_ranks() -> None:
    # Expert 0 lives on ranks 0 and 1; rank 4 needs two copies: they come from different ranks
    # instead of both from the lowest slot.
    old = np.array([[0, 1, 0, 2, 3, 4, 5, 6, 3, 5]])
    new = np.array([[0, 1, 0, 2, 3, 4, 5, 6, 0, 0]])
    plan = build_transfer_plan(old, new, 5, 7)
    assert sorted(op.src_rank for op in plan.ops()) == [0, 1]
    validate_plan(plan, 7)


BAD_TABLES = [
    ("list", [[0, 1, 2, 3]], "numpy array"),
    ("float", np.array([[0.0, 1.0, 2.0, 3.0]]), "integer dtype"),
    ("nan", np.array([[0.0, np.nan, 2.0, 3.0]]), "NaN"),
    ("bool", np.array([[True, False, True, False]]), "integer dtype"),
    ("1d", np.array([0, 1, 2, 3]), "2-D"),
    ("3d", np.zeros((1, 4, 1), dtype=np.int64), "2-D"),
    ("no_layers", np.zeros((0, 4), dtype=np.int64), "2-D"),
    ("negative", np.array([[0, 1, -1, 3]]), "outside"),
    ("too_big", np.array([[0, 1, 4, 3]]), "outside"),
    ("missing_expert", np.array([[0, 1, 1, 3]]), "expert 2 has no replica"),
    ("not_divisible", np.array([[0, 1, 2, 3, 0]]), "not divisible"),
    ("too_few_slots", np.array([[0, 1]]), "cannot hold"),
]


@pytest.mark.parametrize(("name", "table", "match"), BAD_TABLES, ids=[b[0] for b in BAD_TABLES])
def test_validate_placement_rejects(name: str, table: object, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        validate_placement(table, 4, 2)  # type: ignore[arg-type]


def test_validate_placement_accepts_good() -> None:
    validate_placement(np.array([[3, 2, 1, 0, 0, 1]], dtype=np.int32), 4, 2)


def test_build_rejects_bad_tables() -> None:
    good = default_placement(2, 4, 2, 2)
    with pytest.raises(PlanError, match="differ in shape"):
        build_transfer_plan(good, good[:1], 2, 4)
    with pytest.raises(PlanError, match="no replica"):
        build_transfer_plan(good, np.zeros_like(good), 2, 4)
    with pytest.raises(PlanError, match="not divisible"):
        build_transfer_plan(good, good, 4, 4)


def _plan() -> TransferPlan:
    old = np.array([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]])
    new = np.array([[0, 1, 3, 2, 0, 1], [0, 1, 2, 3, 0, 1]])
    return build_transfer_plan(old, new, 2, 4)


def _with_op(plan: TransferPlan, index: int, **changes: int) -> TransferPlan:
    ops = list(plan.ops_by_layer[0])
    ops[index] = dataclasses.replace(ops[index], **changes)
    return dataclasses.replace(plan, ops_by_layer={0: ops})


BAD_OPS = [
    # Slot 2 wants expert 3; claim it comes from slot 1 (holds expert 1) on rank 0.
    ("source_not_holding", lambda p: _with_op(p, 0, src_slot=1, src_rank=0), "source slot holds expert 1"),
    (
        "wrong_expert",
        lambda p: _with_op(p, 0, expert=1, src_slot=1, src_rank=0),
        "destination slot should hold",
    ),
    ("rank_mismatch", lambda p: _with_op(p, 0, src_rank=0), "ranks do not match"),
    ("slot_out_of_range", lambda p: _with_op(p, 0, dst_slot=9, dst_rank=3), "outside"),
    ("layer_mismatch", lambda p: _with_op(p, 0, layer=1), "filed under layer 0"),
    ("missing_op", lambda p: dataclasses.replace(p, ops_by_layer={0: p.ops_by_layer[0][:1]}), "missing op"),
    (
        "duplicate_dst",
        lambda p: dataclasses.replace(p, ops_by_layer={0: p.ops_by_layer[0] * 2}),
        "written twice",
    ),
    (
        "layer_out_of_range",
        lambda p: dataclasses.replace(p, ops_by_layer={**p.ops_by_layer, 5: []}),
        "layers",
    ),
    (
        "bad_new_table",
        lambda p: dataclasses.replace(p, new_phy2log=np.array([[0, 0, 3, 3, 0, 0], [0, 1, 2, 3, 0, 1]])),
        "no replica",
    ),
]


@pytest.mark.parametrize(("name", "corrupt", "match"), BAD_OPS, ids=[b[0] for b in BAD_OPS])
def test_validate_plan_rejects(name: str, corrupt, match: str) -> None:  # noqa: ANN001
    plan = _plan()
    validate_plan(plan, 4)  # the uncorrupted plan is fine
    with pytest.raises(PlanError, match=match):
        validate_plan(corrupt(plan), 4)


def test_ops_read_the_old_table() -> None:
    # A swap between two ranks: each op's source is overwritten by the other op, which only works
    # because ranks stage the old weights; the simulation must reflect that.
    old = np.array([[0, 1]])
    new = np.array([[1, 0]])
    plan = build_transfer_plan(old, new, 2, 2)
    assert [(op.src_slot, op.dst_slot) for op in plan.ops()] == [(1, 0), (0, 1)]
    assert np.array_equal(apply_plan_to_table(old, plan), new)
    assert TransferOp(0, 1, 1, 0, 0, 1) in plan.ops()
