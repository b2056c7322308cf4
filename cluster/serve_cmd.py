"""`dpserve serve`: run a Serve config (the local default unless told otherwise) with `serve run`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "ray_configs" / "serve-local.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="Serve config YAML (default: ray_configs/serve-local.yaml: tiny model, 2 DP ranks, "
                             "127.0.0.1:8000)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from npu_runtime.platform import apply_vllm_env

    config = Path(args.config)
    if not config.is_file():
        print(f"dpserve serve: no such config file: {config}", file=sys.stderr)
        return 2
    apply_vllm_env()  # inherited by the local Ray that `serve run` starts, hence by every rank
    serve_bin = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    if serve_bin is None:
        print(
            "dpserve serve: Ray Serve's `serve` command is not installed (pip install 'ray[serve]')",
            file=sys.stderr,
        )
        return 2
    print(
        f"dpserve: serve run {config} (first start builds the tiny model and takes about a minute)",
        flush=True,
    )
    os.execv(serve_bin, [serve_bin, "run", str(config)])
    return 0  # not reached
