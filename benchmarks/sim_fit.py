"""Fit the simulator's free cost parameters to the seed's *baseline* row (gate `off`) only.

The fitted parameters are ``costs.step_overhead_s`` and ``costs.dense_per_token_s`` (and, with
``--budget``, ``cluster.max_num_batched_tokens`` from a list); every other parameter is a physical prior
kept as configured. The objective is the root mean square of the log errors of mean TTFT, mean TPOT and
end-to-end duration against ``reference.baseline``. The balance-scheduling row is never read: it is what
the fitted model must predict.

The search is a coordinate descent on multiplicative steps (x0.7 ... x1.3, shrinking each round), which
needs about 30 simulations per fit.

Run: .venv/bin/python benchmarks/sim_fit.py [--set section.key=value ...] [--budget 4096 6144 8192]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.sim import load_config, simulate  # noqa: E402
from cluster.sim.config import SimConfig, apply_overrides  # noqa: E402

CONFIG = ROOT / "ray_configs" / "sim-deepseek-v3.yaml"
TARGETS = ("mean_ttft_ms", "mean_tpot_ms", "duration_s")
PARAMS = ("costs.step_overhead_s", "costs.dense_per_token_s")


def _get(cfg: SimConfig, key: str) -> float:
    section, name = key.split(".")
    return float(getattr(getattr(cfg, section), name))


def baseline_error(cfg: SimConfig) -> tuple[float, dict[str, float]]:
    """(RMS log error, per-target relative error) of `off` against the seed's baseline row."""
    m = simulate(cfg, "off", record_rank_time=False).metrics()
    ref = cfg.reference["baseline"]
    logs = [math.log(m[k] / ref[k]) for k in TARGETS]
    return math.sqrt(sum(x * x for x in logs) / len(logs)), {k: m[k] / ref[k] - 1 for k in TARGETS}


def fit(cfg: SimConfig, rounds: int = 3, budgets: list[int] | None = None) -> dict[str, Any]:
    """Fit PARAMS (and the token budget from ``budgets``) to the baseline row; returns the fitted
    overrides, the error and the fitted config."""
    values = {k: _get(cfg, k) for k in PARAMS}
    best_budget = cfg.cluster.max_num_batched_tokens

    def score(vals: dict[str, float], budget: int) -> float:
        ov = [f"{k}={v!r}" for k, v in vals.items()] + [f"cluster.max_num_batched_tokens={budget}"]
        return baseline_error(apply_overrides(cfg, ov))[0]

    best = score(values, best_budget)
    for budget in budgets or []:
        s = score(values, budget)
        if s < best:
            best, best_budget = s, budget
    step = 0.3
    for _ in range(rounds):
        for key in PARAMS:
            for f in (1 - step, 1 - step / 2, 1 + step / 2, 1 + step):
                trial = dict(values, **{key: values[key] * f})
                s = score(trial, best_budget)
                if s < best:
                    best, values = s, trial
        step /= 2
    overrides = [f"{k}={v!r}" for k, v in values.items()] + [f"cluster.max_num_batched_tokens={best_budget}"]
    fitted = apply_overrides(cfg, overrides)
    err, rel = baseline_error(fitted)
    return {"overrides": overrides, "rms_log_error": err, "baseline_error": rel, "config": fitted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument(
        "--budget", type=int, nargs="*", help="token budgets to try (cluster.max_num_batched_tokens)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", metavar="POLICY", help="after fitting, print POLICY's change against off")
    args = ap.parse_args()
    cfg = apply_overrides(load_config(args.config), args.overrides)
    res = fit(cfg, args.rounds, args.budget)
    print("fitted:", " ".join(res["overrides"]))
    print(
        f"RMS log error {res['rms_log_error']:.4f}; "
        + ", ".join(f"{k} {100 * v:+.1f} %" for k, v in res["baseline_error"].items())
    )
    if args.compare:
        from cluster.sim.report import gain

        c = res["config"]
        g = gain(simulate(c, args.compare).metrics(), simulate(c, "off").metrics())
        print(
            f"{args.compare} vs off: output throughput {100 * g['output_tok_s']:+.1f} %, "
            f"TPOT {100 * g['mean_tpot_ms']:+.1f} %, TTFT {100 * g['mean_ttft_ms']:+.1f} %"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
