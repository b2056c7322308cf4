"""dpserve versus vLLM's own OpenAI server, same engine settings, DP=2, same workload, one run.

    .venv/bin/python benchmarks/serving.py [--rounds 2] [--variants default,proxy ...] [--num-prompts 64 ...]

Starts each server in turn on loopback (never both at once: they would share the same 2 cores),
runs the workload, stops it; with --rounds > 1 the order alternates and medians are reported.
`--variants` runs dpserve several ways in the same rounds (Ray Serve options, app arguments; see
VARIANTS), each in its own process so Serve reads its environment at import as `serve run` would.
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
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import proc_cpu  # noqa: E402
from cluster.bench import format_summary, run_workload  # noqa: E402
from cluster.bench_cmd import add_workload_arguments, workload_from_args  # noqa: E402
from deployments.config import UNIPROC_EXECUTOR, ServingSection  # noqa: E402
from deployments.rank import free_port  # noqa: E402
from deployments.serve_env import SERVE_ENV  # noqa: E402
from npu_runtime.platform import apply_vllm_env  # noqa: E402
from npu_runtime.tiny_model import build_tiny_moe  # noqa: E402

MODEL = "dpserve-tiny-moe"

# dpserve run variants: Ray Serve environment (set before Ray starts, as for `serve run`) and app
# arguments on top of the defaults. "default" is what `dpserve serve` / `make serve` run with
# (deployments/serve_env.py: direct ingress).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {"env": dict(SERVE_ENV), "app": {}},
    # Serve's HTTP proxy in front of the ingress replica (no Serve throughput options).
    "proxy": {"env": {}, "app": {}},
    # The ingress replica serves HTTP itself (no proxy hop per streamed chunk).
    "direct": {"env": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                       "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}, "app": {}},
    # User code and router on the replica's main event loop (no thread hop per message).
    "same_loop": {"env": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                          "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}, "app": {}},
    # The default plus Serve's router on the replica's main loop too.
    "direct_same_loop": {"env": dict(SERVE_ENV) | {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                                   "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}, "app": {}},
    # The ingress's code on an event loop in its own thread (Serve's default): every streamed event
    # crosses from that thread to the HTTP server's loop.
    "separate_thread": {"env": dict(SERVE_ENV) | {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}, "app": {}},
    # Rank output batches reach the ingress as Ray streaming calls instead of ZMQ messages.
    "ray_stream": {"env": dict(SERVE_ENV), "app": {"serving": {"output_transport": "ray"}}},
    # Ray's daemons on slower housekeeping timers (resource reports, GC checks, memory monitor, task
    # events, log-file scans): less background CPU on the engines' cores.
    "lean_daemons": {"env": dict(SERVE_ENV) | {
        "RAY_raylet_report_resources_period_milliseconds": "1000", "RAY_raylet_check_gc_period_milliseconds": "1000",
        "RAY_memory_monitor_refresh_ms": "1000", "RAY_task_events_report_interval_ms": "5000",
        "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "5"}, "app": {}},
    # Engine cores at nice 0 (level with Ray's daemons, ahead of its workers at 15) or -5; or keeping
    # the 15 they inherit (dpserve's default since 2026-11-30 15:00; `default` in serving.md's
    # 14:02 run had engine_nice 0).
    "engine_nice0": {"env": dict(SERVE_ENV), "app": {"engine": {"engine_nice": 0}}},
    "engine_inherit": {"env": dict(SERVE_ENV), "app": {"engine": {"engine_nice": None}}},
    "engine_nice_m5": {"env": dict(SERVE_ENV), "app": {"engine": {"engine_nice": -5}}},
    # Direct ingress, streamed chunks at most every 100 ms (fewer messages per token under load).
    "direct_chunks_100ms": {"env": dict(SERVE_ENV), "app": {"serving": {"stream_interval_ms": 100.0}}},
    # Streamed chunks at most every 50 ms (the default before per-token streaming).
    "chunks_50ms": {"env": dict(SERVE_ENV), "app": {"serving": {"stream_interval_ms": 50.0}}},
    # vLLM's own engine metrics recorded in every rank and exported through Ray (engine_metrics: true).
    "engine_metrics": {"env": dict(SERVE_ENV), "app": {"engine": {"engine_metrics": True}}},
    # Serve's controller loop at Serve's default 0.1 s instead of dpserve's 0.5 s (SERVE_ENV; the
    # controller runs on the same cores as the engines).
    "ctl_100ms": {"env": dict(SERVE_ENV) | {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}, "app": {}},
    # Each rank's model in a worker process that its engine core busy-polls (what vLLM's CPU platform
    # does with "uni"; dpserve's default runs it in the engine-core process, as on a GPU with TP=1).
    "mp_executor": {"env": dict(SERVE_ENV),
                    "app": {"engine": {"engine_kwargs": {"distributed_executor_backend": "mp"}}}},
    # Serve's bundle: direct ingress, same loop, gRPC handles, no stderr logs, frozen GC.
    "throughput": {"env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}, "app": {}},
}  # fmt: skip


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


def dpserve_app_args(args, model_dir: str, variant_app: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The app's config (deployments.config.DPServeConfig): the benchmark's engine settings, each
    section updated by the variant's."""
    engine = {
        "model": model_dir,
        "served_model_name": MODEL,
        "data_parallel_size": 2,
        **dpserve_settings(args),
    }
    app: dict[str, Any] = {"engine": engine}
    for section, values in variant_app.items():
        app[section] = app.get(section, {}) | values
    return app


