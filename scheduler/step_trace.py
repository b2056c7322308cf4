"""Per-step trace of the balance scheduler: what each ``schedule()`` saw, decided and scheduled.

Why: the balance benchmark must *explain* a throughput difference between gate policies (per-rank step
times by step kind, prefill/decode mix, how often one rank prefilled while the other only decoded,
slots left idle by a closed gate). Counters alone cannot show that; one row per step can.

Cost: one ``time.perf_counter()``, a loop over this step's scheduled requests (at most
``max_num_seqs`` dict items) and one tuple appended to a bounded ``deque`` per ``schedule()`` — a few
microseconds per step, no allocation that grows with run time.

Rows (:data:`FIELDS`) are plain tuples so they cross process boundaries as they are (msgpack / Ray).
A row's ``seq`` increases by one per recorded step for the life of the scheduler, so a reader takes
the rows of one run with ``rows(seq_before)`` (see ``benchmarks/balance.py``).

Step kinds (:func:`step_kind`): ``decode`` (decode tokens only), ``mixed`` (prefill and decode tokens),
``prefill`` (prefill tokens only), ``empty`` (``schedule()`` ran but scheduled nothing: a gated rank
with nothing running, or, with async scheduling, a step where every running request's last token is
still in flight), and ``idle``: a lockstep step a rank ran without calling ``schedule()`` (no
requests at all: vLLM runs a dummy batch), seen as a gap in the rank's step numbers.

A request's tokens count as prefill when it is newly scheduled or gets more than one token this step
(a prompt chunk or a resumed request's recompute); one token for a running request is a decode token.
With speculative decoding (not used on CPU) a multi-token decode would count as prefill.

Pure: no Ray, no vLLM import (``record_step`` duck-types the ``SchedulerOutput``).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

FIELDS: tuple[str, ...] = (
    "seq",  # running index of recorded steps on this rank
    "wave",  # vLLM DP wave (0 without DP)
    "step",  # lockstep step counter within the wave (the gate's step key)
    "t",  # time.perf_counter() at schedule() entry (s; per-process clock: compare within a rank)
    "sched_s",  # time spent in schedule() itself, gate lookup included (s)
    "admit",  # the gate's decision for this step (1 admit, 0 closed)
    "running",  # len(running) before schedule()
    "waiting",  # waiting requests before schedule()
    "new_reqs",  # requests admitted (newly scheduled) this step
    "prefill_tokens",  # tokens of prompts (new requests, chunks, recomputes) scheduled this step
    "decode_tokens",  # running requests given one decode token this step
    "running_after",  # len(running) after schedule()
    "waiting_after",  # waiting requests after schedule()
)
Row = tuple[int, int, int, float, float, int, int, int, int, int, int, int, int]
IDX = {name: i for i, name in enumerate(FIELDS)}
KINDS: tuple[str, ...] = ("decode", "mixed", "prefill", "empty", "idle")


def count_scheduled(output: Any) -> tuple[int, int, int]:
    """(new requests, prefill tokens, decode tokens) of a vLLM ``SchedulerOutput``."""
    new_ids = {r.req_id for r in output.scheduled_new_reqs}
    prefill = decode = 0
    for req_id, n in output.num_scheduled_tokens.items():
        if n > 1 or req_id in new_ids:
            prefill += n
        else:
            decode += n
    return len(new_ids), prefill, decode


class StepTrace:
    """A bounded ring buffer of per-step rows (oldest dropped first)."""

    def __init__(self, capacity: int = 8192) -> None:
        self.rows_: deque[Row] = deque(maxlen=capacity)
        self.seq = 0  # rows recorded so far (the next row's seq)

    def record(
        self,
        wave: int,
        step: int,
        t: float,
        sched_s: float,
        admit: bool,
        running: int,
        waiting: int,
        new_reqs: int,
        prefill_tokens: int,
        decode_tokens: int,
        running_after: int,
        waiting_after: int,
    ) -> None:
        self.rows_.append(
            (self.seq, wave, step, t, sched_s, int(admit), running, waiting, new_reqs, prefill_tokens,
             decode_tokens, running_after, waiting_after)
        )  # fmt: skip
        self.seq += 1

    def record_step(
        self,
        key: tuple[int, int],
        t0: float,
        admit: bool,
        running: int,
        waiting: int,
        output: Any,
        running_after: int,
        waiting_after: int,
    ) -> None:
        """Record one ``schedule()`` that started at ``t0`` and returned ``output``."""
        new_reqs, prefill, decode = count_scheduled(output)
        self.record(key[0], key[1], t0, time.perf_counter() - t0, admit, running, waiting, new_reqs, prefill,
                    decode, running_after, waiting_after)  # fmt: skip

    def rows(self, start: int = 0) -> list[Row]:
        """Rows with ``seq >= start`` still in the buffer, oldest first."""
        return [r for r in self.rows_ if r[0] >= start]


# ---- analysis (pure; used by benchmarks/balance.py and the tests) --------------------------------


def step_kind(row: Sequence[Any]) -> str:
    prefill, decode = row[IDX["prefill_tokens"]], row[IDX["decode_tokens"]]
    if prefill and decode:
        return "mixed"
    if prefill:
        return "prefill"
    if decode:
        return "decode"
    return "empty"


def _adjacent(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Consecutive recorded steps of one wave (rows of several runs may be concatenated)."""
    return b[IDX["seq"]] == a[IDX["seq"]] + 1 and a[IDX["wave"]] == b[IDX["wave"]]


