"""Online EPLB costs on the 2-rank CPU cluster (DP=2 + EP, tiny Qwen3-MoE, float32).

1. Hook cost (no engine): the router hook (`eplb.slots.LayerRouting`: bincount record +
   logical->physical mapping) per layer call, for several batch sizes.
2. Decode step time, from the client: gaps between successive streamed tokens of 8 concurrent
   greedy requests (one token per request per engine step), in three phases:
   steady state; while an asynchronous rebalance (background staging, layer-by-layer commit at an
   agreed step) runs; while a stop-the-world apply of the same-sized plan runs (transfers and commit
   of every layer inside one step). Worker-side timings of each plan come from the ranks' histories.

Run: .venv/bin/python benchmarks/eplb_online.py  ->  benchmarks/results/eplb_online.{json,md}
CPU numbers are for relative comparison only (2 shared cores; see docs/design.md, "Measured facts").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from eplb.actor import DEFAULTS
from eplb.messages import PlanMessage

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")
NUM_REDUNDANT = 4
PROMPTS = [f"Prompt number {i}: experts and ranks" for i in range(8)]


def hook_cost(repeats: int = 300) -> list[dict]:
    """Median µs per layer call of the routing hook, with and without recording."""
    import torch

    from eplb.policies import default_placement, placement_from_phy2log
    from eplb.recorder import ExpertLoadRecorder
    from eplb.slots import LayerRouting

    torch.set_num_threads(1)
    place = placement_from_phy2log(default_placement(1, 16, 2, NUM_REDUNDANT), 16)
    table = torch.full((16, NUM_REDUNDANT + 1), -1, dtype=torch.int64)
    table[:, : place.log2phy.shape[2]] = torch.from_numpy(place.log2phy[0])
    rec = ExpertLoadRecorder(1, 16, 16 + NUM_REDUNDANT)
    hook = LayerRouting(0, rec, table, torch.from_numpy(place.replica_count[0].copy()))
    rows = []
    for tokens in (1, 8, 32, 128, 512):
        ids = torch.randint(0, 16, (tokens, 2), dtype=torch.int32)
        out = {"tokens": tokens}
        for label, enabled in (("record_and_map_us", True), ("map_only_us", False)):
            rec.enabled = enabled
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter_ns()
                hook(ids)
                samples.append((time.perf_counter_ns() - t0) / 1e3)
            out[label] = statistics.median(samples)
        rows.append(out)
    rec.enabled = True
    return rows


# Plan variants compared side by side in the same engine run (pushed alternately, same-sized plans).
VARIANTS: dict[str, dict] = {
    # The default (eplb.messages TRANSFER_DEFAULTS): no staging thread; at each step boundary the engine's
    # main thread completes the layer posted at the previous one and posts the next one's gloo
    # isend/irecv; gloo's I/O threads move the bytes during the forward.
    # A layer's exchange cut into pieces of at most 1 slot per rank pair (sent from views of the
    # weights, no gather), one piece per step.
    "async_inline_s1": {"transfer": {"inline": True, "slots_per_step": 1}},
    "async_inline_s2": {"transfer": {"inline": True, "slots_per_step": 2}},  # at most 2 slots per pair
    # One slot's w13 rows in one step, its w2 rows in the next (half the bytes per step, twice the steps).
    "async_inline_half": {"transfer": {"inline": True, "slots_per_step": 1, "split_weights": True}},
    "async_inline": {"transfer": {"inline": True, "slots_per_step": 0}},  # a whole layer per step
    # The staging thread: one message per weight per layer and peer, nice 19, one OpenMP thread, one
    # layer's transfer started per engine step.
    "async_thread": {"transfer": {"inline": False}},
    "async_unpaced": {"transfer": {"inline": False, "paced": False}},  # the thread, every layer at once
    # The first implementation's staging: one message and torch.cat per moved slot, normal priority.
    "async_v1": {
        "transfer": {"inline": False, "per_slot": True, "nice": 0, "omp_threads": 0, "paced": False}
    },
    "stop_the_world": {"blocking": True},  # transfers and every layer's commit inside one agreed step
    # The default staging, but the plan's end polled as before 1c394b8: the full eplb_status of both
    # ranks every 10 ms (each poll an RPC on the engine core's stepping thread): what polling costs.
    "async_inline_s1_statuspoll": {"transfer": {"inline": True, "slots_per_step": 1}, "_poll": "status"},
    # The default staging, its outcome polled every second instead of every poll_interval_s.
    "async_inline_s1_poll1s": {"transfer": {"inline": True, "slots_per_step": 1}, "_poll_s": 1.0},
    # The default, but prepared inside the eplb_stage RPC on the stepping thread (layouts at each layer's
    # first piece), as before the preparing thread.
    "async_inline_s1_stepprep": {"transfer": {"inline": True, "slots_per_step": 1, "prepare": "step"}},
    # The default, but its outcome polled with the engine call `eplb_outcome` (as before the outcome files).
    "async_inline_s1_enginepoll": {"transfer": {"inline": True, "slots_per_step": 1}, "_poll": "engine"},
    # The default, but the outcome file polled every poll_interval_s (the rank does not wait for it).
    "async_inline_s1_filepoll": {"transfer": {"inline": True, "slots_per_step": 1}, "_wait_s": 0.0},
    # Both of the above: the default as of 1c394b8.
    "async_inline_s1_old": {
        "transfer": {"inline": True, "slots_per_step": 1, "prepare": "step"},
        "_poll": "engine",
    },
}
DEFAULT_VARIANTS = "async_inline_s1,async_inline_half,async_thread,stop_the_world"
DESCRIBE = {
    "async_inline": "no staging thread, a whole layer per step: at each step boundary, on the engine's main thread, complete the layer "
    "posted at the previous one (gloo wait on ops every peer posted a step earlier) and post the next layer's "
    "isend/irecv (send rows gathered by one index_select per weight and peer, tables prepared there too); "
    "commit one layer per step",
    "async_inline_s1": "the default: as async_inline, but a layer's exchange in pieces of at most 1 slot per rank "
    "pair (sent from a view of the weights, no gather copy), one piece per step; a layer commits once all its "
    "pieces are in; the plan (diff, pieces, every layer's layout and tables) prepared in a background thread "
    "after `eplb_stage` returns, its end read from the worker's outcome file by the rank actor, "
    f"which waits for it (`eplb_outcome_local(plan_id, {DEFAULTS['outcome_wait_s']})`: one call per plan and rank)",
    "async_inline_s2": "as async_inline_s1, at most 2 slots per rank pair per step",
    "async_inline_half": "as async_inline_s1, but a slot's w13 rows in one step and its w2 rows in the next",
    "async_thread": "background staging thread, one message per weight per layer and peer, nice 19 with 1 OpenMP "
    "thread, one layer's transfer started per engine step; commit one layer per step",
    "async_unpaced": "as async_thread, but every layer's transfer at once",
    "async_v1": "the first implementation's staging (one message + torch.cat per moved slot, normal priority, "
    "all layers at once), today's commit",
    "stop_the_world": "every transfer and every layer's commit inside one agreed step",
    "async_inline_s1_poll1s": "as async_inline_s1, but the plan's outcome polled every 1 s",
    "async_inline_s1_stepprep": "as async_inline_s1, but the plan prepared inside the `eplb_stage` RPC on the engine's "
    "stepping thread, each layer's layout and tables at its first piece (before the preparing thread)",
    "async_inline_s1_enginepoll": "as async_inline_s1, but the outcome polled with the engine call `eplb_outcome` "
    "(before the outcome files)",
    "async_inline_s1_filepoll": "as async_inline_s1, but the rank actor does not wait for the outcome file: "
    f"polled every {DEFAULTS['poll_interval_s']} s",
    "async_inline_s1_old": "as async_inline_s1 before both: prepared in the RPC and polled with `eplb_outcome`",
    "async_inline_s1_statuspoll": "as async_inline_s1, but the benchmark polls both ranks' full `eplb_status` "
    "every 10 ms while the plan applies (how it polled before 1c394b8; every other variant polls "
    f"`eplb_outcome_local` every {DEFAULTS['poll_interval_s']} s, as the EPLB actor does)",
}
OUTCOME_WAIT_S = DEFAULTS["outcome_wait_s"]  # how long one local poll waits in the rank for the outcome file
POLL_S = DEFAULTS["poll_interval_s"]  # how often a pushed plan's outcome is polled (as the EPLB actor)
STEADY_REQS = len(PROMPTS) // 2  # requests per rank in a full decode batch


async def _stream(actor, prompt: str, request_id: str, sampling: dict) -> list[tuple[float, float]]:
    """[(t_end, gap_s)] between successive token chunks of one greedy request."""
    last, gaps = None, []
    async for ref in actor.generate.options(num_returns="streaming").remote(
        request_id, prompt, sampling, None
    ):
        chunk = await ref
        now = time.perf_counter()
        if chunk.get("token_ids"):
            if last is not None:
                gaps.append((now, now - last))
            last = now
    return gaps


def _stats(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms, dtype=float)
    return {"n": int(a.size), "median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "mean_ms": float(a.mean())}  # fmt: skip


def _window_max_baseline(seq: list[float], n: int, rng: np.random.Generator, k: int = 400) -> dict:
    """Max over n consecutive steady steps, at k random places: what 'worst step of an n-step window'
    looks like without any plan (the fair reference for a rebalance window's worst step)."""
    if len(seq) <= n or n <= 0:
        return {"n_windows": 0}
    a = np.asarray(seq, dtype=float)
    starts = rng.integers(0, a.size - n, k)
    maxes = np.asarray([a[s : s + n].max() for s in starts])
    return {"n_windows": k, "window_steps": n, "median_of_max_ms": float(np.median(maxes)),
            "p90_of_max_ms": float(np.percentile(maxes, 90))}  # fmt: skip


def _cpu_delta(before: dict, after: dict, labels: dict[int, str]) -> dict[str, float]:
    """CPU ms per thread class between two eplb_thread_cpu snapshots of one worker."""
    out: dict[str, float] = {}
    for tid, a in after.items():
        b = before.get(tid, {"cpu_ms": 0.0})
        label = labels.get(int(tid), "other")
        out[label] = out.get(label, 0.0) + a["cpu_ms"] - b["cpu_ms"]
    return out


async def engine_phases(
    rounds: int, max_tokens: int, variants: dict[str, dict], pyspy_dir: str | None
) -> dict:
    from deployments.config import EngineSettings
    from deployments.rank_group import start_rank_group, stop_rank_group
    from npu_runtime.tiny_model import build_tiny_moe

    eplb = {"enabled": True, "num_redundant": NUM_REDUNDANT, "autostart": False, "layers_per_step": 1}
    settings = EngineSettings(model=str(build_tiny_moe()), data_parallel_size=2, enable_expert_parallel=True,
                              max_model_len=256, max_num_seqs=8, eplb=eplb)  # fmt: skip
    actors, pg, infos = await start_rank_group(settings)
    out: dict = {"startup_s": [i["startup_s"] for i in infos], "max_tokens": max_tokens, "rounds": rounds}
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    rng = np.random.default_rng(0)
    plan_id = [100]
    windows: list[dict] = []
    cpu: list[dict] = []

    async def call_all(method: str, *args):
        return await asyncio.gather(*[a.eplb_call.remote(method, *args) for a in actors])

    async def labels() -> list[dict[int, str]]:
        states = await call_all("eplb_status")
        res = []
        for s in states:
            lab = {s["main_tid"]: "main"}
            lab.update({t: "transfer" for t in s["transfer_tids"]})
            res.append(lab)
        return res

    async def push(variant: str) -> dict:
        old = np.asarray(await actors[0].eplb_call.remote("eplb_placement"))
        new = np.stack([rng.permutation(np.concatenate([np.arange(16), rng.integers(0, 16, NUM_REDUNDANT)]))
                        for _ in range(old.shape[0])])  # fmt: skip
        plan_id[0] += 1
        pid = plan_id[0]
        opts = dict(variants[variant])
        poll_kind = opts.pop("_poll", "local")
        status_poll = poll_kind == "status"
        poll_s = float(opts.pop("_poll_s", POLL_S))
        wait_s = float(opts.pop("_wait_s", OUTCOME_WAIT_S))
        polls: list[float] = []  # perf_counter when each poll was sent (CLOCK_MONOTONIC, as the step logs)
        msg = PlanMessage(pid, old, new, 2, **opts).to_dict()
        cpu0 = await call_all("eplb_thread_cpu")
        t_cpu0 = time.perf_counter()
        spies = []
        if pyspy_dir:
            for r, s in enumerate(await call_all("eplb_status")):
                spies.append(subprocess.Popen(
                    [os.environ.get("PYSPY", "py-spy"), "record", "--pid", str(s["pid"]), "--rate", "200", "--threads", "--idle",
                     "--nonblocking", "--duration", "2", "--format", "raw",
                     "--output", f"{pyspy_dir}/{variant}-{pid}-rank{r}.txt"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
            await asyncio.sleep(0.3)
        replies = await call_all("eplb_stage", msg)
        assert all(r["accepted"] for r in replies), replies
        deadline = time.perf_counter() + 60
        while True:
            # The plan's own record only (None while pending), as seldom as the EPLB actor asks: every
            # poll is an RPC the engine core runs on its stepping thread between steps. The window is
            # the records' t_received..t_finished, so the poll interval does not change what is measured.
            polls.append(time.perf_counter())
            if status_poll:
                states = await call_all("eplb_status")
                found = [next((h for h in s["history"] if h["plan_id"] == pid), None) for s in states]
            elif poll_kind == "engine":
                found = await call_all("eplb_outcome", pid)
            else:  # the rank actor waits for the worker's outcome file (as the EPLB actor): no engine call
                found = await asyncio.gather(*[a.eplb_outcome_local.remote(pid, wait_s)
                                               for a in actors])  # fmt: skip
            if all(found):
                break
            assert time.perf_counter() < deadline, f"plan {pid} not finished: {await call_all('eplb_status')}"
            await asyncio.sleep(0.01 if status_poll else poll_s)
        cpu1 = await call_all("eplb_thread_cpu")
        t_cpu1 = time.perf_counter()
        for sp in spies:
            sp.wait()
        lab = await labels()
        assert all(h["outcome"] == "committed" for h in found), found
        w = {"variant": variant, "plan_id": pid, "moved_slots": int((old != new).sum()),
             "t_lo": min(h["t_received"] for h in found), "t_hi": max(h["t_finished"] for h in found),
             "ranks": [{k: h.get(k) for k in ("prep_ms", "prep_cpu_ms", "stage_ms", "stage_cpu_ms", "commit_ms_total", "commit_ms_max_step", "commit_steps",
                                              "steps_waited", "remote_bytes", "total_ms", "transfer_layers", "wait_ms", "inline", "inline_steps")}
                       for h in found]}  # fmt: skip
        w["polls_ms"] = [round((t - w["t_lo"]) * 1e3, 1) for t in polls]  # when each poll was sent
        deltas = [_cpu_delta(a, b, lab[r]) for r, (a, b) in enumerate(zip(cpu0, cpu1, strict=True))]
        for d, h in zip(deltas, found, strict=True):
            if not h.get("blocking") and not h.get("inline"):  # the staging thread exited: its own clock
                d["transfer"] = h["stage_cpu_ms"]
        cpu.append({"variant": variant, "plan_id": pid, "wall_ms": (t_cpu1 - t_cpu0) * 1e3,
                    "ranks": deltas})  # fmt: skip
        windows.append(w)
        return w

    async def steady_cpu(seconds: float) -> None:
        lab = await labels()
        cpu0 = await call_all("eplb_thread_cpu")
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1 = await call_all("eplb_thread_cpu")
        cpu.append({"variant": "steady", "plan_id": 0, "wall_ms": (time.perf_counter() - t0) * 1e3,
                    "ranks": [_cpu_delta(a, b, lab[r]) for r, (a, b) in enumerate(zip(cpu0, cpu1, strict=True))]})  # fmt: skip

    try:
        await _wave(actors, "warmup", {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True})
        t_bench = time.perf_counter()
        waves: list[tuple[float, float]] = []
        gaps_all: list[tuple[float, float]] = out.setdefault("_gaps", [])
        stop = asyncio.Event()

        async def back_to_back() -> None:
            # Waves of 8 requests one after another for the whole run, so that a plan whose apply
            # outlasts a wave still sees decode steps (an idle DP group does not step).
            n = 0
            while not stop.is_set():
                t_wave = time.perf_counter()
                lst = await asyncio.gather(*[_stream(actors[i % 2], p, f"w{n}-{i}", sampling)
                                             for i, p in enumerate(PROMPTS)])  # fmt: skip
                waves.append((t_wave, time.perf_counter()))
                gaps_all.extend(g for x in lst for g in x)
                n += 1

        traffic = asyncio.ensure_future(back_to_back())
        await asyncio.sleep(1.5)  # past the first prefill
        order = list(variants)
        for rnd in range(rounds):
            # Alternate the variants (rotated each round), a steady stretch between plans.
            for v in order[rnd % len(order) :] + order[: rnd % len(order)]:
                await push(v)
                await steady_cpu(0.8)
        stop.set()
        await traffic
        logs = await call_all("eplb_step_log", t_bench)
        status = await actors[0].eplb_call.remote("eplb_status")
        out["sync_us_per_step"] = status["sync_us_per_step"]
        out["bytes_per_expert"] = status["bytes_per_expert"]
        taken = await actors[0].eplb_call.remote("eplb_take_load")
        out["record_us_per_call_in_engine"] = taken["record_us_per_call"]
    finally:
        await stop_rank_group(actors, pg)
    out.update(_analyse(windows, logs, out.pop("_gaps"), cpu, waves))
    return out


async def _wave(actors, tag: str, sampling: dict) -> None:
    await asyncio.gather(*[_stream(actors[i % 2], p, f"{tag}-{i}", sampling) for i, p in enumerate(PROMPTS)])


STATE_NAMES = {1: "staging", 2: "ready, waiting to agree", 3: "commit", 4: "stop-the-world", 5: "drop"}


def _by_state(steps: list[list[float]]) -> dict[str, dict]:
    """Window steps ([rank, t, step_ms, exec_ms, state, eplb_ms]) grouped by what EPLB did in them:
    median step, median EPLB work at the step boundary, and median step without that work (the
    forward and sampling, slowed or not by what runs beside them)."""
    out: dict[str, dict] = {}
    for code, name in STATE_NAMES.items():
        sel = [s for s in steps if s[4] == code]
        if sel:
            out[name] = {"n": len(sel), "step_ms": float(np.median([s[2] for s in sel])),
                         "eplb_ms": float(np.median([s[5] for s in sel])),
                         "rest_ms": float(np.median([s[2] - s[5] for s in sel]))}  # fmt: skip
    return out


def _first_and_poll_steps(ws: list[dict]) -> dict:
    """A plan's first full decode step per rank (median over plans and ranks) and the window's steps
    a poll was sent during (its [start, end] holds a poll's send time) against the others."""
    first, polled, other = [], [], []
    for w in ws:
        polls = w.get("polls_ms") or []
        for r in (0, 1):
            st = sorted((s for s in w.get("steps", []) if s[0] == r), key=lambda s: s[1])
            if st:
                first.append(st[0][2])
            for s in st[1:]:
                (polled if any(s[1] <= t <= s[1] + s[2] for t in polls) else other).append(s[2])
    med = lambda a: float(np.median(a)) if a else float("nan")  # noqa: E731
    return {"first_step_ms": med(first), "poll_step_ms": med(polled), "poll_steps": len(polled),
            "no_poll_step_ms": med(other)}  # fmt: skip


def _analyse(windows: list[dict], logs: list[list[list[float]]], gaps: list[tuple[float, float]],
             cpu: list[dict], waves: list[tuple[float, float]]) -> dict:  # fmt: skip
    """Engine-side and client-side step times per phase; see _md for the definitions."""
    residue = 0.3  # s after a plan during which steps count neither as steady nor as the plan's

    def where(t: float, slack: float = 0.0) -> dict | None | str:
        """The plan window holding time t (slack: a token sent by the window's last step arrives a
        little after it), "residue" right after one, else None."""
        for w in windows:
            if w["t_lo"] <= t <= w["t_hi"] + slack:
                return w
            if w["t_hi"] < t <= w["t_hi"] + slack + residue:
                return "residue"
        return None

    def in_wave(t: float) -> bool:
        return any(a + 1.0 <= t <= b - 1.0 for a, b in waves)

    rng = np.random.default_rng(1)
    res: dict = {"windows": windows, "engine": {}, "client": {}, "cpu": cpu}
    # Engine side, per rank. Only full decode steps (4 requests, 1 token each), like for like.
    per_plan: dict[int, dict] = {}
    steady_all: list[float] = []
    steady_seq: list[list[float]] = []
    for rank, log in enumerate(logs):
        steady: list[float] = []
        for t, _exec_ms, step_ms, tokens, reqs, state, _pid, stall in log:
            if reqs != STEADY_REQS or tokens != reqs:
                continue
            w = where(t)
            if w is None:
                if state == 0 and in_wave(t):  # eplb.steplog.STEP_IDLE
                    steady.append(step_ms)
            elif isinstance(w, dict):
                d = per_plan.setdefault(
                    w["plan_id"], {"variant": w["variant"], "steps": [[], []], "stall": [[], []]}
                )
                d["steps"][rank].append(step_ms)
                d["stall"][rank].append(stall)
                w.setdefault("steps", []).append(
                    [rank, round((t - w["t_lo"]) * 1e3, 1), round(step_ms, 1), round(_exec_ms, 1), state,
                     round(stall, 1)]
                )  # fmt: skip
        steady_seq.append(steady)
        steady_all += steady
        res["engine"][f"steady_rank{rank}"] = _stats(steady)
    res["engine"]["steady"] = _stats(steady_all)
    res["engine"]["steady_exec_note"] = "step_ms: execute_model start -> sample_tokens end, in the worker"
    for variant in {w["variant"] for w in windows}:
        plans = [d for d in per_plan.values() if d["variant"] == variant]
        steps = [x for d in plans for r in d["steps"] for x in r]
        worst = [max(max(r, default=0.0) for r in d["steps"]) for d in plans]
        medians = [float(np.median([x for r in d["steps"] for x in r])) for d in plans if any(d["steps"])]
        n_win = int(np.median([max(len(r) for r in d["steps"]) for d in plans])) if plans else 0
        res["engine"][variant] = {
            "all_steps": _stats(steps),
            "plans": len(plans),
            "per_plan_worst_ms": worst,
            "per_plan_median_ms": medians,
            "per_plan_steps": [max(len(r) for r in d["steps"]) for d in plans],
            "median_of_worst_ms": float(np.median(worst)) if worst else None,
            "max_stall_ms": max((x for d in plans for r in d["stall"] for x in r), default=0.0),
            "median_stall_ms": float(np.median([x for d in plans for r in d["stall"] for x in r] or [0.0])),
            "steady_reference": _window_max_baseline(steady_seq[0], n_win, rng),
            "by_state": _by_state(
                [s for w in windows if w["variant"] == variant for s in w.get("steps", [])]
            ),
            **_first_and_poll_steps([w for w in windows if w["variant"] == variant]),
        }
    # Client side: gaps between streamed tokens, windows by the gap's end time.
    steady_g: list[float] = []
    by_variant: dict[str, list[float]] = {}
    for t, g in gaps:
        w = where(t, slack=0.06)
        if w is None:
            if in_wave(t):
                steady_g.append(g * 1e3)
        elif isinstance(w, dict):
            by_variant.setdefault(w["variant"], []).append(g * 1e3)
    res["client"]["steady"] = _stats(steady_g)
    for v, lst in by_variant.items():
        res["client"][v] = _stats(lst)
    return res


DIAGNOSIS = [
    "## History (short)", "",
    "- v1, first implementation (`eplb_online_v1.json`, 2026-11-22): a staging thread with one message and a "
    "few torch calls per moved slot; worst step per plan 2.24x the same-length steady max. The cost was "
    "contention, not the copies (the thread used 15-37 ms CPU per plan): GIL hand-offs per torch call between "
    "the thread and the forward, and the thread's own OpenMP team, on 2 busy cores.",
    "- v2, staging thread tuned (`eplb_online_v2.json`): one message per weight per layer and peer, nice 19, one "
    "OpenMP thread, one layer started per step, tables prepared off the step, an agreed start on every rank "
    "(every p2p op has its peer), 30 s gloo timeout; `async_thread` here. Median step during apply 1.24x "
    "steady, worst step per plan 1.18x the same-length steady max: not met.",
    "- v3, inline staging (this file, the default): no staging thread. At each step boundary the engine's main "
    "thread completes the piece posted one step earlier and posts the next (gloo isend/irecv; gloo's I/O "
    "threads move the bytes during the forward). gloo's `is_completed` stays false until `wait`, so the "
    "completion is a real `wait`, but on ops every peer posted a step earlier: at most ~3 ms, median ~0.02 ms. "
    "Posting a whole layer per step (`async_inline`) was no better than the thread (median 1.24-1.25x in two "
    "runs): its step-boundary work took 6-7 ms wall (p90 25 ms) for 2 ms of CPU. Cutting a layer into "
    "one-slot pieces (`async_inline_s1`, 393 KB per rank pair and step, sent from views of the weights) bounds "
    "that work to ~1.5 ms wall / 0.4 ms CPU per step; the apply takes ~30 steps (1.1 s) instead of ~9.",
    "- Three runs of 2026-11-30 with the previous arrangement ([eplb_online.md](eplb_online.md): model in a "
    "separate worker process, 2 threads per rank; other jobs' load varied), same-run ratios: `async_inline_s1` "
    "median step during apply 1.16x / 1.12x / 1.15x steady (`async_thread` 1.23x / 1.20x / 1.21x), worst step "
    "per plan against the same-length steady max 1.08x / 1.22x / 1.11x (thread 1.48x / 1.43x / 1.41x). Half-slot "
    "pieces (`async_inline_half`): median 1.10x but twice the steps (~55) and worse tails; two slots per step "
    "(`async_inline_s2`): 1.16x / 1.23x. There a one-slot staging step took 36.6 ms against 31.8 steady: "
    "1.4 ms of EPLB work at the boundary and a forward 2.4 ms longer; a commit step +4.0 ms.",
    "- v4, polling (2026-11-30, 1c394b8): every run above, and the first in-process run (median 1.32x, worst "
    "step per plan 1.22x, staging and commit steps 28-29 ms without their EPLB work against 23.0 steady), "
    "polled both ranks' full `eplb_status` every 10 ms while a plan applied (the EPLB actor every 50 ms). Each "
    "poll is a vLLM utility RPC (Ray actor -> AsyncLLM -> ZMQ -> the engine core, which runs it on its stepping "
    "thread between steps) carrying the last 20 plans' records with their per-step lists: about two polls per "
    "step and rank, on the 2 cores the forwards run on. Both now ask `eplb_outcome(plan_id)` (the plan's own "
    "record, None while pending) every `poll_interval_s` = 0.2 s. Seven in-process runs of 2026-11-30 "
    "10:15-11:05 UTC (`eplb_online_inproc_runs.json`; `eplb_online_inproc` is the first), `async_inline_s1`: median step during apply 1.08x / 1.05x / "
    "1.12x / 1.07x / 1.09x / 1.05x / 1.09x steady; worst step per plan against the same-length steady max "
    "1.06x / 1.01x / 1.06x / 1.06x / 1.21x / 1.02x / 1.03x. The old polling side by side "
    "(`async_inline_s1_statuspoll`, runs 1-3 and 7): median 1.25x / 1.24x / 1.20x / 1.20x, worst per plan "
    "1.25x / 1.24x / 1.06x / 1.19x; a staging step without its EPLB work 25.9 / 24.4 / 23.9 / 29.6 ms against "
    "21.2 / 20.2 / 21.2 / 26.1 with the new polling (steady 21.9 / 20.4 / 20.6 / 26.1). The target holds on "
    "these two measures in most runs, not in every run (median over 1.10x in one of seven, worst per plan in "
    "one of seven).",
    "- What was left after v4: the worst step of all plans against the steady p99 is 0.92x-1.56x (over 1.10x in six of "
    "seven runs). A plan's first step takes 26-29 ms (median over plans and ranks, runs 1-4) against 20-23 "
    "steady: it agrees on the start and posts the first piece with its layer's tables (1-2.5 ms of EPLB work; "
    "6-8 ms in a run's first plan, first use of the transfer pair) while the pushing side's RPCs arrive. Each "
    "remaining poll still costs its step about 2-3 ms (run 6, which records when polls were sent: steps a poll "
    "landed in 26.9 ms median against 24.3 for the window's other steps); polling every 1 s "
    "(`async_inline_s1_poll1s`, same run) gave 1.05x / 1.07x against 1.05x / 1.02x at 0.2 s, so the default "
    "stays 0.2 s; keeping the benchmark's other RPCs 0.2 s away from the plan's start made no clear "
    "difference (run 5). Commit steps: 1-5 ms of index_copy_ and table copies in the step (about 0.4 ms for one layer's "
    "rows in a one-thread micro-benchmark). The longest steps cluster inside single plans (e.g. 49, 42, 42, 40 ms in one plan, "
    "both ranks alike) with little EPLB work in them: bursts from elsewhere on the 2 shared cores.",
    "- Tried and not kept: waiting on a piece's sends only at its layer's last piece (`defer_send_waits`, fewer "
    "GIL-releasing calls per boundary): median 0.98x against 1.12x for `async_inline_s1` in run 3, 1.08x "
    "against 1.07x in run 4 (6 rounds), boundary wall time 0.63 against 0.93 ms, then 0.78 against 0.56 ms: "
    "no consistent gain.",
    "- v5, preparation off the stepping thread and outcome files (2026-11-30, 5e18c18, 2d6fb16, 673c282, "
    "59b3aa8): `eplb_stage` does only the cheap checks (ids, options, group size, stale start placement, both "
    "tables well-formed) and queues the rest to a persistent background thread (nice 19, one OpenMP thread): "
    "TransferPlan diff and op checks, pieces, every layer's layout, receive buffers and commit tables (median "
    "4-15 ms wall, 2-5 ms CPU per plan); the rank adds the id to the start agreement only then (a plan failing "
    "there is reported `failed` through the agreement's failed row). The worker also writes each plan record "
    "atomically to a per-rank file that the rank actor waits for (`DPRank.eplb_outcome_local(plan_id, wait_s)`: "
    "checked every 50 ms, the engine asked only after 2 s without a file), so the EPLB actor and this "
    "benchmark make one call per plan and rank, none into the engine. Six 6-round runs of 11:28-11:49 UTC on a "
    "busier box (steady 26-31 ms; runs 9-14 in `eplb_online_inproc_runs.json`, run 13 is this file), the "
    "default against the old behaviour side by side (`async_inline_s1_old`: preparation inside the RPC, "
    "`eplb_outcome` polled every 0.2 s): median step during apply 1.035x-1.075x steady against 1.051x-1.117x "
    "(lower in 5 of 6 runs); worst step per plan 1.00x-1.08x the same-length steady max against 0.99x-1.18x "
    "(lower in 5 of 6); worst step of all plans 1.03x-1.21x the steady p99 against 1.01x-1.28x (over 1.10x in "
    "one run of six against three). Per change: steps an engine poll was sent in took 3.6-8.9 ms more than the "
    "window's other steps (`_enginepoll`, `_old`); with the file wait no poll lands in a plan's steps, and the "
    "median ratio of the file-wait variants is below that of their engine-poll twins in 11 of 12 pairings. A "
    "plan's first step exceeds the window's other steps by -1.1-6.9 ms (mean 2.7) with the preparing thread "
    "against 1.8-9.7 ms (mean 5.0) with the preparation in the RPC (`_stepprep`, `_old`): about halved, not "
    "gone, and not in every run. A py-spy profile of plans (`--pyspy`, 200 Hz) showed the RPC waiting in "
    "`Thread.start` for the new thread to run (5-15 ms in some plans) and the new thread scanning "
    "/proc/self/maps for the OpenMP library: hence the persistent thread (59b3aa8; runs 13-14, no separate "
    "gain visible in the totals). Commit steps: 1.3-2.6 ms of EPLB work against 2.0-3.0 with the old "
    "behaviour, the tables were prepared before commit in both: it is the index_copy_ and table copies.",
    "- What is left: the worst step of all plans against the steady p99 (1.21x in run 10: one 51 ms commit step "
    "with 7.7 ms of EPLB work in it, the index_copy_ and table copies on a busy core); a plan's first step is still up to 7 ms over the others: the "
    "`eplb_stage` utility call itself (the plan's message through the engine core) lands in it, and the "
    "preparing thread's 2-5 ms of Python compete with the forward for the GIL in the next steps (nice does not "
    "apply to the GIL). Runs on this busy box vary by several percent from one to the next.",
    "- Not tried yet: rebinding the parameters to prepared tensors at commit (removes the commit copies; needs "
    "in-place updates under CUDA graphs, so a per-platform path); handing the plan to the worker without a "
    "utility call (e.g. a file, as for the outcome) or preparing it in the rank actor's process (no GIL "
    "shared with the forward); a GIL profile of the bursts.",
]  # fmt: skip


def _verdict(eng: dict) -> list[str]:
    """The issue's target (worst step during the async rebalance within +10 % of steady state), by
    each measure, computed from the figures above, one column per asynchronous variant."""
    e, c = eng["engine"], eng["client"]
    cols = [v for v in eng.get("variants", e) if v.startswith("async") and "all_steps" in e.get(v, {})]
    if not cols:
        return []
    st = e["steady"]

    def ratios(v: str) -> list[tuple[str, float]]:
        a = e[v]
        ref = a["steady_reference"].get("median_of_max_ms", float("nan"))
        rows = [
            ("engine: median step during apply / steady median", a["all_steps"]["median_ms"] / st["median_ms"]),
            ("engine: worst step per plan (median over plans) / steady max over as many steps", a["median_of_worst_ms"] / ref),
            ("engine: worst step per plan (median over plans) / steady median", a["median_of_worst_ms"] / st["median_ms"]),
            ("engine: worst step of all plans / steady p99", a["all_steps"]["max_ms"] / st["p99_ms"]),
            ("engine: p90 during apply / steady p90", a["all_steps"]["p90_ms"] / st["p90_ms"]),
        ]  # fmt: skip
        if c.get(v, {}).get("n"):
            rows.append(
                (
                    "client: median gap during apply / steady median",
                    c[v]["median_ms"] / c["steady"]["median_ms"],
                )
            )
            rows.append(("client: p90 gap during apply / steady p90", c[v]["p90_ms"] / c["steady"]["p90_ms"]))  # fmt: skip
        return rows

    table = {v: ratios(v) for v in cols}
    out = ["", "### Target: worst step during the async rebalance within +10 % of steady state", "",
           "| measure | " + " | ".join(f"`{v}`" for v in cols) + " |",
           "| --- | " + " | ".join("---:" for _ in cols) + " |"]  # fmt: skip
    for i, (name, _) in enumerate(table[cols[0]]):
        cells = []
        for v in cols:
            r = table[v][i][1] if i < len(table[v]) else float("nan")
            cells.append(f"{r:.2f} {'yes' if r <= 1.10 else 'no'}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def _md(res: dict) -> str:
    lines = ["# Online EPLB on CPU (DP=2 + EP, tiny Qwen3-MoE, float32, 16 experts + 4 redundant slots)", "",
             "Relative numbers only: 2 shared cores, other engineers' jobs may run. Variants are compared side by "
             "side in one engine run (plans pushed alternately into the same decode waves).", "",
             "## Router hook cost per layer call (median µs, 1 thread)", "",
             "| tokens | record + map | map only |", "| ---: | ---: | ---: |"]  # fmt: skip
    for r in res["hook"]:
        lines.append(f"| {r['tokens']} | {r['record_and_map_us']:.1f} | {r['map_only_us']:.1f} |")
    eng = res.get("engine")
    if not eng:
        return "\n".join(lines) + "\n"
    variants = [v for v in eng["variants"] if v in eng["engine"]]
    lines += ["", f"In-engine record cost: {eng['record_us_per_call_in_engine']:.1f} µs per layer call; per-step "
              f"agreement bookkeeping on steps without a plan (rows ride on vLLM's own DP all-reduce): "
              f"{eng['sync_us_per_step']:.1f} µs per step.", "",
              f"Back-to-back decode waves of 8 greedy requests ({eng['max_tokens']} tokens each, 4 per rank); "
              f"{eng['rounds']} rounds of one plan per variant (random placement, ~75 of 80 slots moved, ~7 MB "
              "received per rank), 0.8 s of steady decode between plans.", "",
              "Variants:", "", *[f"- `{v}`: {DESCRIBE.get(v, v)}" for v in variants], "",
              "## Engine-side step time (in the worker: execute_model start to sample_tokens end; both ranks, full "
              "decode steps only)", "",
              "| phase | steps | median ms | p90 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip

    def row(name: str, s: dict) -> str:
        return (f"| {name} | {s['n']} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | "
                f"{s['max_ms']:.1f} |")  # fmt: skip

    e = eng["engine"]
    lines.append(row("steady state", e["steady"]))
    for v in variants:
        lines.append(row(f"{v}: during apply", e[v]["all_steps"]))
    lines += ["", "Worst step per plan window (max over both ranks' steps in the window) against the same-length "
              "steady reference (max over n consecutive steady steps, median over 400 random places):", "",
              "| variant | plans | steps per window | worst step per plan ms | median worst ms | steady n-step max "
              "(median) ms | median worst / steady median | EPLB work in a step: median / longest ms |",
              "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    steady_med = e["steady"]["median_ms"]
    for v in variants:
        d = e[v]
        ref = d["steady_reference"].get("median_of_max_ms", float("nan"))
        worst = ", ".join(f"{x:.0f}" for x in d["per_plan_worst_ms"])
        nsteps = ", ".join(str(x) for x in d["per_plan_steps"])
        lines.append(f"| {v} | {d['plans']} | {nsteps} | {worst} | {d['median_of_worst_ms']:.1f} | {ref:.1f} | "
                     f"{d['median_of_worst_ms'] / steady_med:.2f} | {d.get('median_stall_ms', 0.0):.2f} / {d['max_stall_ms']:.1f} |")  # fmt: skip
    if all("first_step_ms" in e[v] for v in variants):
        lines += ["", "A plan's first step and the steps polls were sent in (median ms, both ranks; steady median "
                  f"{steady_med:.1f}):", "",
                  "| variant | first step of a plan | steps with a poll (n) | other steps of the window |",
                  "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for v in variants:
            d = e[v]
            polled = f"{d['poll_step_ms']:.1f}" if d["poll_steps"] else "-"
            lines.append(f"| {v} | {d['first_step_ms']:.1f} | {polled} ({d['poll_steps']}) | "
                         f"{d['no_poll_step_ms']:.1f} |")  # fmt: skip
    lines += _verdict(eng)
    lines += ["", "Where a window's steps go (median ms per step, both ranks; EPLB work = inside the step at the "
              f"boundary, on the main thread; steady median {steady_med:.1f}):", "",
              "| variant | step kind | steps | step | EPLB work | step without it |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for v in variants:
        for name, b in e[v].get("by_state", {}).items():
            lines.append(
                f"| {v} | {name} | {b['n']} | {b['step_ms']:.1f} | {b['eplb_ms']:.2f} | {b['rest_ms']:.1f} |"
            )
    inl = [
        (v, w)
        for v in variants
        for w in eng["windows"]
        if w["variant"] == v and w["ranks"][0].get("inline_steps")
    ]
    if inl:
        lines += ["", "Inline staging at the step boundary (median over the plan's staging steps, both ranks): wall "
                  "time against the main thread's CPU time in it; the difference is time the thread was runnable "
                  "or blocked without running (2 shared cores, GIL hand-offs, gloo's pair lock).", "",
                  "| variant | staging steps per plan | wall ms | CPU ms | wait on the previous piece, max ms |",
                  "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for v in dict.fromkeys(v for v, _ in inl):
            st = [x for vv, w in inl if vv == v for r in w["ranks"] for x in (r.get("inline_steps") or [])]
            waits = [x for vv, w in inl if vv == v for r in w["ranks"] for x in (r.get("wait_ms") or [])]
            per = np.median([len(w["ranks"][0]["inline_steps"]) for vv, w in inl if vv == v])
            lines.append(f"| {v} | {per:.0f} | {np.median([a for a, _ in st]):.2f} | {np.median([b for _, b in st]):.2f} "
                         f"| {max(waits, default=0.0):.2f} |")  # fmt: skip
    c = eng["client"]
    lines += ["", "## Client-side gap between streamed tokens (8 concurrent requests)", "",
              "| phase | gaps | median ms | p90 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: | ---: |",
              row("steady state", c["steady"])]  # fmt: skip
    for v in variants:
        if c.get(v, {}).get("n"):
            lines.append(row(f"{v}: during apply", c[v]))
    lines += ["", "## Where the CPU goes (worker process threads, ms of CPU per second of wall time, both ranks "
              "summed; median over plans)", "", "| phase | wall ms | main | transfer | other threads |",
              "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for v in ["steady", *variants]:
        rows = [x for x in eng["cpu"] if x["variant"] == v]
        if not rows:
            continue

        def rate(x: dict, k: str) -> float:
            return sum(r.get(k, 0.0) for r in x["ranks"]) / x["wall_ms"] * 1e3

        med = {k: float(np.median([rate(x, k) for x in rows])) for k in ("main", "transfer", "other")}
        wall = float(np.median([x["wall_ms"] for x in rows]))
        lines.append(f"| {v} | {wall:.0f} | {med['main']:.0f} | {med['transfer']:.0f} | {med['other']:.0f} |")
    lines += ["", "## Worker-side cost per plan (median over plans, rank 0 / rank 1)", "",
              "| variant | transfer ms (wall) | transfer CPU ms | commit ms total | commit steps | steps waited "
              "| MB received | total ms | inline wait per layer, max ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for v in variants:
        ws = [w for w in eng["windows"] if w["variant"] == v]

        def med2(k: str, scale: float = 1.0, ws: list = ws) -> str:
            return " / ".join(f"{np.median([w['ranks'][r][k] for w in ws]) * scale:.1f}" for r in range(2))

        def wait_max(ws: list) -> str:
            if not all(w["ranks"][r].get("wait_ms") for w in ws for r in range(2)):
                return "-"
            return " / ".join(f"{max(x for w in ws for x in w['ranks'][r]['wait_ms']):.2f}" for r in range(2))

        lines.append(f"| {v} | {med2('stage_ms')} | {med2('stage_cpu_ms')} | {med2('commit_ms_total')} | {med2('commit_steps')} | "
                     f"{med2('steps_waited')} | {med2('remote_bytes', 1e-6)} | {med2('total_ms')} | {wait_max(ws)} |")  # fmt: skip
    lines += ["", *DIAGNOSIS]
    return "\n".join(lines) + "\n"


def run_on_local_ray(run: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine `run()` makes on a local Ray instance on loopback (more logical CPUs than cores:
    the actors mostly wait), with vLLM's CPU environment set first; Ray is shut down after."""
    from npu_runtime.platform import apply_vllm_env

    apply_vllm_env()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        return asyncio.run(run())
    finally:
        ray.shutdown()


def write_results(out: Path, res: dict, md: str) -> None:
    """OUT.json (the results) and OUT.md (their report), which is also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


def main() -> None:

    from npu_runtime.platform import apply_vllm_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds of one plan per variant")
    ap.add_argument("--max-tokens", type=int, default=224)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated names from VARIANTS")
    ap.add_argument("--pyspy", metavar="DIR", help="diagnosis: py-spy record each worker around each plan (skews "
                    "timings; results are then not written to benchmarks/results)")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS / "eplb_online"), help="results path without suffix")
    ap.add_argument(
        "--render", metavar="JSON", help="only rewrite OUT.md from a results JSON of an earlier run"
    )
    args = ap.parse_args()
    if args.render:
        Path(args.out).with_suffix(".md").write_text(_md(json.loads(Path(args.render).read_text())))
        return
    apply_vllm_env()
    res: dict = {"hook": hook_cost()}
    print(json.dumps(res["hook"], indent=1))
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    if args.pyspy:
        Path(args.pyspy).mkdir(parents=True, exist_ok=True)
    res["engine"] = run_on_local_ray(
        lambda: engine_phases(args.rounds, args.max_tokens, variants, args.pyspy)
    )
    res["engine"]["variants"] = list(variants)
    out = Path(args.out)
    if args.pyspy:
        out = Path(args.pyspy) / "eplb_online"
    write_results(out, res, _md(res))


if __name__ == "__main__":
    main()
