"""`dpserve shutdown`: drain the dpserve applications, then shut Serve down (see deployments.shutdown).

Use it instead of `serve shutdown`, which kills Serve's HTTP proxies at once and cuts streams in flight.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--app", action="append", dest="apps", default=None,
                        help="application to drain (repeatable; default: every application)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=None,
                        help="let requests in flight finish for at most this many seconds "
                             "(default: each application's drain_timeout_s, 30 s)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import ray

    from deployments.shutdown import graceful_shutdown

    ray.init(address=args.address, namespace="serve", log_to_driver=False)
    result = graceful_shutdown(args.apps, args.timeout)
    print(json.dumps(result, indent=2, default=str))
    return 0 if all("error" not in r and r.get("drained") for r in result["apps"].values()) else 1
