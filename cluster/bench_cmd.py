"""`dpserve bench`: the serving benchmark against a running OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import asyncio
import json

from cluster.bench import Workload, format_summary, run_workload


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64, help="prompt length in tokens")
    parser.add_argument(
        "--output-len", type=int, default=64, help="generated tokens per request (EOS ignored)"
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=16, help="requests in flight at most (0: no cap)"
    )
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: burst)"
    )
    parser.add_argument("--seed", type=int, default=0)


def workload_from_args(args: argparse.Namespace) -> Workload:
    return Workload(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                    max_concurrency=args.max_concurrency or None, request_rate=args.request_rate,
                    seed=args.seed)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default="dpserve-tiny-moe", help="model name to request")
    parser.add_argument("--out", default=None, help="write the JSON summary here")
    add_workload_arguments(parser)


def run(args: argparse.Namespace) -> int:
    summary = asyncio.run(run_workload(args.url, args.model, workload_from_args(args)))
    print(format_summary(args.url, summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1
