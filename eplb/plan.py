"""Turn a placement change into expert-weight transfers, and check both ends.

A rebalance step replaces table `old` by table `new` (both phy2log int64 [layers, num_physical], slot s
on rank s // slots_per_rank). Every slot whose expert changes needs that expert's weights from some slot
that holds it in `old`. Ops read the OLD placement only: ranks stage what they send before overwriting
anything, so the order of ops within a layer does not matter (see `apply_plan_to_table`).

A malformed table silently routes tokens to the wrong weights, so everything here validates loudly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


class PlanError(ValueError):
    """A placement table or transfer plan is malformed."""


@dataclass(frozen=True)
class TransferOp:
    """Copy expert `expert`'s weights of `layer` from physical slot src_slot to dst_slot (global indices)."""

    layer: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int
    expert: int


@dataclass
class TransferPlan:
    """All ops of one rebalance step, grouped by layer (layers without changes have no entry)."""

    old_phy2log: np.ndarray
    new_phy2log: np.ndarray
    num_ranks: int
    ops_by_layer: dict[int, list[TransferOp]] = field(default_factory=dict)

    def layers(self) -> list[int]:
        """Sorted layers that have at least one op."""
        return sorted(layer for layer, ops in self.ops_by_layer.items() if ops)

    def ops(self) -> list[TransferOp]:
        """Every op, layer by layer."""
        return [op for layer in self.layers() for op in self.ops_by_layer[layer]]

    def stats(self, bytes_per_expert: int) -> dict:
        """Traffic summary.

        Keys: num_ops, local_ops (src_rank == dst_rank), total_bytes, remote_bytes,
        bytes_per_layer {layer: bytes}, bytes_per_rank_pair {(src_rank, dst_rank): bytes},
        max_send_bytes / max_recv_bytes (busiest rank, remote only: what bounds the transfer time).
        """
        per_layer: dict[int, int] = {}
        per_pair: dict[tuple[int, int], int] = defaultdict(int)
        send: dict[int, int] = defaultdict(int)
        recv: dict[int, int] = defaultdict(int)
        local = 0
        for layer in self.layers():
            ops = self.ops_by_layer[layer]
            per_layer[layer] = len(ops) * bytes_per_expert
            for op in ops:
                per_pair[(op.src_rank, op.dst_rank)] += bytes_per_expert
                if op.src_rank == op.dst_rank:
                    local += 1
                else:
                    send[op.src_rank] += bytes_per_expert
                    recv[op.dst_rank] += bytes_per_expert
        num_ops = sum(len(v) for v in self.ops_by_layer.values())
        return {
            "num_ops": num_ops,
            "local_ops": local,
            "total_bytes": num_ops * bytes_per_expert,
            "remote_bytes": (num_ops - local) * bytes_per_expert,
            "bytes_per_layer": per_layer,
            "bytes_per_rank_pair": dict(per_pair),
            "max_send_bytes": max(send.values(), default=0),
            "max_recv_bytes": max(recv.values(), default=0),
        }


def validate_placement(phy2log: np.ndarray, num_logical: int, num_ranks: int) -> None:
    """Raise PlanError unless phy2log is a usable int table [layers, num_physical].

    Checks: numpy integer array (NaN and non-integral floats rejected), 2-D and non-empty, num_physical a
    multiple of num_ranks and >= num_logical, every entry in [0, num_logical), every logical expert held
    by at least one slot in every layer.
    """
    if not isinstance(phy2log, np.ndarray):
        raise PlanError(f"placement must be a numpy array, got {type(phy2log).__name__}")
    if num_logical < 1 or num_ranks < 1:
        raise PlanError(f"num_logical and num_ranks must be >= 1, got {num_logical} and {num_ranks}")
    if phy2log.dtype.kind == "f" and np.isnan(phy2log).any():
        raise PlanError("placement contains NaN")
    if phy2log.dtype.kind not in "iu":
        raise PlanError(f"placement must have an integer dtype, got {phy2log.dtype}")
    if phy2log.ndim != 2 or phy2log.shape[0] < 1:
        raise PlanError(f"placement must be 2-D [layers, num_physical], got shape {phy2log.shape}")
    num_phys = phy2log.shape[1]
    if num_phys < num_logical:
        raise PlanError(f"{num_phys} physical slots cannot hold {num_logical} logical experts")
    if num_phys % num_ranks:
        raise PlanError(f"{num_phys} physical slots are not divisible by {num_ranks} ranks")
    bad = (phy2log < 0) | (phy2log >= num_logical)
    if bad.any():
        layer, slot = (int(x) for x in np.argwhere(bad)[0])
        raise PlanError(
            f"layer {layer} slot {slot}: expert id {int(phy2log[layer, slot])} outside [0, {num_logical})"
        )
    from eplb.stats import replica_counts  # local: keeps this module importable on its own

    missing = replica_counts(phy2log, num_logical) == 0
    if missing.any():
        layer, expert = (int(x) for x in np.argwhere(missing)[0])
        raise PlanError(
            f"layer {layer}: logical expert {expert} has no replica ({int(missing.sum())} missing in all)"
        )


