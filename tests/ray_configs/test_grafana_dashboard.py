"""ray_configs/grafana-dpserve.json against npu_runtime/metric_names.py.

Every query must name only dpserve metrics, under the series names Ray exports them with (``ray_``
prefix, ``_total`` on counters, ``_bucket``/``_sum``/``_count`` on histograms), group and filter only
by labels the metric has, and every metric must have a panel. A dashboard with a misspelt metric is
caught (negative tests).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from npu_runtime import metric_names as mn

DASHBOARD = Path(__file__).resolve().parents[2] / "ray_configs" / "grafana-dpserve.json"

# PromQL words that are not metric names.
PROMQL_FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "stddev",
    "rate", "irate", "increase", "delta", "idelta", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "vector", "scalar", "label_replace", "max_over_time", "avg_over_time", "time",
}  # fmt: skip
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
# Labels Ray adds to every series, plus the histogram bucket label.
RAY_LABELS = {"SessionName", "NodeAddress", "WorkerId", "Component", "instance", "job"}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def _strip(expr: str) -> tuple[str, list[str], list[str]]:
    """(expr without strings/matchers/ranges, label matcher bodies, grouping label lists)."""
    matchers = re.findall(r"\{([^}]*)\}", expr)
    groupings = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", bare)
    return bare, matchers, groupings


def expr_problems(expr: str) -> tuple[list[str], set[str]]:
    """Problems with one PromQL expression, and the dpserve metrics it names."""
    problems: list[str] = []
    bare, matchers, groupings = _strip(expr)
    metrics: set[str] = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        word = match.group()
        follows = bare[match.end() :].lstrip()
        if word in PROMQL_KEYWORDS or (word in PROMQL_FUNCTIONS and follows.startswith("(")):
            continue
        metric = mn.metric_for_series(word)
        if metric is None:
            problems.append(f"{word!r} is not a series of any metric in npu_runtime/metric_names.py")
        else:
            metrics.add(metric)
    if not metrics and not problems:
        problems.append("names no dpserve metric")
    allowed = set(RAY_LABELS)
    for metric in metrics:
        allowed |= set(mn.METRICS[metric].labels)
        if mn.METRICS[metric].kind == mn.HISTOGRAM:
            allowed.add("le")
    for body in matchers:
        for label in re.findall(
            r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:[^"\\]|\\.)*"', '""', body)
        ):
            if label not in allowed:
                problems.append(f"filters on label {label!r}, which {sorted(metrics)} do not have")
    for body in groupings:
        for label in (part.strip() for part in body.split(",") if part.strip()):
            if label not in allowed:
                problems.append(f"groups by label {label!r}, which {sorted(metrics)} do not have")
    if "_bucket" in expr and "histogram_quantile" not in expr:
        problems.append("uses a _bucket series outside histogram_quantile")
    return problems, metrics


def dashboard_problems(dashboard: dict) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    ids = [p["id"] for p in dashboard["panels"]] + [
        q["id"] for r in dashboard["panels"] for q in r.get("panels", [])
    ]
    if len(ids) != len(set(ids)):
        problems.append("duplicate panel ids")
    for panel in query_panels(dashboard):
        title = panel.get("title", "?")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r} has no queries")
        if "gridPos" not in panel:
            problems.append(f"panel {title!r} has no gridPos")
        for target in targets:
            expr = target.get("expr", "")
            found, metrics = expr_problems(expr)
            problems.extend(f"panel {title!r}: {p} in {expr!r}" for p in found)
            seen |= metrics
            if target.get("datasource", panel.get("datasource", {})).get("uid") != "${datasource}":
                problems.append(f"panel {title!r}: query not bound to the $datasource variable")
    for metric in sorted(set(mn.ALL_METRICS) - seen):
        problems.append(f"metric {metric} has no panel")
    return problems


# ----------------------------------------------------------------------------- the module


def test_metric_names_module_lists_the_metrics():
    assert mn.ALL_METRICS == tuple(mn.METRICS)
    assert len(set(mn.ALL_METRICS)) == len(mn.ALL_METRICS) == 12
    for name, spec in mn.METRICS.items():
        assert name == spec.name and name.startswith("dpserve_")
        assert spec.kind in (mn.COUNTER, mn.GAUGE, mn.HISTOGRAM)
    assert mn.METRICS[mn.REQUESTS_TOTAL].labels == ("rank", "status")
    assert mn.METRICS[mn.EPLB_IMBALANCE].labels == ("layer", "phase")


@pytest.mark.parametrize(
    ("name", "series"),
    [
        (mn.REQUESTS_TOTAL, ("ray_dpserve_requests_total",)),
        (mn.GATE_CLOSED_STEPS, ("ray_dpserve_gate_closed_steps_total",)),
        (mn.RANK_RUNNING, ("ray_dpserve_rank_running",)),
        (mn.TTFT_MS, ("ray_dpserve_ttft_ms_bucket", "ray_dpserve_ttft_ms_sum", "ray_dpserve_ttft_ms_count")),
    ],
)
def test_prometheus_series_names(name, series):
    assert mn.prometheus_series(name) == series
    for s in series:
        assert mn.metric_for_series(s) == name


def test_counter_series_names_match_the_prometheus_client():
    """The Prometheus client Ray exports through decides the _total suffix; check ours agrees."""
    from prometheus_client.core import CounterMetricFamily

    for name, spec in mn.METRICS.items():
        if spec.kind != mn.COUNTER:
            continue
        family = CounterMetricFamily(mn.PROMETHEUS_PREFIX + name, "", labels=[])
        family.add_metric([], 1.0)
        assert [s.name for s in family.samples] == list(mn.prometheus_series(name))


# ----------------------------------------------------------------------------- the dashboard


def test_dashboard_is_grafana_json():
    dashboard = load()
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "SessionName"} <= names


def test_dashboard_queries_name_only_known_metrics_and_cover_them_all():
    assert dashboard_problems(load()) == []


def test_misspelt_metric_is_caught():
    dashboard = load()
    panel = query_panels(dashboard)[0]
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace(
        "ray_dpserve_requests_total", "ray_dpserve_request_total"
    )
    problems = dashboard_problems(dashboard)
    assert any("'ray_dpserve_request_total' is not a series" in p for p in problems)


def test_counter_without_total_suffix_is_caught():
    # Ray's deprecated counter-as-gauge series: not to be used by dashboards.
    problems, _ = expr_problems("sum(rate(ray_dpserve_gate_closed_steps[5m]))")
    assert problems


def test_wrong_label_is_caught():
    problems, _ = expr_problems("max by (layer) (ray_dpserve_rank_running)")
    assert any("groups by label 'layer'" in p for p in problems)
    problems, _ = expr_problems('max(ray_dpserve_eplb_imbalance{phase="after", rank="0"})')
    assert any("filters on label 'rank'" in p for p in problems)


def test_missing_panel_is_caught():
    dashboard = load()
    dashboard = copy.deepcopy(dashboard)
    dashboard["panels"] = [
        p for p in dashboard["panels"] if "eplb_bytes_moved" not in json.dumps(p.get("targets", []))
    ]
    assert f"metric {mn.EPLB_BYTES_MOVED_TOTAL} has no panel" in dashboard_problems(dashboard)


def test_operations_guide_lists_every_metric():
    guide = (DASHBOARD.parents[1] / "docs" / "operations.md").read_text()
    for name in mn.ALL_METRICS:
        assert f"`{name}`" in guide, name
        for series in mn.prometheus_series(name)[:1]:
            assert series in guide, series
