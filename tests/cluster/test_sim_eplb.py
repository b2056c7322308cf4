"""EPLB in the simulator: transfer cost units, the trace-driven load path, the expert load model, and
the determinism of the scaling study."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from cluster.sim import load_config, simulate
from cluster.sim.config import TransferConfig, apply_overrides
from cluster.sim.experts import ExpertModel, load_trace, real_layers_per_sim_layer
from cluster.sim.transfer import async_step_cost_s, expert_bytes, layer_transfer, sync_stall_s
from eplb.cli import plan_command
from eplb.policies import default_placement

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its functions pickle by module name into a process pool's workers
    spec.loader.exec_module(mod)
    return mod


def small(*overrides: str):
    base = [
        "cluster.num_ranks=4",
        "cluster.max_num_seqs=6",
        "cluster.max_num_batched_tokens=512",
        "workload.num_requests=60",
        "workload.input_len=200",
        "workload.output_len=60",
        "workload.len_range_ratio=0.5",
        "workload.max_concurrency=24",
        "model.num_experts=16",
        "model.num_moe_layers=8",
        "experts.sim_layers=2",
    ]
    return apply_overrides(load_config(None), base + list(overrides))


# --- cost model units -------------------------------------------------------------------------------


def test_expert_bytes_deepseek_v3() -> None:
    t = TransferConfig()
    params = 3 * 7168 * 2048
    # 8-bit weights plus one fp32 scale per 128 x 128 block (56 x 16 blocks per matrix).
    assert expert_bytes(t) == params + 3 * 56 * 16 * 4 == 44_050_944
    assert expert_bytes(dataclasses.replace(t, bytes_per_param=2.0)) == 2 * params


def test_layer_transfer_bytes_over_bandwidth_plus_op_latency() -> None:
    t = TransferConfig(
        ranks_per_node=2, intra_node_bw_Bps=50e9, inter_node_bw_Bps=10e9, p2p_op_latency_s=0.001
    )
    size = expert_bytes(t)
    # Rank 0 -> rank 1: same node (HCCS); rank 0 -> rank 2: across nodes (RoCE).
    intra = layer_transfer(np.array([0]), np.array([1]), 4, t)
    inter = layer_transfer(np.array([0]), np.array([2]), 4, t)
    assert intra.link_s == pytest.approx(size / 50e9)
    assert inter.link_s == pytest.approx(size / 10e9)
    assert inter.layer_s == pytest.approx(size / 10e9 + 0.001)
    assert inter.copy_s == pytest.approx(2 * size / t.hbm_bw_Bps)
    # Twice the bandwidth halves the link time; a local copy uses no link and no p2p op.
    fast = layer_transfer(np.array([0]), np.array([2]), 4, dataclasses.replace(t, inter_node_bw_Bps=20e9))
    assert fast.link_s == pytest.approx(inter.link_s / 2)
    local = layer_transfer(np.array([3]), np.array([3]), 4, t)
    assert local.layer_s == 0.0 and local.copy_s > 0 and local.moved_slots == 1
    # The busiest rank sets the time: three experts into rank 2 from three ranks.
    three = layer_transfer(np.array([0, 1, 3]), np.array([2, 2, 2]), 4, t)
    assert three.max_rank_slots == 3
    assert three.layer_s == pytest.approx(max(2 * size / 10e9, size / 50e9) + 3 * 0.001)


def test_async_overlaps_compute_and_sync_stalls_everything() -> None:
    t = TransferConfig(async_sync_s=1e-4)
    x = layer_transfer(np.array([0, 9]), np.array([9, 0]), 16, t)  # one op each way, across nodes
    assert 0 < x.layer_s < 0.05
    # Hidden behind an 80 ms step with no all-to-all to compete with: only sync + copy remain.
    assert async_step_cost_s(x, 0.08, 0.0, t) == pytest.approx(1e-4 + x.copy_s)
    # The all-to-all's share of the step is the share of the link time that shows.
    assert async_step_cost_s(x, 0.08, 0.02, t) == pytest.approx(1e-4 + x.copy_s + x.link_s * 0.25)
    # A step shorter than the transfer exposes the remainder.
    short = 0.5 * x.layer_s
    assert async_step_cost_s(x, short, 0.0, t) == pytest.approx(1e-4 + x.copy_s + x.layer_s - short)
    empty = layer_transfer(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 16, t)
    assert async_step_cost_s(empty, 0.08, 0.02, t) == 0.0
    assert sync_stall_s([x, x, empty]) == pytest.approx(2 * (x.layer_s + x.copy_s))


def test_fit_script_matches_config() -> None:
    fit = _bench("fit_eplb_transfer")
    t = TransferConfig()
    latency = fit.fit_p2p_op_latency(t)
    assert t.p2p_op_latency_s == pytest.approx(latency, abs=1e-5)
    # The fitted model reproduces the figure it was fitted on: 16 serialised experts in 100 ms.
    x = layer_transfer(np.zeros(16, dtype=np.int64), np.ones(16, dtype=np.int64), 8, t)
    assert x.layer_s == pytest.approx(0.100, rel=1e-3)


def test_sync_moves_in_one_step_async_one_layer_per_step() -> None:
    common = ["eplb.policy=deepseek", "experts.skew_sigma=1.2", "eplb.interval_steps=40", "seed=3"]
    sync = simulate(small(*common, "eplb.mode=sync"), "off")
    asyn = simulate(small(*common, "eplb.mode=async"), "off")
    assert sync.eplb_rebalances >= 1 and asyn.eplb_rebalances >= 1
    assert np.count_nonzero(sync.transfer_s) == len(sync.eplb_sync_stall_s) == sync.eplb_rebalances
    assert len(asyn.eplb_async_layer_s) == np.count_nonzero(asyn.transfer_s)
    # Each async plan takes the model's 8 MoE layers, one per step.
    assert len(asyn.eplb_async_layer_s) <= 8 * asyn.eplb_rebalances
    assert max(sync.eplb_sync_stall_s) > max(asyn.eplb_async_layer_s)
    assert sync.metrics()["max_step_ms"] >= 1e3 * max(sync.eplb_sync_stall_s)


def test_placement_starts_from_eplb_default() -> None:
    cfg = small("experts.num_redundant=4")
    m = ExpertModel(cfg.model, cfg.experts, cfg.eplb, 4, np.random.default_rng(0), cfg.transfer)
    assert np.array_equal(m.phy2log, default_placement(2, 16, 4, 4))
    assert real_layers_per_sim_layer(58, 4).tolist() == [14, 15, 15, 14]


# --- expert load model ------------------------------------------------------------------------------


def test_layer_correlation_and_depth_skew() -> None:
    cfg = small("experts.layer_correlation=1.0", "experts.depth_skew=0.5", "experts.sim_layers=4")
    m = ExpertModel(cfg.model, cfg.experts, cfg.eplb, 4, np.random.default_rng(0), cfg.transfer)
    # Fully correlated: every layer ranks the experts the same way; deeper layers are more skewed.
    order = np.argsort(m.logits, axis=1)
    assert all(np.array_equal(order[0], order[k]) for k in range(4))
    assert np.all(np.diff(m.layer_sigma) > 0)
    assert m.layer_sigma[0] == pytest.approx(0.6 * (1 + 0.5 * (2 * 0.125 - 1)))
    m.drift(30.0)  # stays correlated as it drifts
    assert np.array_equal(np.argsort(m.logits[0]), np.argsort(m.logits[3]))
    free = small("experts.sim_layers=4")
    u = ExpertModel(free.model, free.experts, free.eplb, 4, np.random.default_rng(0), free.transfer)
    assert abs(np.corrcoef(u.logits[0], u.logits[3])[0, 1]) < 0.9


# --- trace-driven path ------------------------------------------------------------------------------


def _trace(tmp_path: Path, shape: tuple[int, ...], hot: float = 50.0) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(10, 20, size=shape).astype(np.float64)
    arr[..., 0] *= hot  # expert 0 is hot in every layer: the identity placement overloads rank 0
    path = tmp_path / "loads.npy"
    np.save(path, arr)
    return path


def test_trace_is_the_eplb_plan_format(tmp_path: Path) -> None:
    path = _trace(tmp_path, (8, 16))
    doc = plan_command(
        argparse.Namespace(
            loads=path,
            num_ranks=4,
            num_redundant=0,
            num_nodes=1,
            num_groups=1,
            policy="deepseek",
            current=None,
            param=[],
            out=tmp_path / "plan.json",
        )
    )
    assert doc["stats"]["imbalance_before"] > 1.5
    probs = load_trace(str(path), 16, 2)
    raw = np.load(path)
    assert probs.shape == (1, 2, 16)
    np.testing.assert_allclose(probs[0, 0], raw[0] / raw[0].sum())
    np.testing.assert_allclose(probs[0, 1], raw[7] / raw[7].sum())  # first and last layer


def test_trace_drives_the_simulator(tmp_path: Path) -> None:
    path = _trace(tmp_path, (8, 16))
    traced = simulate(small(f"experts.loads_file={path}"), "off")
    uniform = simulate(small("experts.skew_sigma=0.0"), "off")
    # Expert 0 carries ~50x the others' tokens: rank 0 is the busiest in every step, well above noise.
    assert traced.moe_imbalance_expected.mean() > 2.0
    assert traced.moe_imbalance.mean() > uniform.moe_imbalance.mean() + 0.5
    # The trace sets the popularity: the synthetic skew and drift no longer matter.
    other = simulate(
        small(f"experts.loads_file={path}", "experts.skew_sigma=2.0", "experts.drift_timescale_s=1"), "off"
    )
    np.testing.assert_allclose(other.moe_imbalance_expected, traced.moe_imbalance_expected)
    # EPLB planning on the traced load fixes it.
    fixed = simulate(
        small(
            f"experts.loads_file={path}",
            "eplb.policy=deepseek",
            "experts.num_redundant=4",
            "eplb.interval_steps=20",
        ),
        "off",
    )
    assert fixed.eplb_rebalances >= 1
    assert fixed.moe_imbalance_expected[-1] < 0.6 * traced.moe_imbalance_expected[-1]


def test_trace_windows_replay_in_order(tmp_path: Path) -> None:
    arr = np.ones((2, 8, 16))
    arr[1, :, 5] = 100.0  # the second window has a hot expert
    path = tmp_path / "windows.npy"
    np.save(path, arr)
    r = simulate(small(f"experts.loads_file={path}", "experts.trace_window_steps=10"), "off")
    exp = r.moe_imbalance_expected
    assert np.allclose(exp[:10], 1.0) and np.all(exp[10:20] > 2.0) and np.allclose(exp[20:30], 1.0)


def test_trace_errors_are_clear(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((8, 15)))
    with pytest.raises(ValueError, match="15 experts per layer, model has 16"):
        simulate(small(f"experts.loads_file={bad}"), "off")
    np.save(bad, np.ones(16))
    with pytest.raises(ValueError, match="expected \\[layers, experts\\]"):
        simulate(small(f"experts.loads_file={bad}"), "off")
    assert main(["sim", "--requests", "4", "--policies", "off", "--loads", str(tmp_path / "nope.npy")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_loads_option(tmp_path: Path, capsys) -> None:
    path = _trace(tmp_path, (58, 256))
    rc = main(["sim", "--requests", "16", "--policies", "off", "--loads", str(path), "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["config"]["experts"]["loads_file"] == str(path)
    assert payload["results"]["off"]["mean_moe_imbalance"] > 1.5


# --- the scaling study ------------------------------------------------------------------------------


def test_study_is_deterministic() -> None:
    study = _bench("sim_eplb_scaling")
    kw = {"output_len": 30, "layer_correlation": 0.3, "depth_skew": 0.5}
    args = {"seeds": [1, 2], "candidate_eps": [8], "drift_times": [120.0, math.inf], "drift_ep": 8}
    a = study.study([8], [40], jobs=1, **args, **kw)
    b = study.study([8], [40], jobs=2, **args, **kw)  # in parallel: the same numbers, in the same order
    assert json.dumps(a) == json.dumps(b)  # NaN-safe: a cell without steady steps reports NaN
    grid = a["grid"]
    assert {c["label"] for c in grid} == {"none", "oracle", "deepseek", "swift", "swift paced"}
    assert len(grid) == 2 + 2 * 2 * 2 + 2  # none, oracle, policies x redundant x (async, sync), paced swift
    assert any(c["plans"] > 0 for c in grid)
    # Each seed's run is compared with no EPLB of the same seed: no EPLB gains exactly nothing.
    none = next(c for c in grid if c["label"] == "none")
    assert none["gains"] == [0.0, 0.0]
    assert len(a["candidates"]) == len(study.CANDIDATES)
    assert {c["drift_s"] for c in a["drift"]} == {120.0, None}  # None: no drift
    # The drift sweep's 120 s cells are the candidates' runs (no override), not reruns.
    old = next(c for c in a["candidates"] if c["label"] == "old driving")
    old120 = next(c for c in a["drift"] if c["label"] == "old driving" and c["drift_s"] == 120.0)
    assert old["output_tok_s"] == old120["output_tok_s"]
    head = study.headline(grid)
    assert set(head["per_ep"]) == {8} and head["text"]
    assert study.analysis({**a, "headline": head})


def test_study_report_assembles_and_renders() -> None:
    # The report reads the headline while it is assembled (targets, reading): main's path, on a small study.
    study = _bench("sim_eplb_scaling")
    kw = {"output_len": 30, "layer_correlation": 0.3, "depth_skew": 0.5}
    runs = study.study([8], [40], seeds=[1], candidate_eps=[8], drift_times=[120.0], drift_ep=8, **kw)
    plan = {"window_before": 2.0, "window_after": 1.01, "popularity_after": 1.7, "popularity_at_apply": 1.6}
    diag = {
        name: {"mean_tokens_per_step": 400.0, "moe_imbalance_realised": 2.0, "moe_imbalance_expected": 1.9,
               "mean_decode_only_step_ms": 69.0, "mean_step_s": 0.1, "plans": [plan]}
        for name in ("issue_run", "issue_run_no_eplb", "no_drift", "full_concurrency", "full_concurrency_no_eplb")
    }  # fmt: skip
    meta = {"seeds": [1], "output_len": 30, "layer_correlation": 0.3, "depth_skew": 0.5,
            "layers_per_step": study.LAYERS_PER_STEP, "paced_first_plan_steps": study.PACED_FIRST_PLAN_STEPS,
            "drift_ep": 8, "sim_layers": 4, "expert_mb": 44.1,
            "p2p_op_latency_ms": 5.0, "diag_interval": 1000, "runs": len(runs["rows"]), "wall_s": 1.0}  # fmt: skip
    doc = study.report(runs, diag, meta)
    assert doc["headline"]["per_ep"][8]["gain_range"] and doc["targets"] and doc["analysis"]
    md = study.markdown(doc)
    assert "## Against the issue's targets" in md and "stall per cell" in md
    assert "what changed" not in md and "new driving" not in md  # candidates are named by what they are


def test_study_moves_the_products_layers_per_step() -> None:
    # The grid and the interval-25 candidate run what a deployment runs; the faster landing stays a candidate.
    from deployments.config import EplbSection

    study = _bench("sim_eplb_scaling")
    assert study.LAYERS_PER_STEP == EplbSection().layers_per_step == 1
    assert study.NEW_DRIVING["lps"] == study.LAYERS_PER_STEP
    assert any(c.get("lps") == study.FAST_LAYERS_PER_STEP for c in study.CANDIDATES.values())
    secs = study.sections([8], study.INTERVALS, [8], [120.0], drift_ep=8)
    assert all(s[5] == study.LAYERS_PER_STEP for _, s in secs["grid"])
    assert 25 in study.INTERVALS
