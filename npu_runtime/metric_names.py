"""Canonical names of dpserve's metrics: the one list that code and the Grafana dashboard share.

Code creates these with ``ray.util.metrics`` (``Counter``, ``Gauge``, ``Histogram``) under the names
below; ``ray_configs/grafana-dpserve.json`` queries them, and ``tests/ray_configs`` checks that every
dashboard query names a metric from this module (and that every metric here has a panel).

How a name reaches Prometheus (Ray's metrics agent, OpenTelemetry or OpenCensus path alike):

* Ray prefixes every application metric with ``ray_``: ``dpserve_rank_running`` is scraped as
  ``ray_dpserve_rank_running``.
* A counter is exported as a Prometheus counter, whose series always ends in ``_total`` (the
  Prometheus client strips a trailing ``_total`` and adds it back): ``dpserve_requests_total`` is
  ``ray_dpserve_requests_total``, ``dpserve_gate_closed_steps`` is ``ray_dpserve_gate_closed_steps_total``.
  (Ray also exports a deprecated gauge without ``_total`` for counters whose name lacks it, unless
  ``RAY_EXPORT_COUNTER_AS_GAUGE=0``; dashboards must not rely on it.)
* A histogram becomes ``<name>_bucket`` (label ``le``), ``<name>_sum`` and ``<name>_count``.

Ray adds its own labels (``SessionName``, ``NodeAddress``, ``WorkerId``, ...) to every series; the
labels listed here are the ones dpserve sets (``tag_keys``).

Pure Python, no Ray import: safe to use from policies, tests and tooling.
"""

from __future__ import annotations

from dataclasses import dataclass

# Prefix Ray puts in front of every ray.util.metrics name in Prometheus.
PROMETHEUS_PREFIX = "ray_"

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

# --- ingress / router -------------------------------------------------------------------------
REQUESTS_TOTAL = "dpserve_requests_total"  # counter; rank, status
RANK_RUNNING = "dpserve_rank_running"  # gauge; rank
RANK_WAITING = "dpserve_rank_waiting"  # gauge; rank
TTFT_MS = "dpserve_ttft_ms"  # histogram
TPOT_MS = "dpserve_tpot_ms"  # histogram
# Every internal ZMQ channel: the ranks' output (channel=output, counted by the ingress), the
# ingress's requests to each rank (channel=request, counted by that rank) and the gate (channel=gate,
# counted by the balance coordinator).
INTERNAL_FRAMES_DROPPED = "dpserve_internal_frames_dropped"  # counter; channel, reason

# --- balance scheduling (prefill gate) --------------------------------------------------------
GATE_CLOSED_STEPS = "dpserve_gate_closed_steps"  # counter
GATE_GATHER_LATENCY_MS = "dpserve_gate_gather_latency_ms"  # histogram

# --- EPLB ---------------------------------------------------------------------------------------
EPLB_IMBALANCE = "dpserve_eplb_imbalance"  # gauge; layer, phase
EPLB_REBALANCES_TOTAL = "dpserve_eplb_rebalances_total"  # counter
EPLB_REBALANCE_DURATION_MS = "dpserve_eplb_rebalance_duration_ms"  # histogram
EPLB_BYTES_MOVED_TOTAL = "dpserve_eplb_bytes_moved_total"  # counter

# Label values of EPLB_IMBALANCE's ``phase``: the layer's imbalance before and after a rebalance.
PHASE_BEFORE = "before"
PHASE_AFTER = "after"


@dataclass(frozen=True)
class MetricSpec:
    """One dpserve metric: its ray.util.metrics name, kind, the labels dpserve sets, a description."""

    name: str
    kind: str  # COUNTER | GAUGE | HISTOGRAM
    labels: tuple[str, ...]
    description: str


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(REQUESTS_TOTAL, COUNTER, ("rank", "status"), "requests finished, by DP rank and outcome"),
        MetricSpec(RANK_RUNNING, GAUGE, ("rank",), "running requests per DP rank"),
        MetricSpec(RANK_WAITING, GAUGE, ("rank",), "waiting requests per DP rank"),
        MetricSpec(TTFT_MS, HISTOGRAM, (), "time to first token (ms)"),
        MetricSpec(TPOT_MS, HISTOGRAM, (), "time per output token after the first (ms)"),
        MetricSpec(
            INTERNAL_FRAMES_DROPPED,
            COUNTER,
            ("channel", "reason"),
            "frames dropped on the internal ZMQ sockets (channel=output|request|gate): unauthenticated, "
            "malformed, replayed, invalid",
        ),
        MetricSpec(
            GATE_CLOSED_STEPS, COUNTER, (), "engine steps in which the prefill gate refused admission"
        ),
        MetricSpec(
            GATE_GATHER_LATENCY_MS, HISTOGRAM, (), "latency of the per-step running-count gather (ms)"
        ),
        MetricSpec(
            EPLB_IMBALANCE,
            GAUGE,
            ("layer", "phase"),
            "per-layer expert load imbalance, max rank load / mean rank load (phase=before|after)",
        ),
        MetricSpec(EPLB_REBALANCES_TOTAL, COUNTER, (), "expert placements committed"),
        MetricSpec(EPLB_REBALANCE_DURATION_MS, HISTOGRAM, (), "time to plan and apply one rebalance (ms)"),
        MetricSpec(EPLB_BYTES_MOVED_TOTAL, COUNTER, (), "expert weight bytes moved by rebalances"),
    )
}

ALL_METRICS: tuple[str, ...] = tuple(METRICS)

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def prometheus_series(name: str) -> tuple[str, ...]:
    """The Prometheus series names under which Ray exports the dpserve metric ``name``."""
    spec = METRICS[name]
    base = PROMETHEUS_PREFIX + name
    if spec.kind == COUNTER:
        return (base.removesuffix("_total") + "_total",)
    if spec.kind == HISTOGRAM:
        return tuple(base + suffix for suffix in HISTOGRAM_SUFFIXES)
    return (base,)


def metric_for_series(series: str) -> str | None:
    """The dpserve metric a Prometheus series name belongs to, or None if it is none of ours."""
    for name in METRICS:
        if series in prometheus_series(name):
            return name
    return None
