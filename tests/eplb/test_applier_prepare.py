"""Async plans are prepared off the engine's stepping thread (transfer option prepare="thread"):
`eplb_stage` returns after the cheap checks, a background thread builds the plan, its pieces and every
layer's layout and commit tables, and the rank contributes the id to the start agreement only then.
The outcome files (`OutcomeLog.set_dir`) the rank actor reads instead of calling into the engine."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb import applier
from eplb.agreement import EplbWorkerState
from eplb.messages import PlanMessage
from eplb.plan import PlanError
from eplb.policies import default_placement
from tests.eplb.gloo_pair import (
    LAYERS,
    RANKS,
    E,
    R,
    assert_holds,
    join,
    random_placement,
    run_pair,
    worker_state,
)


def _state(rank: int = 0, group=None):
    old = default_placement(LAYERS, E, RANKS, R)
    return worker_state(rank, old, group), old


def _msg(plan_id: int, old: np.ndarray, new: np.ndarray, **transfer) -> PlanMessage:
    return PlanMessage(plan_id, old, new, RANKS, transfer=transfer)


def _wait(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_stage_returns_before_preparing_and_contributes_the_id_only_once_prepared(monkeypatch):
    s, old = _state()
    gate = __import__("threading").Event()
    build = EplbWorkerState._build_plan

    def slow_build(self, *args):
        gate.wait(10)
        return build(self, *args)

    monkeypatch.setattr(EplbWorkerState, "_build_plan", slow_build)
    rng = np.random.default_rng(1)
    assert s.stage(_msg(1, old, random_placement(rng)))["accepted"]
    p = s.pending  # the build is still held by `gate`: stage returned without waiting for it
    assert p is not None and not p.prepared and p.plan is None
    assert s.contribute() == [0, 0, 0, 0, 0, 0]  # not accepted in the agreement yet
    s.on_sums([1, 1, 0, 0, 0, 0], RANKS)  # a peer that is prepared: no start here
    assert not p.started and s.pending is p
    gate.set()
    _wait(lambda: p.prepared)
    # Every layer's exchange (receive buffers, commit tables) is ready before the start.
    assert sorted(p.exchanges) == sorted(p.plan.layers()) and p.todo
    assert s.contribute()[:2] == [1, 1]
    s.on_sums([2, 2, 0, 0, 0, 0], RANKS)  # both accepted: staging starts at this step (first piece posted)
    assert p.started and p.t_started > 0
    assert s.status()["staging_threads"] == 0


def test_step_preparation_builds_the_plan_in_the_rpc():
    s, old = _state()
    rng = np.random.default_rng(2)
    assert s.stage(_msg(1, old, random_placement(rng), prepare="step"))["accepted"]
    p = s.pending
    assert p.prepared and p.plan is not None and p.todo and not p.exchanges  # layouts at the first piece
    assert s.contribute()[:2] == [1, 1]


def test_a_plan_that_fails_preparation_is_reported_failed_through_the_agreement(tmp_path, monkeypatch):
    s, old = _state()
    assert s.outcomes.set_dir(str(tmp_path)) == str(tmp_path)

    def broken(self, *args):
        raise PlanError("op-level check failed")

    monkeypatch.setattr(EplbWorkerState, "_build_plan", broken)
    assert s.stage(_msg(1, old, random_placement(np.random.default_rng(4))))["accepted"]
    p = s.pending
    _wait(lambda: p.failed is not None)
    assert not p.prepared and s.contribute() == [0, 0, 0, 0, 1, 0]
    s.on_sums([0, 0, 0, 0, 1, 0], RANKS)  # every rank sees the failed row and drops it
    assert s.pending is None
    rec = s.outcome(1)
    assert rec["outcome"] == "failed" and "op-level check failed" in rec["error"] and rec["layers"] == 0
    assert json.loads((tmp_path / "plan-1.json").read_text())["outcome"] == "failed"
    assert (s.slots.phy2log == old).all()


def test_a_malformed_plan_is_still_rejected_in_the_rpc():
    s, old = _state()
    bad = old.copy()
    bad[0, :] = 0  # every slot of layer 0 holds expert 0: the other experts would vanish
    rep = s.stage(_msg(1, old, bad))
    assert not rep["accepted"] and s.pending is None and s.outcome(1)["outcome"] == "rejected"


def test_stale_plans_are_still_rejected_in_the_rpc_and_aborts_end_the_preparation(tmp_path):
    s, old = _state()
    s.outcomes.set_dir(str(tmp_path))
    rng = np.random.default_rng(3)
    rep = s.stage(_msg(1, random_placement(rng), random_placement(rng)))
    assert not rep["accepted"] and "stale" in rep["error"]
    assert json.loads((tmp_path / "plan-1.json").read_text())["outcome"] == "rejected"
    assert s.stage(_msg(2, old, random_placement(rng)))["accepted"]
    p = s.pending
    assert s.abort(2)
    assert json.loads((tmp_path / "plan-2.json").read_text())["outcome"] == "aborted"
    _wait(lambda: p.prep_ms > 0)  # the preparing thread saw the abort and stopped
    assert s.pending is None and (s.slots.phy2log == old).all()


def test_outcome_files_are_whole_records_and_only_the_last_20_are_kept(tmp_path):
    s, _ = _state()
    assert s.outcomes.set_dir(str(tmp_path / "sub")) == str(tmp_path / "sub")
    for i in range(1, 31):
        s.outcomes.record(i, "committed", wait_ms=[np.float64(0.5)], remote_bytes=np.int64(7))
    files = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert files == sorted(f"plan-{i}.json" for i in range(11, 31))  # no .tmp left behind
    rec = json.loads((tmp_path / "sub" / "plan-30.json").read_text())
    assert rec == {"plan_id": 30, "outcome": "committed", "wait_ms": [0.5], "remote_bytes": 7}
    assert s.status()["outcome_dir"] == str(tmp_path / "sub")


def test_unwritable_outcome_dir_is_not_used(tmp_path):
    s, _ = _state()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert s.outcomes.set_dir(str(blocker / "sub")) is None
    s.outcomes.record(1, "committed")
    assert s.status()["outcome_dir"] is None and s.outcome(1)["outcome"] == "committed"


def _agreed_start(rank: int, port: int, errors) -> None:
    """Both ranks drive the real per-step agreement (sums over gloo); rank 1 prepares slowly."""
    try:
        group = join(rank, port)
        s, old = _state(rank, group)
        if rank == 1:
            build = EplbWorkerState._build_plan

            def slow(self, *a):
                time.sleep(0.3)  # many steps of the loop below
                return build(self, *a)

            EplbWorkerState._build_plan = slow
        rng = np.random.default_rng(5)
        new = random_placement(rng)
        assert s.stage(_msg(1, old, new))["accepted"]
        started_at, step = None, 0
        while s.pending is not None:
            sums = torch.tensor(s.contribute(), dtype=torch.int64)
            dist.all_reduce(sums)
            p = s.pending
            s.on_sums(sums.tolist(), RANKS)
            if started_at is None and p.started:
                started_at = step
            step += 1
            assert step < 5000
            time.sleep(0.002)
        rec = s.outcome(1)
        assert rec["outcome"] == "committed", rec
        assert rec["prepare"] == "thread" and rec["prep_ms"] > 0
        assert_holds(s, new, rank)
        got = torch.tensor([started_at, step], dtype=torch.int64)
        both = [torch.zeros_like(got) for _ in range(RANKS)]
        dist.all_gather(both, got)
        assert both[0].tolist() == both[1].tolist(), both  # same start step, same commit steps
        assert started_at > 10  # rank 0 waited for rank 1's preparation
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")


def test_every_rank_starts_at_the_same_step_once_all_prepared():
    run_pair(_agreed_start)


@pytest.fixture(autouse=True)
def _no_state(monkeypatch):
    monkeypatch.setattr(applier, "_STATE", None)