def check_pair(old: np.ndarray, new: np.ndarray, num_ranks: int, num_logical: int) -> None:
    """Raise PlanError unless both phy2log tables (int [layers, num_physical]) are valid placements
    (validate_placement) of the same shape: the vectorised check, no diff."""
    validate_placement(old, num_logical, num_ranks)
    validate_placement(new, num_logical, num_ranks)
    if old.shape != new.shape:
        raise PlanError(f"old and new placements differ in shape: {old.shape} vs {new.shape}")


def build_transfer_plan(
    old_phy2log: np.ndarray, new_phy2log: np.ndarray, num_ranks: int, num_logical: int
) -> TransferPlan:
    """Ops turning old into new (both int [layers, num_physical]); deterministic.

    For each changed slot (in slot order) the source is a slot holding the expert in `old`: on the
    destination rank if possible (a local copy, no network), else on the holder rank that has sent the
    fewest experts so far in this layer (ties: lowest slot), which spreads the send load.
    """
    check_pair(old_phy2log, new_phy2log, num_ranks, num_logical)
    old = old_phy2log.astype(np.int64)
    new = new_phy2log.astype(np.int64)
    spr = old.shape[1] // num_ranks
    plan = TransferPlan(old_phy2log=old, new_phy2log=new, num_ranks=num_ranks)
    for layer in np.flatnonzero((old != new).any(axis=1)).tolist():
        row_old = old[layer]
        holders: dict[int, list[int]] = defaultdict(list)
        for slot, expert in enumerate(row_old.tolist()):
            holders[expert].append(slot)
        sent = [0] * num_ranks
        ops = []
        for dst in np.flatnonzero(row_old != new[layer]).tolist():
            expert = int(new[layer, dst])
            dst_rank = dst // spr
            slots = holders[expert]
            local = [s for s in slots if s // spr == dst_rank]
            src = local[0] if local else min(slots, key=lambda s: (sent[s // spr], s))
            if not local:
                sent[src // spr] += 1
            ops.append(TransferOp(layer, src // spr, src, dst_rank, dst, expert))
        plan.ops_by_layer[layer] = ops
    return plan


def apply_plan_to_table(old_phy2log: np.ndarray, plan: TransferPlan) -> np.ndarray:
    """Simulate the ranks: every op copies from the OLD table into a new one; returns int64 [layers, P]."""
    old = np.asarray(old_phy2log, dtype=np.int64)
    out = old.copy()
    for layer, ops in plan.ops_by_layer.items():
        for op in ops:
            out[layer, op.dst_slot] = old[layer, op.src_slot]
    return out


def validate_plan(plan: TransferPlan, num_logical: int) -> None:
    """Raise PlanError unless the plan is executable and turns old into new exactly.

    Checks both tables, then per op: layer key matches, slots in range, ranks derived from the slots,
    source really holds the expert in the old table, destination wants it in the new table, one op per
    destination slot; finally the simulated result equals the new table.
    """
    old, new, num_ranks = plan.old_phy2log, plan.new_phy2log, plan.num_ranks
    check_pair(np.asarray(old), np.asarray(new), num_ranks, num_logical)
    layers, num_phys = old.shape
    spr = num_phys // num_ranks
    for layer, ops in plan.ops_by_layer.items():
        if not 0 <= layer < layers:
            raise PlanError(f"ops for layer {layer}, but the tables have {layers} layers")
        seen: set[int] = set()
        for op in ops:
            where = f"layer {layer} op {op}"
            if op.layer != layer:
                raise PlanError(f"{where}: filed under layer {layer} but says layer {op.layer}")
            for slot in (op.src_slot, op.dst_slot):
                if not 0 <= slot < num_phys:
                    raise PlanError(f"{where}: slot {slot} outside [0, {num_phys})")
            if op.src_rank != op.src_slot // spr or op.dst_rank != op.dst_slot // spr:
                raise PlanError(f"{where}: ranks do not match the slots ({spr} slots per rank)")
            if old[layer, op.src_slot] != op.expert:
                raise PlanError(
                    f"{where}: source slot holds expert {int(old[layer, op.src_slot])} in the old placement, not {op.expert}"
                )
            if new[layer, op.dst_slot] != op.expert:
                raise PlanError(
                    f"{where}: destination slot should hold expert {int(new[layer, op.dst_slot])}, not {op.expert}"
                )
            if op.dst_slot in seen:
                raise PlanError(f"{where}: destination slot {op.dst_slot} written twice")
            seen.add(op.dst_slot)
    result = apply_plan_to_table(old, plan)
    if not np.array_equal(result, new):
        layer, slot = (int(x) for x in np.argwhere(result != new)[0])
        raise PlanError(
            f"applying the plan leaves layer {layer} slot {slot} with expert {int(result[layer, slot])}, "
            f"new placement wants {int(new[layer, slot])} (missing op)"
        )
