"""Load recorder and the routing hook, without an engine (pure torch)."""

from __future__ import annotations

import numpy as np
import torch

from eplb.policies import placement_from_phy2log
from eplb.recorder import ExpertLoadRecorder, counts_array
from eplb.slots import LayerRouting


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
    return LayerRouting(
        0, ExpertLoadRecorder(1, num_logical), table, torch.from_numpy(place.replica_count[0].copy())
    )


def test_round_robin_over_replicas_by_token_index():
    # 4 experts in 6 slots: expert 0 in slots 0 and 4, expert 2 in slots 2 and 5.
    hook = _routing([0, 1, 2, 3, 0, 2], num_logical=4, cap=3)
    ids = torch.tensor([[0, 2], [0, 1], [0, 2], [3, 2]], dtype=torch.int32)
    phys = hook(ids)
    assert phys.dtype == torch.int32
    assert phys.tolist() == [[0, 2], [4, 1], [0, 2], [3, 5]]
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
    assert counts_array(hook.recorder.take()).tolist() == [expected.tolist()]
    for e in range(4):  # replica by token index parity: random ids split about evenly (fixed seed)
        assert per_slot[e] + per_slot[16 + e] == expected[e]
        assert abs(per_slot[e] - per_slot[16 + e]) <= 0.1 * expected[e], (e, per_slot[e], per_slot[16 + e])