def step_durations(rows: Sequence[Sequence[Any]]) -> dict[tuple[int, int], float]:
    """Wall time of each step whose successor on the same rank is the next step of the same wave:
    from this ``schedule()`` to the next (forward pass, output processing, lockstep sync included).
    Steps followed by idle steps or a wave end get none (their interval covers more than one step)."""
    out: dict[tuple[int, int], float] = {}
    for a, b in zip(rows, rows[1:], strict=False):
        if _adjacent(a, b) and b[IDX["step"]] == a[IDX["step"]] + 1:
            out[(a[IDX["wave"]], a[IDX["step"]])] = b[IDX["t"]] - a[IDX["t"]]
    return out


def _stats_ms(xs: Iterable[float]) -> dict[str, float]:
    v = sorted(xs)
    if not v:
        return {"n": 0}
    p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
    return {"n": len(v), "median_ms": 1e3 * statistics.median(v), "p90_ms": 1e3 * p90,
            "mean_ms": 1e3 * statistics.fmean(v)}  # fmt: skip


def _idle_keys(rows: Sequence[Sequence[Any]]) -> set[tuple[int, int]]:
    """Steps inside the traced span that this rank ran without schedule() (gaps in its step numbers)."""
    out: set[tuple[int, int]] = set()
    for a, b in zip(rows, rows[1:], strict=False):
        if _adjacent(a, b):
            out.update((a[IDX["wave"]], s) for s in range(a[IDX["step"]] + 1, b[IDX["step"]]))
    return out


def _prefills(kind: str) -> bool:
    return kind in ("mixed", "prefill")


