"""RankEplb.outcome_local (DPRank.eplb_outcome_local): a plan's record read from the file the worker
writes when the plan ends (eplb.outcomes.OutcomeLog), no call into the engine; the engine call
only as a fallback."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from deployments.rank_eplb import RankEplb


def _rank(outcome_dir, engine_running: list[bool] | None = None):
    """Rank 0's EPLB side reading `outcome_dir`; `engine_running[0]` says whether its engine runs."""
    running = engine_running if engine_running is not None else [True]
    calls = []

    async def eplb_call(method, *args):
        calls.append((method, *args))
        return {"plan_id": args[0], "outcome": "committed", "from": "engine"}

    return RankEplb(0, None, eplb_call, lambda: running[0], outcome_dir), calls


def test_reads_the_workers_file_and_asks_the_engine_only_after_2s_without_one(tmp_path, monkeypatch):
    r, calls = _rank(str(tmp_path))
    run = asyncio.run
    now = [100.0]
    monkeypatch.setattr("deployments.rank_eplb.time.monotonic", lambda: now[0])
    for _ in range(5):
        assert run(r.outcome_local(5)) is None  # pending: no file yet
        now[0] += 0.3
    assert calls == []
    now[0] += 1.0  # 2 s without a file: a lost write must still end the wait
    assert run(r.outcome_local(5))["from"] == "engine"
    assert calls == [("eplb_outcome", 5)]
    (tmp_path / "plan-5.json").write_text(json.dumps({"plan_id": 5, "outcome": "failed", "error": "x"}))
    assert run(r.outcome_local(5)) == {"plan_id": 5, "outcome": "failed", "error": "x"}
    assert len(calls) == 1


def test_waits_in_the_rank_for_the_file(tmp_path):
    r, calls = _rank(str(tmp_path))

    async def go():
        async def write_later():
            await asyncio.sleep(0.2)
            (tmp_path / "plan-7.json").write_text(json.dumps({"plan_id": 7, "outcome": "committed"}))

        t0 = time.monotonic()
        assert await r.outcome_local(7, 0.05) is None  # not there within the wait
        assert time.monotonic() - t0 >= 0.04  # it did wait
        w = asyncio.ensure_future(write_later())
        rec = await r.outcome_local(7, 60.0)
        await w
        return rec

    rec = asyncio.run(go())
    assert rec == {"plan_id": 7, "outcome": "committed"} and calls == []  # the file, not the engine


def test_without_outcome_files_it_asks_the_engine():
    r, calls = _rank(None)
    assert asyncio.run(r.outcome_local(3))["from"] == "engine" and calls == [("eplb_outcome", 3)]


def test_a_dead_engine_raises(tmp_path):
    r, _ = _rank(str(tmp_path), engine_running=[False])
    with pytest.raises(RuntimeError):
        asyncio.run(r.outcome_local(1))


def test_shutdown_removes_the_outcome_files(tmp_path):
    d = tmp_path / "dpserve-eplb-1-r0"
    d.mkdir()
    (d / "plan-1.json").write_text("{}")
    r, _ = _rank(str(d))
    r.remove_outcome_files()  # what DPRank.shutdown does
    assert not d.exists() and r.outcome_dir is None