def serve_url(proxy_port: int, app_name: str = "dpserve", timeout_s: float = 120) -> str:
    """Where clients reach the app: the ingress replica's own port with direct ingress
    (RAY_SERVE_ENABLE_DIRECT_INGRESS=1), else Serve's HTTP proxy."""
    from ray.serve._private.constants import RAY_SERVE_ENABLE_DIRECT_INGRESS

    if not RAY_SERVE_ENABLE_DIRECT_INGRESS:
        return f"http://127.0.0.1:{proxy_port}"
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for group in ray.get(controller.get_target_groups.remote(app_name)):
            ports = [t.port for t in group.targets if t.port != proxy_port]
            if str(group.protocol).upper().endswith("HTTP") and ports:
                return f"http://127.0.0.1:{ports[0]}"
        time.sleep(1)
    raise TimeoutError("no direct-ingress port for the app")


# Roles profiled with py-spy when DPSERVE_PYSPY_DIR is set (the serving processes, not the engines).
PROFILED_ROLES = ("dpserve rank actor (vLLM frontend)", "serve replica (dpserve ingress)", "vllm API server",
                  "vllm engine core")  # fmt: skip


def start_profilers(procs: dict[int, tuple[str, float]]) -> list[subprocess.Popen]:
    """py-spy (raw collapsed stacks, CPU samples only) on each serving process for the workload's
    expected length, when DPSERVE_PYSPY_DIR names a folder; where the frontend CPU goes."""
    out_dir = os.environ.get("DPSERVE_PYSPY_DIR")
    if not out_dir:
        return []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    pyspy = os.environ.get("PYSPY", str(Path(sys.executable).parent / "py-spy"))
    spies = []
    for pid, (cmd, _) in procs.items():
        role = proc_cpu.role_of(cmd)
        if role not in PROFILED_ROLES:
            continue
        name = (
            f"{os.environ.get('DPSERVE_PYSPY_TAG', 'run')}-{role.split(' (')[0].replace(' ', '_')}-{pid}.txt"
        )
        spies.append(subprocess.Popen(
            [pyspy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--threads",
             "--duration", os.environ.get("DPSERVE_PYSPY_S", "5"), "--format", "raw", "--output", str(Path(out_dir) / name)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    return spies


def measured_workload(url: str, workload, warmup: int = 0, idle_s: float = 0.0) -> dict:
    """The workload's summary plus the CPU seconds each process role used while it ran, after
    `warmup` requests of the same shape (other prompts: no prefix-cache hits) that are not measured."""
    if warmup:
        asyncio.run(run_workload(url, MODEL, replace(workload, num_prompts=warmup, seed=workload.seed + 10_000),
                                 progress=False))  # fmt: skip
    idle: dict[str, float] = {}
    if idle_s > 0:  # the server's own background CPU with nothing to serve
        before = proc_cpu.snapshot()
        time.sleep(idle_s)
        idle = proc_cpu.by_role(before, proc_cpu.snapshot(), client_pid=os.getpid())
    before = proc_cpu.snapshot()
    spies = start_profilers(before)
    summary = asyncio.run(run_workload(url, MODEL, workload))
    for spy in spies:
        spy.wait()
    summary["cpu_s_by_role"] = proc_cpu.by_role(before, proc_cpu.snapshot(), client_pid=os.getpid())
    summary["idle_cpu_s_by_role"] = idle
    summary["idle_s"] = idle_s
    return summary


def run_dpserve_child(args, model_dir: str, workload, variant: str) -> dict:
    """One dpserve run in this process (started by run_dpserve with the variant's environment)."""
    import ray
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(dpserve_app_args(args, model_dir, VARIANTS[variant]["app"])),
                  name="dpserve", route_prefix="/")  # fmt: skip
        url = serve_url(port)
        wait_ready(url)
        startup = time.perf_counter() - t0
        summary = measured_workload(url, workload, args.warmup, args.idle_s)
        summary["startup_s"] = startup
        summary["url"] = url
        return summary
    finally:
        serve.shutdown()
        ray.shutdown()


def run_dpserve(args, model_dir: str, workload, variant: str = "default") -> dict:
    env = os.environ.copy() | VARIANTS[variant]["env"]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child-variant", variant, "--child-out", out.name,
               *sys.argv[1:]]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        summary = json.loads(Path(out.name).read_text())
    summary["variant"] = {"name": variant} | VARIANTS[variant]
    return summary


# vLLM's own server, launched two ways. `same_executor`: the engine settings dpserve's ranks run with
# on CPU (the model in each engine-core process, one OpenMP team of cores // DP threads per engine);
# `default`: vLLM's CPU default (the platform turns "uni" into a worker process per engine, which the
# engine core busy-polls, with OpenMP threads set by vLLM's CPU process manager).
VLLM_VARIANTS: dict[str, dict[str, Any]] = {
    "same_executor": {"args": ["--distributed-executor-backend", UNIPROC_EXECUTOR],
                      "env": {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}},
    "default": {"args": [], "env": {}},
}  # fmt: skip


def run_vllm(args, model_dir: str, workload, variant: str = "default") -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
           "--data-parallel-size", "2", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--disable-log-stats"]  # fmt: skip
    if args.expert_parallel:
        cmd.append("--enable-expert-parallel")
    cmd += VLLM_VARIANTS[variant]["args"]
    log = open(Path(args.out_dir) / f"serving_vllm_{variant}_server.log", "w")
    t0 = time.perf_counter()
    env = os.environ.copy() | VLLM_VARIANTS[variant]["env"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        startup = time.perf_counter() - t0
        summary = measured_workload(url, workload, args.warmup, args.idle_s)
        summary["startup_s"] = startup
        return summary
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def round_ratios(runs: list[dict], reference: list[dict], key: str, sub: str | None = None) -> list[float]:
    """Per round, a server's figure over the reference's in the same round."""

    def value(run: dict) -> float:
        return run[key][sub] if sub else run[key]

    return [value(a) / value(b) for a, b in zip(runs, reference, strict=True)]


# The code a serving run executes (a change elsewhere in a shared checkout does not mark the result).
SERVING_CODE = ("deployments", "scheduler", "eplb", "npu_runtime", "cluster/bench.py", "benchmarks/serving.py",
                "benchmarks/proc_cpu.py", "ray_configs/serve-local.yaml")  # fmt: skip


def git_commit() -> str:
    """The checkout's commit, with `+changes` when the code a serving run uses differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *SERVING_CODE], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def cpu_table(names: list[str], runs: dict[str, list[dict]], key: str = "cpu_s_by_role") -> str:
    """CPU seconds per process role (median over rounds), per server: while the workload ran
    (`cpu_s_by_role`), or while the server sat idle before it (`idle_cpu_s_by_role`)."""
    roles = sorted({role for n in names for r in runs[n] for role in r.get(key, {})})
    if not roles:
        return ""

    def cell(name: str, role: str) -> float:
        return statistics.median(r.get(key, {}).get(role, 0.0) for r in runs[name])

    def wall(name: str) -> float:
        return statistics.median(r["duration_s" if key == "cpu_s_by_role" else "idle_s"] for r in runs[name])

    rows = ["| process role | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for role in sorted(roles, key=lambda ro: -max(cell(n, ro) for n in names)):
        rows.append(f"| {role} | " + " | ".join(f"{cell(n, role):.2f}" for n in names) + " |")
    rows.append("| **all** | " + " | ".join(
        f"**{sum(cell(n, ro) for ro in roles):.2f}**" for n in names) + " |")  # fmt: skip
    if key == "cpu_s_by_role":
        rows.append("| workload wall s | " + " | ".join(f"{wall(n):.1f}" for n in names) + " |")
        title = "Where the CPU went while the workload ran"
    else:
        rows.append("| idle wall s | " + " | ".join(f"{wall(n):.0f}" for n in names) + " |")
        title = "Background CPU with nothing to serve (after the warm-up, before the workload)"
    return (
        f"\n## {title} (CPU seconds, median over rounds)\n\n"
        "Two cores give 2 CPU-seconds per wall second; `other` is every process outside these "
        "roles on the machine.\n\n" + "\n".join(rows) + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds; each runs every server once, the order alternating between rounds")  # fmt: skip
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated dpserve variants to run each round ({', '.join(VARIANTS)}); "
                             "the first is the one the ratio is given for")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=32,
                        help="requests sent to each server before the measured workload (not measured)")  # fmt: skip
    parser.add_argument("--vllm-variants", default="same_executor,default",
                        help=f"vLLM server launches ({', '.join(VLLM_VARIANTS)}); the first is the reference "
                             "the headline ratio is given against")  # fmt: skip
    parser.add_argument(
        "--idle-s",
        type=float,
        default=10.0,
        help="seconds each server sits idle after its warm-up, measuring its own background CPU per role",
    )
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM's server (variants only)")
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
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    # 128 prompts: each run long enough (~25 s on the 2-core box) that start-up noise is small.
    parser.set_defaults(num_prompts=128)
    args = parser.parse_args()
    apply_vllm_env()
    model_dir = str(build_tiny_moe())
    workload = workload_from_args(args)
    if args.child_variant:
        summary = run_dpserve_child(args, model_dir, workload, args.child_variant)
        Path(args.child_out).write_text(json.dumps(summary))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    vllm_variants = [] if args.no_vllm else [v.strip() for v in args.vllm_variants.split(",") if v.strip()]
    unknown = sorted(set(vllm_variants) - set(VLLM_VARIANTS))
    if unknown:
        parser.error(f"unknown vLLM variant(s) {unknown}; known: {', '.join(VLLM_VARIANTS)}")
    vllm_names = [f"vllm:{v}" for v in vllm_variants]
    names = [f"dpserve:{v}" for v in variants] + vllm_names
    runs: dict[str, list[dict]] = {name: [] for name in names}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for i in range(args.rounds):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            print(f"round {i + 1}: {name} ...", flush=True)
            if name in vllm_names:
                summary = run_vllm(args, model_dir, workload, name.split(":", 1)[1])
            else:
                summary = run_dpserve(args, model_dir, workload, name.split(":", 1)[1])
            print(format_summary(name, summary), flush=True)
            runs[name].append(summary)

    def med(name: str, key: str, sub: str | None = None) -> float:
        vals = [r[key][sub] if sub else r[key] for r in runs[name]]
        return statistics.median(vals)

    main_name = names[0]
    tput = {n: med(n, "output_token_throughput") for n in names}
    # Ratios of every server to each vLLM launch, from medians and per round (the box is noisy;
    # each round's runs are side by side).
    ratios = {ref: {n: tput[n] / tput[ref] for n in names} for ref in vllm_names}
    per_round = {ref: {n: round_ratios(runs[n], runs[ref], "output_token_throughput") for n in names}
                 for ref in vllm_names}  # fmt: skip
    ttft_per_round = {ref: {n: round_ratios(runs[n], runs[ref], "ttft_ms", "mean") for n in names}
                      for ref in vllm_names}  # fmt: skip
    reference = vllm_names[0] if vllm_names else None
    headline = None
    if reference:
        # The serving target is judged on the median of the per-round ratios (each round's runs are minutes
        # apart, so a round's ratio is less exposed to the box's drift than a ratio of medians).
        headline = {"reference": reference, "server": main_name,
                    "output_throughput_median_of_round_ratios": statistics.median(per_round[reference][main_name]),
                    "output_throughput_ratio_of_medians": ratios[reference][main_name],
                    "ttft_mean_median_of_round_ratios": statistics.median(ttft_per_round[reference][main_name]),
                    "ttft_mean_ratio_of_medians": med(main_name, "ttft_ms", "mean") / med(reference, "ttft_ms", "mean"),
                    "targets": {"output_throughput": ">= 1.0", "ttft_mean": "<= 1.10"}}  # fmt: skip
    result = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": git_commit(), "command": " ".join(["benchmarks/serving.py", *sys.argv[1:]]),
              "rounds": args.rounds, "warmup": args.warmup, "headline": headline,
              "workload": runs[main_name][0]["workload"], "engine": engine_settings(args) | {"dp": 2},
              "dpserve_cpu_binding": args.cpu_binding, "variants": {v: VARIANTS[v] for v in variants},
              "vllm_variants": {v: VLLM_VARIANTS[v] for v in vllm_variants}, "runs": runs,
              "output_throughput_ratios": ratios, "output_throughput_ratios_per_round": per_round,
              "ttft_mean_ratios_per_round": ttft_per_round,
              "reference": reference,
              "output_throughput_ratio_dpserve_over_vllm": ratios[reference][main_name] if reference else None}  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(result, indent=2))
    ratio_heads = "".join(f" ratio to {ref} |" for ref in vllm_names)
    rows = [f"| server | out tok/s |{ratio_heads} req/s | TTFT mean ms | TTFT p99 ms | TPOT mean ms | ITL p50 ms | ITL p99 ms | failed |",
            "|---|---|" + "---|" * len(vllm_names) + "---|---|---|---|---|---|---|"]  # fmt: skip
    for name in names:
        ratio_cells = "".join(f" {ratios[ref][name]:.3f} |" for ref in vllm_names)
        rows.append(
            f"| {name} | {tput[name]:.1f} |{ratio_cells} {med(name, 'request_throughput'):.2f} | "
            f"{med(name, 'ttft_ms', 'mean'):.0f} | {med(name, 'ttft_ms', 'p99'):.0f} | "
            f"{med(name, 'tpot_ms', 'mean'):.1f} | {med(name, 'itl_ms', 'p50'):.1f} | {med(name, 'itl_ms', 'p99'):.1f} | "
            f"{sum(r['failed'] for r in runs[name])} |"
        )
    w = workload
    interval = ServingSection().stream_interval_ms
    granularity = (f"streamed chunks >= {interval:g} ms (`serving.stream_interval_ms`)" if interval
                   else "every token streamed on its own (`serving.stream_interval_ms: 0`, the default)")  # fmt: skip
    md = (f"# Serving: dpserve vs vLLM's own OpenAI server\n\n"
          f"Tiny MoE model, CPU (2 cores), DP=2{' + EP' if args.expert_parallel else ''}, float32, eager; "
          f"{w.num_prompts} prompts x {w.input_len} in / {w.output_len} out, concurrency {w.max_concurrency}, "
          f"rate {w.request_rate}; dpserve CPU binding `{args.cpu_binding}`, {granularity}; vLLM streams every token; "
          f"{args.warmup} warm-up requests per server (not measured), medians over {args.rounds} round(s), "
          f"servers run one at a time, order alternating between rounds.\n\n"
          + "\n".join(rows) + "\n")  # fmt: skip
    if reference:
        md += f"\nRounds {started} to {result['finished']}: `{result['command']}` at {result['commit']}.\n"
        for n in (x for x in names if x not in vllm_names):
            rounds = " / ".join(f"{x:.3f}" for x in per_round[reference][n])
            ttft_rounds = " / ".join(f"{x:.3f}" for x in ttft_per_round[reference][n])
            target = " (target >= 1.0)" if n == main_name else ""
            md += (f"\n- Output throughput {n} / {reference}: median of per-round ratios "
                   f"**{statistics.median(per_round[reference][n]):.3f}**{target}, ratio of medians "
                   f"{ratios[reference][n]:.3f}; per round {rounds}.\n")  # fmt: skip
            target = " (target <= 1.10)" if n == main_name else ""
            md += (f"- Mean TTFT {n} / {reference}: median of per-round ratios "
                   f"**{statistics.median(ttft_per_round[reference][n]):.3f}**{target}, ratio of medians "
                   f"{med(n, 'ttft_ms', 'mean') / med(reference, 'ttft_ms', 'mean'):.3f}; per round {ttft_rounds}.\n")  # fmt: skip
        md += "".join(f"\n- `{ref}`: {' '.join(VLLM_VARIANTS[ref.split(':', 1)[1]]['args']) or '(no extra arguments)'}"
                      f"{''.join(f' {k}={v}' for k, v in VLLM_VARIANTS[ref.split(':', 1)[1]]['env'].items())}"
                      for ref in vllm_names) + "\n"  # fmt: skip
    md += cpu_table(names, runs)
    md += cpu_table(names, runs, "idle_cpu_s_by_role")
    (out / "serving.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
