"""eplb.exchange's pure parts: the pieces a plan is cut into and the bytes each one moves."""

from __future__ import annotations

import numpy as np

from eplb.exchange import piece_bytes, pieces
from eplb.plan import build_transfer_plan

RANKS, E = 2, 4


def _plan():
    # Layer 0: rank 0 sends 3 slots to rank 1 (its 3 slots are replaced); layer 1 unchanged.
    old = np.array([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]])
    new = np.array([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]])
    new[0, 3:] = [3, 2, 0]
    return build_transfer_plan(old, new, RANKS, E)


def test_piece_bytes_follow_the_pieces_busiest_pair() -> None:
    plan = _plan()
    assert plan.layers() == [0]
    m = max(
        sum(1 for op in plan.ops_by_layer[0] if (op.src_rank, op.dst_rank) == pair)
        for pair in {(op.src_rank, op.dst_rank) for op in plan.ops_by_layer[0]}
    )
    slot = (200, 100)  # (w13, w2) bytes of one slot
    for slots, split in [(0, False), (1, False), (2, False), (1, True)]:
        todo = pieces(plan, RANKS, slots, split)
        sizes = piece_bytes(plan, RANKS, slots, split, slot)
        assert len(sizes) == len(todo)
        # Every slot of the busiest pair is counted once, whatever the cut.
        assert sum(sizes) == m * 300, (slots, split, sizes)
        if split:
            assert [w for _, _, w in todo][:2] == [0, 1] and sizes[:2] == [200, 100]
        if slots:
            assert max(sizes) <= slots * 300
