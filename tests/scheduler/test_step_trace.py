"""The per-step trace (scheduler/step_trace.py): recording, the ring bound, and the analysis."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scheduler.step_trace import FIELDS, IDX, StepTrace, count_scheduled, step_durations, step_kind, summarize


def _out(new: list[str], tokens: dict[str, int]) -> SimpleNamespace:
    """The two SchedulerOutput fields the trace reads."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new], num_scheduled_tokens=tokens
    )


def test_count_scheduled_splits_prefill_and_decode() -> None:
    # a, b new (prompts 5 and 1 tokens), c decoding, d a resumed/chunked prompt of 7.
    assert count_scheduled(_out(["a", "b"], {"a": 5, "b": 1, "c": 1, "d": 7})) == (2, 13, 1)
    assert count_scheduled(_out([], {})) == (0, 0, 0)


def test_ring_is_bounded_and_rows_from_seq() -> None:
    tr = StepTrace(capacity=3)
    for i in range(5):
        tr.record_step((0, i), 0.0, True, 1, 0, _out([], {"x": 1}), 1, 0)
    assert tr.seq == 5
    rows = tr.rows()
    assert [r[IDX["seq"]] for r in rows] == [2, 3, 4] and len(rows[0]) == len(FIELDS)
    assert [r[IDX["step"]] for r in tr.rows(4)] == [4]
    assert tr.rows(5) == []
    assert rows[0][IDX["sched_s"]] >= 0.0


def _row(step: int, t: float, prefill: int, decode: int, *, admit: int = 1, running: int = 2,
         waiting: int = 0, running_after: int = 2, waiting_after: int = 0, wave: int = 0) -> tuple:  # fmt: skip
    new = 1 if prefill else 0
    return (
        step,
        wave,
        step,
        t,
        0.0,
        admit,
        running,
        waiting,
        new,
        prefill,
        decode,
        running_after,
        waiting_after,
    )


def _renumber(rows: list[tuple]) -> list[tuple]:
    """seq = position (rows recorded one after the other on one rank)."""
    return [(i, *r[1:]) for i, r in enumerate(rows)]


def test_kinds_and_durations() -> None:
    rows = _renumber([_row(0, 0.0, 8, 0), _row(1, 0.010, 8, 1), _row(2, 0.012, 0, 2), _row(5, 0.020, 0, 2)])
    assert [step_kind(r) for r in rows] == ["prefill", "mixed", "decode", "decode"]
    assert step_kind(_row(9, 0.0, 0, 0)) == "empty"
    d = step_durations(rows)
    # Step 2 is followed by step 5 (steps 3-4 ran without schedule()): no single-step time for it.
    assert d == {(0, 0): pytest.approx(0.010), (0, 1): pytest.approx(0.002)}
    # Rows of two runs concatenated (seq not consecutive) are never paired, even with matching steps.
    other_run = [(10, 0, 3, 5.0, 0.0, 1, 2, 0, 0, 0, 2, 2, 0)]
    assert (0, 2) not in step_durations(rows[:3] + other_run)


def test_summarize_pairs_stalls_idle_slots_and_held_steps() -> None:
    # Rank 0 prefills at step 1 while rank 1 only decodes (a stall); step 2 both decode; step 3 both
    # prefill; rank 1 has no schedule() at step 4 (idle) while rank 0 decodes; step 5 both decode.
    r0 = [
        _row(0, 0.000, 0, 2),
        _row(1, 0.010, 16, 1),
        _row(2, 0.040, 0, 2),
        _row(3, 0.050, 8, 1),
        _row(4, 0.080, 0, 2),
        _row(5, 0.090, 0, 2),
        _row(6, 0.100, 0, 2),
    ]
    # Rank 1: gate closed at steps 2-3 with 3 waiting and one slot free (max_num_seqs 2, running 1).
    r1 = [
        _row(0, 0.000, 0, 2),
        _row(1, 0.010, 0, 2),
        _row(2, 0.041, 0, 1, admit=0, running=1, waiting=3, running_after=1, waiting_after=3),
        _row(3, 0.050, 8, 1),
        _row(5, 0.090, 0, 2),
        _row(6, 0.100, 0, 2),
    ]
    s = summarize({0: _renumber(r0), 1: _renumber(r1)}, max_num_seqs=2)
    assert s["lockstep_steps"] == 7
    # Steps 0, 2, 5 and 6 are all-decode (6 is the last row: counted, no measured time).
    assert s["pattern_steps"] == {"all_decode": 4, "stall": 1, "all_prefill": 1, "decode_vs_idle": 1}
    # The stall step (1) took 30 ms (max over ranks: 31 ms on rank 1), all-decode steps 10 ms.
    assert s["pattern_step_time"]["stall"]["median_ms"] == pytest.approx(31.0)
    assert s["pattern_step_time"]["all_decode"]["median_ms"] == pytest.approx(10.0)
    k1 = s["ranks"]["1"]
    assert k1["kind_steps"]["idle"] == 1 and k1["steps"] == 7 and k1["schedule_calls"] == 6
    assert k1["held_steps"] == 1 and k1["closed_steps"] == 1
    assert k1["idle_slot_steps"] == 1 and k1["steps_with_idle_slots"] == 1
    assert s["ranks"]["0"]["kind_steps"]["mixed"] == 2 and s["ranks"]["0"]["held_steps"] == 0
    assert s["ranks"]["0"]["step_time"]["mixed"]["median_ms"] == pytest.approx(30.0)


def test_summarize_empty() -> None:
    s = summarize({0: [], 1: []}, max_num_seqs=4)
    assert s["lockstep_steps"] == 0 and s["pattern_steps"] == {}
