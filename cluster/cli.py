"""The `dpserve` command line.

Each subcommand lives in the module that owns its concern and exposes two functions:
`add_arguments(parser)` and `run(args) -> int`. This file only wires them together, importing each
lazily so that `dpserve --help` stays fast and a broken optional piece cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their subcommand is used.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": (
        "cluster.serve_cmd",
        "start the local default: tiny MoE model, 2 DP ranks, OpenAI API on 127.0.0.1:8000",
    ),
    "shutdown": (
        "cluster.shutdown_cmd",
        "drain requests in flight (new ones get 503), then shut Serve down (use instead of `serve shutdown`)",
    ),
    "status": ("cluster.status_cmd", "show ranks, gate state and EPLB state of the running cluster"),
    "config": (
        "cluster.config_cmd",
        "validate a Serve config (`dpserve config check FILE`) and print its effective settings",
    ),
    "make-model": ("cluster.model_cmd", "build the tiny MoE checkpoint (random weights, local tokenizer)"),
    "bench": ("cluster.bench_cmd", "run the serving benchmark against an OpenAI-compatible endpoint"),
    "eplb": ("eplb.cli", "expert-parallel load balancing tools (`dpserve eplb plan ...`)"),
    "sim": ("cluster.sim.cli", "simulate a DP+EP cluster at DeepSeek scale with the real policies"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpserve",
        description=(
            "Ray-native data-parallel serving of Mixture-of-Experts models on vLLM.\n"
            "Start here: `dpserve serve` runs the local default; `dpserve <command> --help` explains each command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            # A subcommand whose module is not there yet must not break the others.
            p.set_defaults(_missing=str(exc))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"dpserve {args.command}: not available ({args._missing})", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
