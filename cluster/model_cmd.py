"""`dpserve make-model`: build the tiny MoE checkpoint."""

from __future__ import annotations

import argparse
import time

from npu_runtime.tiny_model import TinyMoESpec, build_tiny_moe, default_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help=f"output directory (default: {default_model_dir()})")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and tokenizer corpus")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory holds this model")


def run(args: argparse.Namespace) -> int:
    spec = TinyMoESpec(seed=args.seed)
    t0 = time.perf_counter()
    print(
        f"building tiny MoE model (seed {spec.seed}, {spec.num_experts} experts, top-{spec.num_experts_per_tok}) ..."
    )
    path = build_tiny_moe(
        args.out, spec, force=args.force, progress=lambda msg: print(f"  {msg} ...", flush=True)
    )
    print(f"model ready at {path} ({time.perf_counter() - t0:.1f} s)")
    return 0
