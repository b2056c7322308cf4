"""`dpserve serve`: run a Serve config (the local default unless told otherwise) with `serve run`.

`serve run` runs in this process, with one difference: SIGTERM and the first Ctrl-C shut down
gracefully. The dpserve applications are drained first (new API requests get 503 + Retry-After,
requests in flight finish, up to the config's `drain_timeout_s` or `--drain-timeout`), then
`serve run`'s own Ctrl-C path shuts Serve down. Plain `serve run` kills the HTTP proxies at once on
Ctrl-C (streams in flight are cut) and does nothing on SIGTERM. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "ray_configs" / "serve-local.yaml"
# Where the Ray that `dpserve serve` starts exports its Prometheus metrics: fixed, so a scraper (or
# `curl 127.0.0.1:8080/metrics`) finds them; the KubeRay manifest uses the same port.
DEFAULT_METRICS_PORT = 8080


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="Serve config YAML (default: ray_configs/serve-local.yaml: tiny model, 2 DP ranks, "
                             "127.0.0.1:8000)")  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=None,
                        help="on SIGTERM/Ctrl-C, let requests in flight finish for at most this many seconds "
                             "(default: each application's drain_timeout_s, 30 s)")  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help="when this command starts Ray: the port its Prometheus metrics (dpserve_*, "
                             f"Ray's, vLLM's) are exported on (default {DEFAULT_METRICS_PORT}; Ray picks a "
                             "random one otherwise)")  # fmt: skip


def install_graceful_signals(drain_timeout_s: float | None) -> None:
    """SIGTERM / first SIGINT: drain the dpserve applications, then raise KeyboardInterrupt in the
    main thread (where `serve run` waits), whose handler shuts Serve down. A second signal: at once."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        name = signal.Signals(signum).name
        print(f"dpserve: {name}: draining requests in flight before shutting down", flush=True)
        try:
            import ray

            if ray.is_initialized():
                from deployments.shutdown import drain_apps

                print(f"dpserve: drained: {drain_apps(None, drain_timeout_s)}", flush=True)
        except Exception as exc:  # never block the shutdown itself
            print(f"dpserve: drain failed ({type(exc).__name__}: {exc}); shutting down", flush=True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def port_is_free(port: int) -> bool:
    """Whether a TCP port can be bound on every interface (where Ray's metrics agent listens)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def run(args: argparse.Namespace) -> int:
    from deployments.serve_env import apply_serve_env, direct_ingress_url
    from npu_runtime.platform import apply_vllm_env

    config = Path(args.config)
    if not config.is_file():
        print(f"dpserve serve: no such config file: {config}", file=sys.stderr)
        return 2
    apply_vllm_env()  # inherited by the local Ray that `serve run` starts, hence by every rank
    # Ray Serve's options (direct ingress): read at import by Serve's controller and replicas, which
    # inherit them from the Ray started below; also before this process imports Serve.
    apply_serve_env()
    try:
        from ray.serve.scripts import cli as serve_cli
    except ImportError:
        print("dpserve serve: Ray Serve is not installed (pip install 'ray[serve]')", file=sys.stderr)
        return 2
    print(
        f"dpserve: serve run {config} (first start builds the tiny model and takes about a minute)",
        flush=True,
    )
    if (direct := direct_ingress_url()) is not None:
        print(
            f"dpserve: the ingress replica also serves {direct} itself (direct ingress, no proxy hop; "
            "when this command starts Ray)",
            flush=True,
        )
    import ray

    # Connect (or start a local Ray) the way `serve run` would, before installing the handlers:
    # ray.init installs its own SIGTERM handler (exit at once), which ours must replace.
    address = os.environ.get("RAY_ADDRESS")
    # The metrics port applies only to a Ray started here; a running cluster keeps its own.
    ports = {}
    if not address:
        if port_is_free(args.metrics_port):
            ports["_metrics_export_port"] = args.metrics_port
            print(f"dpserve: metrics (dpserve_*) at http://127.0.0.1:{args.metrics_port}/metrics "
                  "when this command starts Ray", flush=True)  # fmt: skip
        else:
            print(f"dpserve: port {args.metrics_port} is taken; Ray picks its metrics port (--metrics-port)",
                  flush=True)  # fmt: skip
    ray.init(address=address, namespace="serve", **ports)
    install_graceful_signals(args.drain_timeout)
    try:
        serve_cli.main(["run", str(config)], prog_name="serve")  # exits through SystemExit
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0
