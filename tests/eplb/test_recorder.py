"""Load recorder (logical and physical-slot counts) and the routing hook, without an engine (pure torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb.policies import placement_from_phy2log
from eplb.recorder import ExpertLoadRecorder, counts_array, physical_array
from eplb.slots import LayerRouting, occurrence_index, replica_index
from eplb.stats import logical_from_slots, rank_sums


def test_counts_per_layer_and_expert_and_take_resets():
    rec = ExpertLoadRecorder(num_layers=2, num_logical=4)
    rec.record(0, torch.tensor([[0, 1], [1, 3]], dtype=torch.int32))
    rec.record(1, torch.tensor([[2, 2]], dtype=torch.int32))
    rec.record(0, torch.zeros((0, 2), dtype=torch.int32))  # an empty batch counts a step, no tokens
    taken = rec.take()
    assert counts_array(taken).tolist() == [[1, 2, 0, 1], [0, 0, 2, 0]]
    assert taken["steps"] == 2 and taken["calls"] == 3
    assert counts_array(rec.take()).sum() == 0 and rec.steps == 0
    rec.enabled = False
    rec.record(0, torch.tensor([[0, 1]]))
    assert counts_array(rec.take()).sum() == 0


def _routing(phy2log_row: list[int], num_logical: int, cap: int) -> LayerRouting:
    place = placement_from_phy2log(np.asarray([phy2log_row]), num_logical)
    table = torch.full((num_logical, cap), -1, dtype=torch.int64)
    table[:, : place.log2phy.shape[2]] = torch.from_numpy(place.log2phy[0])
    recorder = ExpertLoadRecorder(1, num_logical, len(phy2log_row))
    return LayerRouting(0, recorder, table, torch.from_numpy(place.replica_count[0].copy()))


def test_round_robin_over_replicas_by_occurrence_in_the_batch():
    # 4 experts in 6 slots: expert 0 in slots 0 and 4, expert 2 in slots 2 and 5.
    hook = _routing([0, 1, 2, 3, 0, 2], num_logical=4, cap=3)
    ids = torch.tensor([[0, 2], [0, 1], [0, 2], [3, 2]], dtype=torch.int32)
    phys = hook(ids)
    assert phys.dtype == torch.int32
    assert phys.tolist() == [[0, 2], [4, 1], [0, 5], [3, 2]]
    # Every physical id holds the logical expert it replaces.
    row = np.asarray([0, 1, 2, 3, 0, 2])
    assert (row[phys.numpy()] == ids.numpy()).all()
    assert counts_array(hook.recorder.take()).tolist() == [[3, 1, 3, 1]]


def test_tables_updated_in_place_take_effect():
    hook = _routing([0, 1, 2, 3], num_logical=4, cap=2)
    log2phy, rc = hook.log2phy, hook.replica_count
    new = placement_from_phy2log(np.asarray([[3, 2, 1, 0]]), 4)
    log2phy[:, :1].copy_(torch.from_numpy(new.log2phy[0]))
    rc.copy_(torch.from_numpy(new.replica_count[0]))
    assert hook.log2phy is log2phy  # same storage: a compiled graph would see the update
    assert hook(torch.tensor([[0, 1]])).tolist() == [[3, 2]]


def test_hook_counts_every_call_and_spreads_tokens_over_replicas():
    """Over many batches of every size, the recorder's counts are exactly the routed logical ids and
    each replicated expert's tokens split evenly over its slots (the hook's cost: benchmarks/routing_hook.py)."""
    row = list(range(16)) + [0, 1, 2, 3]  # experts 0-3 have a second slot (16-19)
    hook = _routing(row, num_logical=16, cap=5)
    gen = torch.Generator().manual_seed(0)
    expected = np.zeros(16, dtype=np.int64)
    per_slot = np.zeros(len(row), dtype=np.int64)
    for tokens in (1, 64, 512) * 20:
        ids = torch.randint(0, 16, (tokens, 2), dtype=torch.int32, generator=gen)
        phys = hook(ids).numpy()
        assert (np.asarray(row)[phys] == ids.numpy()).all()
        expected += np.bincount(ids.numpy().ravel(), minlength=16)
        per_slot += np.bincount(phys.ravel(), minlength=len(row))
    taken = hook.recorder.take()
    assert counts_array(taken).tolist() == [expected.tolist()]
    assert physical_array(taken).tolist() == [per_slot.tolist()]  # the recorder saw every slot's tokens
    for e in range(4):  # each batch splits an expert's tokens to within one, and the odd one rotates
        assert per_slot[e] + per_slot[16 + e] == expected[e]
        assert abs(per_slot[e] - per_slot[16 + e]) <= 12, (e, per_slot[e], per_slot[16 + e])  # 60 batches


# Physical-slot counting: (placement row phy2log [P], logical ids [tokens, top_k], expected per-slot
# counts [P]). The router picks replica j % replica_count[e] for the j-th choice of e in the batch
# (replicas in slot order).
PHYSICAL_CASES = {
    "no replicas: slot = expert": ([0, 1, 2, 3], [[0, 1], [1, 3]], [1, 2, 0, 1]),
    "two replicas split evenly": ([0, 1, 2, 3, 0], [[0, 1], [0, 2], [0, 3], [0, 1]], [2, 2, 1, 1, 2]),
    "three replicas, 5 tokens: 2/2/1": ([0, 1, 2, 3, 0, 2, 0], [[0]] * 5, [2, 0, 0, 0, 2, 0, 1]),
    # The hot expert only at even batch positions (a decode batch whose requests keep their places):
    # a choice by position would send both to one replica; by occurrence they split.
    "same parity still splits": (
        [0, 1, 2, 3, 0],
        [[0, 1], [2, 3], [0, 1], [2, 3]],
        [1, 2, 2, 2, 1],
    ),
    "second choice of a token counts too": ([0, 1, 2, 3, 0], [[1, 0], [0, 2], [3, 0]], [2, 1, 1, 1, 1]),
    "both choices replicated": ([0, 1, 2, 3, 0, 2], [[0, 2], [2, 0]], [1, 0, 1, 0, 1, 1]),
    "empty batch": ([0, 1, 2, 3, 1], np.zeros((0, 2), dtype=np.int32), [0, 0, 0, 0, 0]),
}


@pytest.mark.parametrize("row, ids, expected", PHYSICAL_CASES.values(), ids=PHYSICAL_CASES.keys())
def test_physical_counts_split_replicas_and_sum_to_the_logical_counts(row, ids, expected):
    hook = _routing(row, num_logical=4, cap=len(row) - 3)
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int32))
    phys = hook(ids_t)
    taken = hook.recorder.take()
    physical, logical = physical_array(taken), counts_array(taken)
    assert physical.tolist() == [expected]
    assert physical.tolist() == [np.bincount(phys.numpy().ravel(), minlength=len(row)).tolist()]
    # Every token counted once in each: a logical expert's slots sum to its logical count.
    assert (logical_from_slots(physical, np.asarray([row]), 4) == logical).all()
    assert physical.sum() == logical.sum() == ids_t.numel()
    assert physical_array(hook.recorder.take()).sum() == 0  # take() drained both


def test_physical_counts_per_layer_and_rank_sums():
    """Two layers, 4 experts in 6 slots on 2 ranks (3 slots each): a rank's load is the sum of its
    slots, and a replica on the other rank moves tokens between the ranks."""
    rec = ExpertLoadRecorder(num_layers=2, num_logical=4, num_physical=6)
    rec.record(0, torch.tensor([[0, 1], [0, 1]]), torch.tensor([[0, 1], [3, 1]]))  # expert 0 in slots 0, 3
    rec.record(1, torch.tensor([[2, 3]]), torch.tensor([[2, 5]]))
    taken = rec.take()
    physical = physical_array(taken)
    assert physical.tolist() == [[1, 2, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1]]
    assert counts_array(taken).tolist() == [[2, 2, 0, 0], [0, 0, 1, 1]]
    assert rank_sums(physical, 2).tolist() == [[3, 1], [1, 1]]
    assert taken["steps"] == 1 and taken["calls"] == 2


def test_physical_counting_is_optional_off_when_disabled_and_checks_sizes():
    rec = ExpertLoadRecorder(num_layers=1, num_logical=4)  # no redundant slots: 4 physical
    assert rec.physical.shape == (1, 4)
    rec.record(0, torch.tensor([[0, 1]]))  # a caller that maps nothing counts logical ids only
    assert physical_array(rec.take()).sum() == 0
    rec.enabled = False
    rec.record(0, torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert physical_array(rec.take()).sum() == 0
    rec.enabled = True
    with pytest.raises(RuntimeError):  # a slot beyond the recorder's: loud, not dropped
        rec.record(0, torch.tensor([[0]]), torch.tensor([[4]]))
    with pytest.raises(ValueError):
        ExpertLoadRecorder(1, 4, 3)


OCCURRENCE_CASES = {
    "distinct experts": ([[0, 1], [2, 3]], [[0, 0], [0, 0]]),
    "repeats in batch order, row-major": ([[0, 1], [1, 0], [0, 0]], [[0, 0], [1, 1], [2, 3]]),
    "one token": ([[5, 2]], [[0, 0]]),
    "empty": (np.zeros((0, 2), dtype=np.int64), np.zeros((0, 2), dtype=np.int64)),
}


@pytest.mark.parametrize("ids, expected", OCCURRENCE_CASES.values(), ids=OCCURRENCE_CASES.keys())
def test_occurrence_index_counts_earlier_choices_of_the_same_expert(ids, expected):
    got = occurrence_index(torch.as_tensor(np.asarray(ids, dtype=np.int64)), num_logical=8)
    assert got.tolist() == np.asarray(expected).tolist()


def test_a_decode_batch_that_keeps_its_positions_splits_a_hot_expert_every_step():
    """Requests at fixed batch positions, every one choosing hot expert 0 each step: its tokens split
    evenly over its two replicas at every step, not by position."""
    hook = _routing([0, 1, 2, 3, 0], num_logical=4, cap=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        others = torch.randint(1, 4, (6, 1), generator=gen)
        phys = hook(torch.cat([torch.zeros(6, 1, dtype=torch.int64), others], dim=1))
        assert (phys[:, 0] == 0).sum() == (phys[:, 0] == 4).sum() == 3


REPLICA_CASES = {
    # (ids [tokens, top_k], replica_count [4], expected replica per choice); offset = sum of the ids
    "offset 0: j mod count": ([[0], [0], [0]], [3, 1, 1, 1], [[0], [1], [2]]),
    "offset 1 shifts every replicated expert": ([[0], [0], [1]], [2, 1, 1, 1], [[1], [0], [0]]),
    "offset 5 with three replicas": ([[0, 2], [0, 3]], [3, 1, 2, 1], [[2], [0]]),
}


@pytest.mark.parametrize("ids, counts, expected", REPLICA_CASES.values(), ids=REPLICA_CASES.keys())
def test_replica_index_is_occurrence_plus_the_batch_offset(ids, counts, expected):
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    got = replica_index(ids_t, torch.as_tensor(counts, dtype=torch.int64))
    assert got[:, :1].tolist() == expected
    assert (got < torch.as_tensor(counts)[ids_t]).all()


def test_the_odd_token_of_an_expert_rotates_over_its_replicas():
    """One token per step choosing hot expert 0 (two replicas) and one other expert: j mod 2 alone
    would send it to the first replica every step; the batch offset spreads it over both, and the
    choice is a function of the batch alone (a second rank's hook, fed the same batches, agrees)."""
    rank_a = _routing([0, 1, 2, 3, 0], num_logical=4, cap=2)
    rank_b = _routing([0, 1, 2, 3, 0], num_logical=4, cap=2)
    gen = torch.Generator().manual_seed(2)
    first = 0
    for _ in range(40):
        ids = torch.cat(
            [torch.zeros(1, 1, dtype=torch.int64), torch.randint(1, 4, (1, 1), generator=gen)], dim=1
        )
        phys = rank_a(ids)
        assert phys.tolist() == rank_b(ids).tolist() == rank_a(ids).tolist()  # no hidden state either
        first += int(phys[0, 0] == 0)
    # The other expert's id sets the offset's parity: the first replica gets the token whenever it is 2.
    assert 8 <= first <= 32, first
