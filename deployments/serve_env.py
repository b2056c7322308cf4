"""Ray Serve options dpserve runs with by default (`dpserve serve`, `make serve`, the benchmark).

Ray Serve reads these environment variables once, at import, in its controller, proxy and replica
processes, which inherit them from the process that starts Ray. So they must be in the environment
of `serve run` (which starts a local Ray) or of `ray start` on each node; `runtime_env.env_vars` in a
Serve config reaches only the replicas, not the controller that decides whether direct ingress is on.
Ray Serve 2.60 also takes them as `controller_options={"runtime_env": {"env_vars": ...}}` in
`serve.start` (or a top-level `controller_options:` block in a Serve config), applied when Serve
starts; the controller hands them on to the proxies and replicas it creates (the drain tests in
tests/deployments/test_side_faults_and_drain.py start Serve that way, with direct ingress on).

Measured with benchmarks/serving.py (see benchmarks/results/serving_serve_options.md): with direct ingress the
ingress replica serves HTTP itself, so each streamed chunk no longer crosses a Ray hop to Serve's
HTTP proxy. Serve's proxy keeps running on the configured `http_options.port` (8000 in the local
config) and still works; the ingress replica's own port is allocated from
`RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT` upwards (30000 for the first replica).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Serve's documented defaults are kept for anything not listed.
SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # Direct ingress otherwise holds a stopping ingress replica open for 30 s so an external load
    # balancer can deregister it; a local server has none (set it back on a cluster behind an LB).
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    # Serve's controller reconciles every 0.1 s by default, costing ~40 ms of CPU per second even
    # with nothing to do (0.87 CPU-s in 20 idle s on the 2-core dev box; 0.37 at 0.5 s), taken from the
    # cores the engines step on. dpserve's deployments change rarely (one ingress replica; the ranks
    # are its own actors), so health checks and redeploys reacting within 0.5 s instead is cheap:
    # benchmarks/results/serving.md, variant `ctl_100ms`.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}

DIRECT_INGRESS_FIRST_PORT = 30000


def apply_serve_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Put SERVE_ENV into `env` (default os.environ) where the operator has not set a value;
    returns what is in effect."""
    target = os.environ if env is None else env
    for key, value in SERVE_ENV.items():
        target.setdefault(key, value)
    return {k: target[k] for k in SERVE_ENV}


def direct_ingress_url(host: str = "127.0.0.1", env: Mapping[str, str] | None = None) -> str | None:
    """Where the first ingress replica listens itself when direct ingress is on in `env` (default
    os.environ: the environment Serve's controller inherits), else None."""
    env = os.environ if env is None else env
    if env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0") != "1":
        return None
    port = int(env.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", DIRECT_INGRESS_FIRST_PORT))
    return f"http://{host}:{port}"
