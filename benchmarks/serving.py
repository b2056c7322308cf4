"""dpserve versus vLLM's own OpenAI server, same engine settings, DP=2, same workload, one run.

    .venv/bin/python benchmarks/serving.py [--rounds 2] [--num-prompts 64 ...]

Starts each server in turn on loopback (never both at once: they would share the same 2 cores),
runs the workload, stops it; with --rounds > 1 the order alternates and medians are reported.
Writes benchmarks/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.bench import format_summary, run_workload  # noqa: E402
from cluster.bench_cmd import add_workload_arguments, workload_from_args  # noqa: E402
from deployments.app import AppConfig  # noqa: E402
from deployments.rank import free_port  # noqa: E402
from npu_runtime.platform import apply_vllm_env  # noqa: E402
from npu_runtime.tiny_model import build_tiny_moe  # noqa: E402

MODEL = "dpserve-tiny-moe"


def wait_ready(url: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def engine_settings(args) -> dict:
    return {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
            "enable_expert_parallel": args.expert_parallel}  # fmt: skip


def dpserve_settings(args) -> dict:
    return engine_settings(args) | {"cpu_binding": args.cpu_binding}


def run_dpserve(args, model_dir: str, workload) -> dict:
    import ray
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app({"model": model_dir, "served_model_name": MODEL, "data_parallel_size": 2,
                             **dpserve_settings(args)}), name="dpserve", route_prefix="/")  # fmt: skip
        startup = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        summary = asyncio.run(run_workload(url, MODEL, workload))
        summary["startup_s"] = startup
        return summary
    finally:
        serve.shutdown()
        ray.shutdown()


def run_vllm(args, model_dir: str, workload) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
           "--data-parallel-size", "2", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--disable-log-stats"]  # fmt: skip
    if args.expert_parallel:
        cmd.append("--enable-expert-parallel")
    log = open(ROOT / "benchmarks" / "results" / "serving_vllm_server.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        startup = time.perf_counter() - t0
        summary = asyncio.run(run_workload(url, MODEL, workload))
        summary["startup_s"] = startup
        return summary
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.add_argument("--rounds", type=int, default=1, help="alternate dpserve/vLLM this many times")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--expert-parallel", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--cpu-binding",
        choices=["shared", "split"],
        default="shared",
        help="dpserve's CPU core binding (vLLM's own DP server shares all cores)",
    )
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    apply_vllm_env()
    model_dir = str(build_tiny_moe())
    workload = workload_from_args(args)
    runs: dict[str, list[dict]] = {"dpserve": [], "vllm": []}
    for i in range(args.rounds):
        order = ["dpserve", "vllm"] if i % 2 == 0 else ["vllm", "dpserve"]
        for name in order:
            print(f"round {i + 1}: {name} ...", flush=True)
            summary = (run_dpserve if name == "dpserve" else run_vllm)(args, model_dir, workload)
            print(format_summary(name, summary), flush=True)
            runs[name].append(summary)

    def med(name: str, key: str, sub: str | None = None) -> float:
        vals = [r[key][sub] if sub else r[key] for r in runs[name]]
        return statistics.median(vals)

    ratio = med("dpserve", "output_token_throughput") / med("vllm", "output_token_throughput")
    result = {"workload": runs["dpserve"][0]["workload"], "engine": engine_settings(args) | {"dp": 2},
              "dpserve_cpu_binding": args.cpu_binding,
              "runs": runs, "output_throughput_ratio_dpserve_over_vllm": ratio}  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(result, indent=2))
    rows = ["| server | out tok/s | req/s | TTFT mean ms | TTFT p99 ms | TPOT mean ms | ITL p50 ms | ITL p99 ms | failed |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("dpserve", "vllm"):
        rows.append(
            f"| {name} | {med(name, 'output_token_throughput'):.1f} | {med(name, 'request_throughput'):.2f} | "
            f"{med(name, 'ttft_ms', 'mean'):.0f} | {med(name, 'ttft_ms', 'p99'):.0f} | "
            f"{med(name, 'tpot_ms', 'mean'):.1f} | {med(name, 'itl_ms', 'p50'):.1f} | {med(name, 'itl_ms', 'p99'):.1f} | "
            f"{sum(r['failed'] for r in runs[name])} |"
        )
    w = workload
    md = (f"# Serving: dpserve vs vLLM's own OpenAI server\n\n"
          f"Tiny MoE model, CPU (2 cores), DP=2{' + EP' if args.expert_parallel else ''}, float32, eager; "
          f"{w.num_prompts} prompts x {w.input_len} in / {w.output_len} out, concurrency {w.max_concurrency}, "
          f"rate {w.request_rate}; dpserve CPU binding `{args.cpu_binding}`, streamed chunks >= "
          f"{AppConfig.stream_interval_ms:g} ms (`stream_interval_ms`); vLLM streams every token; "
          f"medians over {args.rounds} round(s), "
          f"servers run one at a time, alternating.\n\n"
          + "\n".join(rows) + f"\n\nOutput-throughput ratio dpserve / vLLM: **{ratio:.3f}** (target >= 0.95).\n")  # fmt: skip
    (out / "serving.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
