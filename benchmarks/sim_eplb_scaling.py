"""EPLB scaling study on the simulator: EP 8-128 x policy x redundant slots x async/stop-the-world x
re-plan interval, DeepSeek-V3 (`ray_configs/sim-deepseek-v3.yaml` costs, `cluster.sim.transfer` for
moving experts).

Every EP size runs the same per-rank workload: max_num_seqs 32 per rank and a client concurrency of
32 x EP (every slot filled; the calibrated config's 128 would leave 2 requests per rank at EP 64),
2 x concurrency requests of 3500 +- 50 % input and --output-len +- 50 % output tokens (at +- 10 % the
request waves stay in lock step and a run's throughput flips between two regimes, 290 s vs 340 s at
EP 8, whatever the EPLB setting; at +- 50 % three seeds agree within 0.5 %). Expert load:
the synthetic model with --layer-correlation and --depth-skew (assumptions, stated in the report).
An "oracle" row per EP (no skew at all, no EPLB) bounds what any placement can gain.

Reported per run: MoE max/mean (steady decode steps, i.e. no prefill and at least half the slots
decoding; realised per step, and under the popularity without sampling noise), steady decode step
time, mean TPOT, output throughput, slot moves per plan (all 58 layers), async cost per moved layer,
stop-the-world stall, worst step carrying a transfer vs the steady decode step. A diagnosis section
reruns the issue's command (EP 64, concurrency 128) and follows each plan from window to steps.

    nice -n 10 .venv/bin/python benchmarks/sim_eplb_scaling.py [--out-dir benchmarks/results] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.sim.config import SimConfig, apply_overrides, load_config
from cluster.sim.engine import SimResult, simulate

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray_configs" / "sim-deepseek-v3.yaml"
EP_SIZES = [8, 16, 32, 64, 128]
POLICIES = ["deepseek", "swift"]
REDUNDANT_PER_RANK = [0, 1]
MODES = ["async", "sync"]
INTERVALS = [250, 1000]


def study_config(
    ep: int,
    policy: str,
    redundant_per_rank: int,
    mode: str,
    interval: int,
    *,
    output_len: int,
    layer_correlation: float,
    depth_skew: float,
    seed: int,
    extra: list[str] | None = None,
) -> SimConfig:
    """The simulator config of one study cell (the calibrated config plus the study's overrides)."""
    conc = 32 * ep
    overrides = [
        f"cluster.num_ranks={ep}",
        "cluster.max_num_seqs=32",
        f"workload.max_concurrency={conc}",
        f"workload.num_requests={2 * conc}",
        f"workload.output_len={output_len}",
        "workload.len_range_ratio=0.5",
        f"experts.num_redundant={redundant_per_rank * ep}",
        f"experts.layer_correlation={layer_correlation}",
        f"experts.depth_skew={depth_skew}",
        f"eplb.policy={policy}",
        f"eplb.mode={mode}",
        f"eplb.interval_steps={interval}",
        f"seed={seed}",
        *(extra or []),
    ]
    return apply_overrides(load_config(CONFIG), overrides)


def _mean(x: np.ndarray) -> float:
    """Mean of a float array; NaN (without a warning) when it is empty."""
    return float(x.mean()) if x.size else float("nan")


def summarise(r: SimResult, cfg: SimConfig) -> dict[str, Any]:
    """One run's numbers (ms, tok/s, ratios), rounded for the JSON."""
    m = r.metrics()
    busy = r.decode_tokens >= 0.5 * cfg.cluster.num_ranks * cfg.cluster.max_num_seqs
    steady = (r.prefill_tokens == 0) & busy & (r.transfer_s == 0)
    moving = r.transfer_s > 0
    plans = r.eplb_plans
    out = {
        "moe_imbalance": _mean(r.moe_imbalance[steady]),
        "moe_imbalance_expected": _mean(r.moe_imbalance_expected[steady]),
        "steady_decode_step_ms": _mean(r.step_time[steady]) * 1e3,
        "mean_tpot_ms": m["mean_tpot_ms"],
        "output_tok_s": m["output_tok_s"],
        "duration_s": m["duration_s"],
        "plans": len(r.eplb_plan_moves),
        "moves_per_plan": float(np.mean(r.eplb_plan_moves)) if r.eplb_plan_moves else 0.0,
        "async_layer_ms_mean": float(np.mean(r.eplb_async_layer_s) * 1e3) if r.eplb_async_layer_s else 0.0,
        "async_layer_ms_max": float(np.max(r.eplb_async_layer_s) * 1e3) if r.eplb_async_layer_s else 0.0,
        "sync_stall_ms_max": float(np.max(r.eplb_sync_stall_s) * 1e3) if r.eplb_sync_stall_s else 0.0,
        "worst_transfer_step_ms": float(r.step_time[moving].max() * 1e3) if moving.any() else 0.0,
        "plan_window_after": float(np.mean([p["window_after"] for p in plans])) if plans else None,
        "plan_popularity_at_apply": float(np.mean([p.get("popularity_at_apply", np.nan) for p in plans]))
        if plans
        else None,
        "steps": r.steps,
    }
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def run_grid(
    eps: list[int],
    intervals: list[int],
    *,
    output_len: int,
    layer_correlation: float,
    depth_skew: float,
    seed: int,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Every cell of the grid, plus a no-EPLB and an oracle (skew 0) row per EP size."""
    rows = []
    common = {
        "output_len": output_len,
        "layer_correlation": layer_correlation,
        "depth_skew": depth_skew,
        "seed": seed,
    }
    for ep in eps:
        cells: list[tuple[str, int, str, int, list[str]]] = [
            ("none", 0, "async", intervals[0], []),
            ("oracle", 0, "async", intervals[0], ["experts.skew_sigma=0.0"]),
        ]
        cells += [
            (p, k, m, i, []) for p in POLICIES for k in REDUNDANT_PER_RANK for m in MODES for i in intervals
        ]
        for policy, k, mode, interval, extra in cells:
            cfg = study_config(
                ep, "none" if policy == "oracle" else policy, k, mode, interval, extra=extra, **common
            )
            t0 = time.perf_counter()
            r = simulate(cfg, "off", record_rank_time=False)
            row = {
                "ep": ep,
                "policy": policy,
                "redundant_per_rank": k,
                "mode": mode if policy not in ("none", "oracle") else "-",
                "interval": interval if policy not in ("none", "oracle") else None,
                **summarise(r, cfg),
            }
            rows.append(row)
            if progress:
                print(
                    f"EP {ep:3d} {policy:8s} r{k} {row['mode']:5s} i{interval}: imb {row['moe_imbalance']:.2f} "
                    f"step {row['steady_decode_step_ms']:.1f} ms, {row['output_tok_s']:.0f} tok/s "
                    f"({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
    return rows


def diagnose(seed: int) -> dict[str, Any]:
    """The issue's run (EP 64, swift, 64 redundant, lengths +-10 %, the config's concurrency 128), with
    each plan followed from its window to the steps, and two controls: no drift, full concurrency."""
    base = [
        "cluster.num_ranks=64",
        "eplb.policy=swift",
        "experts.num_redundant=64",
        "workload.len_range_ratio=0.1",
        f"seed={seed}",
    ]
    out: dict[str, Any] = {}
    variants = {
        "issue_run": [],
        "issue_run_no_eplb": ["eplb.policy=none"],
        "no_drift": ["experts.drift_timescale_s=.inf"],
        "full_concurrency": ["workload.max_concurrency=2048", "workload.num_requests=4096"],
        "full_concurrency_no_eplb": [
            "workload.max_concurrency=2048",
            "workload.num_requests=4096",
            "eplb.policy=none",
        ],
    }
    for name, extra in variants.items():
        cfg = apply_overrides(load_config(CONFIG), base + extra)
        r = simulate(cfg, "off", record_rank_time=False)
        tokens = r.prefill_tokens + r.decode_tokens
        m = r.metrics()
        out[name] = {
            "mean_tokens_per_step": round(float(tokens.mean()), 1),
            "moe_imbalance_realised": round(float(r.moe_imbalance.mean()), 3),
            "moe_imbalance_expected": round(float(r.moe_imbalance_expected.mean()), 3),
            "mean_decode_only_step_ms": round(m["mean_decode_only_step_ms"], 2),
            "mean_step_s": round(float(r.step_time.mean()), 4),
            "plans": [{k: round(v, 3) for k, v in p.items()} for p in r.eplb_plans],
        }
    return out


def _fmt(x: Any, spec: str = "{:.2f}") -> str:
    return "-" if x is None else spec.format(x)


def markdown(doc: dict[str, Any]) -> str:
    """The report: headline, diagnosis, and the full table."""
    meta, rows, head = doc["meta"], doc["rows"], doc["headline"]
    d = doc["diagnosis"]
    issue, nodrift, full = d["issue_run"], d["no_drift"], d["full_concurrency"]
    p0 = issue["plans"][0] if issue["plans"] else {}
    lines = [
        "# EPLB scaling study (simulator)",
        "",
        f"DeepSeek-V3 (256 experts, 58 MoE layers, {meta['sim_layers']} simulated), calibrated step costs "
        f"(`ray_configs/sim-deepseek-v3.yaml`), transfer costs from `cluster.sim.transfer` (8-bit experts of "
        f"{meta['expert_mb']:.1f} MB, HCCS 56 GB/s in a node of 8, RoCE 25 GB/s across nodes, per-op latency "
        f"{meta['p2p_op_latency_ms']:.2f} ms fitted to SwiftBalancer's 16-expert stall). Workload per EP: 32 "
        f"requests per rank in flight, 2 x that many requests, 3500 / {meta['output_len']} tokens +-50 %. "
        f"Expert load: log-popularity std 0.6, drift time 120 s, layer correlation {meta['layer_correlation']}, "
        f"depth skew {meta['depth_skew']} (assumptions, not fitted). One seed ({meta['seed']}); "
        f"{meta['runs']} runs in {meta['wall_s']:.0f} s.",
        "",
        "## Headline",
        "",
    ]
    lines += [f"- {h}" for h in head["text"]]
    lines += [
        "",
        "## Diagnosis: why the issue's EP 64 run only went 2.43 -> 2.20",
        "",
        f"Rerun (concurrency 128 over 64 ranks, so about 2 requests per rank; "
        f"{issue['mean_tokens_per_step']:.0f} tokens per step): realised max/mean "
        f"{d['issue_run_no_eplb']['moe_imbalance_realised']:.2f} without EPLB, "
        f"{issue['moe_imbalance_realised']:.2f} with swift; under the popularity itself (no sampling noise) "
        f"{d['issue_run_no_eplb']['moe_imbalance_expected']:.2f} -> {issue['moe_imbalance_expected']:.2f}.",
        "",
        f"1. Placement applied as planned: yes. Every plan's table is the one in force after its transfer. "
        f"First plan: {p0.get('window_before', float('nan')):.2f} -> {p0.get('window_after', float('nan')):.3f} on "
        f"its window (what the planner benchmark measures).",
        f"2. Drift between plans: the window covers {meta['diag_interval']} steps x "
        f"{issue['mean_step_s'] * 1e3:.0f} ms = {meta['diag_interval'] * issue['mean_step_s']:.0f} s against a "
        f"120 s drift time. The same first plan is {p0.get('popularity_after', float('nan')):.2f} on the popularity "
        f"in force when it is made and {p0.get('popularity_at_apply', float('nan')):.2f} when it takes effect. "
        f"Without drift the plan holds: expected {nodrift['moe_imbalance_expected']:.2f} over the run "
        f"({nodrift['plans'][0]['popularity_after']:.3f} right after the first plan), realised "
        f"{nodrift['moe_imbalance_realised']:.2f}.",
        f"3. Per-step sampling noise: at {issue['mean_tokens_per_step']:.0f} tokens per step an expert gets "
        f"about {issue['mean_tokens_per_step'] * 8 / 256:.0f} tokens, so even the drift-free, perfectly planned "
        f"run realises {nodrift['moe_imbalance_realised']:.2f}. With every slot filled (concurrency 2048, "
        f"{full['mean_tokens_per_step']:.0f} tokens per step) realised and expected agree on busy steps; the "
        f"run mean ({full['moe_imbalance_realised']:.2f}) is inflated by the drain at the end, which the study "
        f"excludes (steady decode steps only).",
        f"4. Why the decode step did not move: at 2 requests per rank the token-proportional MoE and "
        f"all-to-all time is a few ms of a {issue['mean_decode_only_step_ms']:.0f} ms step; the study therefore "
        f"fills every slot.",
        "",
        "## All runs",
        "",
        "imb = MoE max/mean on steady decode steps (realised / under the popularity); step = steady decode "
        "step; moves = slots per plan over 58 layers; async = ms added per moved layer (mean / max); "
        "stall = worst stop-the-world transfer; worst = worst step carrying a transfer (a step that also "
        "prefills takes about 1 s by itself at these prompt lengths, so for async read the async column).",
        "",
        "| EP | policy | red./rank | mode | interval | imb | step ms | TPOT ms | out tok/s | plans | moves | "
        "async ms | stall ms | worst ms |",
        "|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ep']} | {r['policy']} | {r['redundant_per_rank']} | {r['mode']} | {_fmt(r['interval'], '{}')} | "
            f"{r['moe_imbalance']:.2f} / {r['moe_imbalance_expected']:.2f} | {r['steady_decode_step_ms']:.1f} | "
            f"{r['mean_tpot_ms']:.1f} | {r['output_tok_s']:.0f} | {r['plans']} | {r['moves_per_plan']:.0f} | "
            f"{r['async_layer_ms_mean']:.2f} / {r['async_layer_ms_max']:.2f} | {r['sync_stall_ms_max']:.0f} | "
            f"{r['worst_transfer_step_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per EP: best EPLB run (async) vs none; EP 64's decode gain and async cost; worst stall."""
    text, per_ep = [], {}
    for ep in sorted({r["ep"] for r in rows}):
        none = next(r for r in rows if r["ep"] == ep and r["policy"] == "none")
        oracle = next(r for r in rows if r["ep"] == ep and r["policy"] == "oracle")
        eplb = [r for r in rows if r["ep"] == ep and r["policy"] in POLICIES and r["mode"] == "async"]
        best = max(eplb, key=lambda r: r["output_tok_s"])
        sync = [r for r in rows if r["ep"] == ep and r["mode"] == "sync"]
        per_ep[ep] = {
            "none_tok_s": none["output_tok_s"],
            "best": {k: best[k] for k in ("policy", "redundant_per_rank", "interval")},
            "best_tok_s": best["output_tok_s"],
            "throughput_gain": round(best["output_tok_s"] / none["output_tok_s"] - 1, 4),
            "decode_gain_ms": round(none["steady_decode_step_ms"] - best["steady_decode_step_ms"], 2),
            "oracle_decode_gain_ms": round(
                none["steady_decode_step_ms"] - oracle["steady_decode_step_ms"], 2
            ),
            "imbalance": [none["moe_imbalance"], best["moe_imbalance"], oracle["moe_imbalance"]],
            "async_layer_ms_mean": best["async_layer_ms_mean"],
            "async_layer_ms_max": best["async_layer_ms_max"],
            "sync_stall_ms_max": max((r["sync_stall_ms_max"] for r in sync), default=0.0),
            "sync_stall_ms_min": min((r["sync_stall_ms_max"] for r in sync if r["plans"]), default=0.0),
        }
        h = per_ep[ep]
        text.append(
            f"EP {ep}: best async EPLB ({best['policy']}, {best['redundant_per_rank']} redundant/rank, interval "
            f"{best['interval']}) {h['best_tok_s']:.0f} vs {h['none_tok_s']:.0f} output tok/s without EPLB "
            f"({100 * h['throughput_gain']:+.1f} %); steady decode step {h['decode_gain_ms']:+.2f} ms "
            f"(no-skew bound {h['oracle_decode_gain_ms']:+.2f} ms); max/mean {h['imbalance'][0]:.2f} -> "
            f"{h['imbalance'][1]:.2f} (no skew {h['imbalance'][2]:.2f}); async cost per moved layer "
            f"{h['async_layer_ms_mean']:.2f} ms (max {h['async_layer_ms_max']:.2f}); stop-the-world stalls "
            f"{h['sync_stall_ms_min']:.0f}-{h['sync_stall_ms_max']:.0f} ms"
        )
    return {"per_ep": per_ep, "text": text}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-len", type=int, default=1000)
    ap.add_argument("--layer-correlation", type=float, default=0.3)
    ap.add_argument("--depth-skew", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="EP 8 and 16, one interval (a smoke run)")
    args = ap.parse_args(argv)
    from cluster.sim.config import TransferConfig
    from cluster.sim.transfer import expert_bytes

    t0 = time.perf_counter()
    eps = [8, 16] if args.quick else EP_SIZES
    intervals = INTERVALS[:1] if args.quick else INTERVALS
    rows = run_grid(
        eps,
        intervals,
        output_len=args.output_len,
        layer_correlation=args.layer_correlation,
        depth_skew=args.depth_skew,
        seed=args.seed,
        progress=True,
    )
    diag = diagnose(args.seed)
    t = TransferConfig()
    base = load_config(CONFIG)
    doc = {
        "meta": {
            "seed": args.seed,
            "output_len": args.output_len,
            "layer_correlation": args.layer_correlation,
            "depth_skew": args.depth_skew,
            "sim_layers": base.experts.sim_layers,
            "expert_mb": expert_bytes(t) / 1e6,
            "p2p_op_latency_ms": t.p2p_op_latency_s * 1e3,
            "transfer": dataclasses.asdict(t),
            "diag_interval": base.eplb.interval_steps,
            "runs": len(rows) + len(diag),
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu": platform.machine(),
        },
        "headline": headline(rows),
        "diagnosis": diag,
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "sim_eplb_scaling_quick" if args.quick else "sim_eplb_scaling"
    (args.out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out_dir / f"{name}.md").write_text(markdown(doc))
    print("\n".join(doc["headline"]["text"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
