"""Balance scheduling on the real 2-rank CPU cluster: plain vLLM vs each gate policy, one run.

Workload (the seed's shape, scaled to 2 CPU cores): fixed-length prompts (random token ids) and fixed
output length (ignore_eos), all requests submitted at once, spread round robin over the two DP ranks;
``max_num_seqs`` small so requests outnumber slots and the gate matters.

Two rank groups are started: one without balance (the ``vllm`` baseline: no scheduler subclass, no
coordinator), one with balance on, whose policy is switched at run time (``set_policy``) between
runs — ``off`` there measures the cost of the machinery with the gate always open.

Reported per configuration: output throughput, mean TTFT, mean TPOT, duration, lockstep steps, gate
closed steps, and the coordinator cost per step as a share of step time (time the engine core spends
in the gate client — submit + any wait — over wall time, mean of the ranks).

Run: .venv/bin/python benchmarks/balance.py [--requests 48 --input-len 96 --output-len 32]
Writes benchmarks/results/balance.json and balance.md. CPU numbers are for relative comparison only
(2 shared cores, several processes per rank; see DESIGN.md "Running it here").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results"
POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("off", {}),
    ("any_at_cap", {}),
    ("max_minus_one", {}),
    ("cadence", {"interval": 4}),
]
COORD = "bench_balance_coordinator"


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
    from deployments.engine_config import EngineSettings

    return EngineSettings(
        data_parallel_size=2,
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs,
        balance=balance,
    )


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


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
        for name, params in [(n, p) for n, p in POLICIES if n in wanted]:
            await coord.set_policy.remote(name, params)
            before = await coord.get_stats.remote()
            m = _mean([await _workload(actors, args, seed=r) for r in range(args.rounds)])
            await asyncio.sleep(0.5)  # let the last reports land
            after = await coord.get_stats.remote()
            steps = [after["ranks"][r]["client_calls"] - before["ranks"][r]["client_calls"] for r in (0, 1)]
            ms = [after["ranks"][r]["client_ms"] - before["ranks"][r]["client_ms"] for r in (0, 1)]
            late = [after["ranks"][r]["client_late"] - before["ranks"][r]["client_late"] for r in (0, 1)]
            mean_steps = sum(steps) / 2
            # client_calls counts reports (one per `horizon` lockstep steps); steps are per round.
            lock_steps = mean_steps * horizon
            m.update(
                steps=lock_steps / args.rounds,
                closed_steps=(after["closed_steps"] - before["closed_steps"]) / args.rounds,
                late_decisions=sum(late),
                step_ms=1e3 * m["duration_s"] * args.rounds / max(1, lock_steps),
                coord_ms_per_step=sum(ms) / 2 / max(1, lock_steps),
            )
            m["coord_share"] = m["coord_ms_per_step"] / m["step_ms"]
            out[name + suffix] = m
            print(name + suffix, m, flush=True)
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
    return "\n".join(lines) + "\n"


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
    args = p.parse_args()
    if args.table_only:
        saved = json.loads((OUT / "balance.json").read_text())
        (OUT / "balance.md").write_text(_table(saved["results"], argparse.Namespace(**saved["args"])))
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
    (OUT / f"{args.out}.md").write_text(_table(results, args))
    print(_table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
