"""Turning simulation results into the seed's table, JSON and PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.sim.engine import SimResult

# (metric key, column header, format) in the seed's column order.
COLUMNS: list[tuple[str, str, str]] = [
    ("mean_ttft_ms", "Average TTFT (ms)", "{:.0f}"),
    ("mean_tpot_ms", "Average TPOT (ms)", "{:.2f}"),
    ("duration_s", "e2e duration (s)", "{:.1f}"),
    ("input_tok_s", "Input tok/s", "{:.1f}"),
    ("output_tok_s", "Output tok/s", "{:.1f}"),
    ("request_s", "Request/s", "{:.2f}"),
]


def _fmt(fmt: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def table(rows: Mapping[str, Mapping[str, Any]], extra: Sequence[tuple[str, str, str]] = ()) -> str:
    """A Markdown table, one row per label, with the seed's columns (plus ``extra`` ones)."""
    cols = list(COLUMNS) + list(extra)
    out = ["| Run | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, m in rows.items():
        out.append(f"| {label} | " + " | ".join(_fmt(f, m.get(k)) for k, _, f in cols) + " |")
    return "\n".join(out)


def gain(new: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
    """Relative change of each seed column of ``new`` over ``base`` (0.18 = +18 %)."""
    return {k: new[k] / base[k] - 1.0 for k, _, _ in COLUMNS if base.get(k)}


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON (NaN/inf become null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    Path(path).write_text(json.dumps(clean(payload), indent=2) + "\n")


def plot(results: Sequence[SimResult], prefix: str | Path, title: str = "") -> list[Path]:
    """Per-step time and per-rank running counts over time, one panel per policy; returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    prefix = Path(prefix)
    paths = []
    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.4 * n), sharex=True, squeeze=False)
    for ax, res in zip(axes[:, 0], results, strict=True):
        ax.plot(res.step_start, res.step_time * 1e3, lw=0.6)
        ax.set_yscale("log")
        ax.set_ylabel("step ms")
        m = res.metrics()
        ax.set_title(
            f"{res.policy}: {res.steps} steps, {100 * m['prefill_step_frac']:.1f}% with prefill, "
            f"TPOT {m['mean_tpot_ms']:.1f} ms",
            fontsize=9,
        )
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(f"{title} - lockstep step time".strip(" -"), fontsize=10)
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "_step_time.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(n, 1, figsize=(11, 2.4 * n), sharex=True, squeeze=False)
    for ax, res in zip(axes[:, 0], results, strict=True):
        ranks = res.running.shape[1] if res.running.ndim == 2 else 0
        shown = range(min(ranks, 8))  # beyond 8 lines the panel is unreadable
        for r in shown:
            ax.step(res.step_start, res.running[:, r], where="post", lw=0.6, label=f"rank {r}")
        ax.set_ylabel("running")
        ax.set_title(f"{res.policy}: running requests per rank (first {len(shown)} of {ranks})", fontsize=9)
        if ranks <= 8:
            ax.legend(fontsize=6, ncol=8, loc="lower right")
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(f"{title} - running counts".strip(" -"), fontsize=10)
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "_running.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
