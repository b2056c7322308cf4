"""`dpserve status`: the live cluster's ranks as a table, from the ingress's status route."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the dpserve HTTP address")
    parser.add_argument("--json", action="store_true", help="print the raw status JSON")


def format_status(status: dict) -> str:
    lines = [
        f"model {status['model']}  DP {status['data_parallel_size']}  "
        f"EP {'on' if status.get('expert_parallel') else 'off'}  live ranks {status['live_ranks']}",
        f"{'rank':>4} {'live':>5} {'running':>8} {'waiting':>8} {'dispatched':>10} {'kv use':>7} {'steps':>8}",
    ]
    for r in status["ranks"]:
        lines.append(
            f"{r.get('rank', '?'):>4} {('yes' if r.get('live') else 'NO'):>5} {r.get('running', 0):>8} "
            f"{r.get('waiting', 0):>8} {r.get('dispatched', 0):>10} {r.get('kv_cache_usage', 0.0):>7.1%} "
            f"{r.get('step', 0):>8}"
        )
    patches = sorted({r["vllm_patches"] for r in status["ranks"] if r.get("vllm_patches")})
    if len(patches) == 1:
        lines.append(f"vllm patches: {patches[0]}")
    for r in status["ranks"] if len(patches) > 1 else []:  # ranks on different vLLM installs
        lines.append(f"vllm patches: rank {r.get('rank', '?')}: {r.get('vllm_patches') or 'unknown'}")
    if status.get("recovering"):
        lines.append(f"DP group is being re-formed (generation {status.get('group_generation')}); "
                     f"last error: {status.get('recovery_error') or 'none yet'}")  # fmt: skip
    lines.append(liveness_line(status))
    balance = status.get("balance")
    if balance:
        lines.append(
            f"gate: policy {balance.get('policy')} {balance.get('params') or ''}  closed "
            f"{balance.get('closed_steps', 0)}/{balance.get('decided_steps', 0)} steps  "
            f"live {balance.get('live_ranks')}"
            if "error" not in balance
            else f"gate: {balance['error']}"
        )
    else:
        lines.append("gate: off")
    eplb = status.get("eplb")
    if eplb:
        keep = {
            k: v
            for k, v in eplb.items()
            if not isinstance(v, (dict, list)) or k in ("last_plan", "last_error")
        }
        lines.append("eplb: " + json.dumps(keep, default=str)[:600])
    else:
        lines.append("eplb: off")
    return "\n".join(lines)


def liveness_line(status: dict) -> str:
    """Re-formations, hung ranks, timed-out requests and what the internal sockets dropped or lost
    (anything but zeros on the sockets means something other than dpserve writes to them)."""
    channel = status.get("output_channel") or {}
    ranks = (channel.get("ranks") or {}).values()
    dropped = sum(sum((r.get("dropped") or {}).values()) for r in ranks)
    lost = sum(r.get("lost", 0) for r in ranks)
    gate = status.get("balance") or {}
    gate_dropped = sum((gate.get("zmq_dropped") or {}).values())
    return (
        f"liveness: recoveries {status.get('recoveries', 0)}  hung ranks {status.get('hung_ranks_detected', 0)}  "
        f"timed-out requests {channel.get('timed_out_requests', 0)}  internal frames dropped: output {dropped}, "
        f"gate {gate_dropped}; output frames lost {lost}"
    )


def run(args: argparse.Namespace) -> int:
    try:
        request = urllib.request.Request(f"{args.url.rstrip('/')}/dpserve/status")
        if key := os.environ.get("DPSERVE_API_KEY"):  # the key the server requires, if any
            request.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=10) as resp:
            status = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        print(f"dpserve status: cannot reach {args.url} ({exc}); is `make serve` running?", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0
