"""`eplb_outcome(plan_id)`: one plan's history record, None while it is pending, the small reply the
EPLB actor and benchmarks poll with (`eplb_status` copies every record). Worker state without an engine."""

from __future__ import annotations

import numpy as np
from msgspec import msgpack

from eplb import applier
from eplb.applier import EplbWorkerExtension
from eplb.messages import PlanMessage
from eplb.policies import default_placement
from tests.eplb.gloo_pair import LAYERS, RANKS, E, R, random_placement, worker_state


def _state():
    old = default_placement(LAYERS, E, RANKS, R)
    return worker_state(0, old, None), old


def _msg(plan_id: int, old: np.ndarray, new: np.ndarray) -> PlanMessage:
    return PlanMessage(plan_id, old, new, RANKS)


def test_outcome_is_none_while_pending_then_the_plans_own_record(monkeypatch):
    s, old = _state()
    rng = np.random.default_rng(3)
    monkeypatch.setattr(applier, "_STATE", s)
    ext = EplbWorkerExtension()
    assert ext.eplb_outcome(1) is None  # unknown id
    # A stale plan is rejected at once: its record is there right away.
    stale = random_placement(rng)
    assert not s.stage(_msg(1, stale, random_placement(rng)))["accepted"]
    rec = ext.eplb_outcome(1)
    assert rec["plan_id"] == 1 and rec["outcome"] == "rejected" and "stale" in rec["error"]
    # Accepted (DP > 1: applied over later engine steps): pending, so None; then its own record.
    assert s.stage(_msg(2, old, random_placement(rng)))["accepted"]
    assert ext.eplb_outcome(2) is None and s.status()["pending"]["plan_id"] == 2
    for h in range(3, 30):  # filler records: the history keeps the last 20
        s.outcomes.record(h + 1000, "committed", inline_steps=[[0.5, 0.4]] * 30, wait_ms=[0.02] * 30)
    assert s.abort(2)
    rec = ext.eplb_outcome(2)
    assert rec["plan_id"] == 2 and rec["outcome"] == "aborted"
    assert rec == next(h for h in s.status()["history"] if h["plan_id"] == 2)
    assert ext.eplb_outcome(1) is None  # dropped from the 20 kept records
    # The reply crosses vLLM's msgpack RPC and is a fraction of the full status.
    assert len(msgpack.encode(rec)) * 10 < len(msgpack.encode(s.status()))


def test_outcome_without_setup_is_none(monkeypatch):
    monkeypatch.setattr(applier, "_STATE", None)
    assert EplbWorkerExtension().eplb_outcome(7) is None