def summarize(traces: dict[int, Sequence[Sequence[Any]]], max_num_seqs: int) -> dict[str, Any]:
    """What the traces of all ranks for one run say about its throughput.

    Per rank: step counts and shares by kind, step time (median/p90) by kind, tokens per step, closed
    and held gate steps, idle slot-steps (``running_after < max_num_seqs`` while requests wait).
    Across ranks, per lockstep step (keys seen by any rank): the pair pattern — ``all_decode``,
    ``stall`` (some rank prefills while another only decodes: the step the gate is meant to avoid),
    ``all_prefill`` (every rank busy prefills), ``prefill_vs_idle`` (prefills while another rank has
    nothing) and the rest — with the step time of each pattern (max over ranks of the measured time).
    """
    per_rank: dict[str, Any] = {}
    kinds_by_rank: dict[int, dict[tuple[int, int], str]] = {}
    dur_by_rank: dict[int, dict[tuple[int, int], float]] = {}
    for rank, raw in sorted(traces.items()):
        rows = sorted(raw, key=lambda r: r[IDX["seq"]])
        durs = step_durations(rows)
        kinds = {(r[IDX["wave"]], r[IDX["step"]]): step_kind(r) for r in rows}
        for k in _idle_keys(rows):
            kinds.setdefault(k, "idle")
        kinds_by_rank[rank], dur_by_rank[rank] = kinds, durs
        n = max(1, len(kinds))
        count = {k: sum(1 for v in kinds.values() if v == k) for k in KINDS}
        held = [r for r in rows if not r[IDX["admit"]] and r[IDX["waiting"]] > 0]
        waiting_rows = [r for r in rows if r[IDX["waiting_after"]] > 0]
        idle_slots = sum(max(0, max_num_seqs - r[IDX["running_after"]]) for r in waiting_rows)
        per_rank[str(rank)] = {
            "steps": len(kinds),
            "schedule_calls": len(rows),
            "kind_steps": count,
            "kind_share": {k: count[k] / n for k in KINDS},
            "step_time": {
                k: _stats_ms(d for key, d in durs.items() if kinds.get(key) == k) for k in KINDS[:4]
            },
            "step_time_all": _stats_ms(durs.values()),
            "schedule_ms_mean": 1e3 * statistics.fmean([r[IDX["sched_s"]] for r in rows]) if rows else 0.0,
            "mean_running": statistics.fmean([r[IDX["running_after"]] for r in rows]) if rows else 0.0,
            "decode_tokens_per_step": sum(r[IDX["decode_tokens"]] for r in rows) / n,
            "prefill_tokens_per_step": sum(r[IDX["prefill_tokens"]] for r in rows) / n,
            "new_reqs": sum(r[IDX["new_reqs"]] for r in rows),
            "closed_steps": sum(1 for r in rows if not r[IDX["admit"]]),
            "held_steps": len(held),
            "idle_slot_steps": idle_slots,
            "steps_with_idle_slots": sum(1 for r in waiting_rows if r[IDX["running_after"]] < max_num_seqs),
            "idle_slot_share": idle_slots / (max_num_seqs * n),
        }
    keys = sorted(set().union(*[set(k) for k in kinds_by_rank.values()])) if kinds_by_rank else []
    patterns: dict[str, list[float]] = {}
    pattern_steps: dict[str, int] = {}
    for key in keys:
        ks = [kinds_by_rank[r].get(key, "idle") for r in sorted(kinds_by_rank)]
        busy = [k for k in ks if k != "idle"]
        if all(_prefills(k) for k in ks):
            pat = "all_prefill"
        elif any(_prefills(k) for k in ks) and any(k == "decode" for k in ks):
            pat = "stall"
        elif any(_prefills(k) for k in ks):
            pat = "prefill_vs_idle"
        elif busy and all(k == "decode" for k in busy) and len(busy) == len(ks):
            pat = "all_decode"
        else:
            pat = "decode_vs_idle" if any(k == "decode" for k in ks) else "nothing"
        pattern_steps[pat] = pattern_steps.get(pat, 0) + 1
        ds = [dur_by_rank[r][key] for r in dur_by_rank if key in dur_by_rank[r]]
        if ds:
            patterns.setdefault(pat, []).append(max(ds))
    total = max(1, len(keys))
    return {
        "ranks": per_rank,
        "lockstep_steps": len(keys),
        "pattern_steps": pattern_steps,
        "pattern_share": {p: c / total for p, c in pattern_steps.items()},
        "pattern_step_time": {p: _stats_ms(v) for p, v in patterns.items()},
    }
