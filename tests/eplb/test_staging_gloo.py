"""The applier's staging data paths over real gloo between two processes (no engine): after staging
and committing a random plan, every physical slot on every rank holds its new expert's weights, for
the bulk path (one message per weight per layer and peer) and the per-slot baseline alike."""

from __future__ import annotations

import pytest

from tests.eplb.gloo_pair import apply_random_plans, run_pair


def _worker(rank: int, port: int, errors, per_slot: bool) -> None:
    try:
        apply_random_plans(rank, port, seed=3, opts={"per_slot": per_slot})
    except BaseException as exc:  # reported to the parent: a forked worker's assert is otherwise opaque
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


@pytest.mark.parametrize("per_slot", [False, True], ids=["bulk", "per_slot"])
def test_staging_moves_every_slot_to_its_new_expert(per_slot):
    run_pair(_worker, per_slot)
