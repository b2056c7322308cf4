"""How the simulator drives EPLB: several layers per step, the per-layer commit, the recency-weighted
load window, and their config checks."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.sim import load_config, simulate
from cluster.sim.config import TransferConfig, apply_overrides
from cluster.sim.experts import ExpertModel
from cluster.sim.transfer import async_layers_cost_s, async_step_cost_s, layer_transfer


def model(*overrides: str, ranks: int = 4) -> ExpertModel:
    base = ["model.num_experts=16", "model.num_moe_layers=8", "experts.sim_layers=2", "eplb.policy=deepseek"]
    cfg = apply_overrides(load_config(None), base + list(overrides))
    return ExpertModel(cfg.model, cfg.experts, cfg.eplb, ranks, np.random.default_rng(0), cfg.transfer)


def skewed(m: ExpertModel) -> np.ndarray:
    """A load under which the start-up placement is unbalanced in both simulated layers."""
    load = np.ones((m.L, m.E))
    load[:, :4] = 20.0  # the four hottest experts all sit on rank 0 at start-up
    return load


def test_layers_in_one_step_add_up_on_the_side_stream() -> None:
    t = TransferConfig(async_sync_s=1e-4)
    x = layer_transfer(np.array([0, 9]), np.array([9, 0]), 16, t)
    # One layer is the single-layer cost; two layers pay two syncs, two copies, two link shares.
    assert async_layers_cost_s([x], 0.08, 0.02, t) == pytest.approx(async_step_cost_s(x, 0.08, 0.02, t))
    two = async_layers_cost_s([x, x], 0.08, 0.02, t)
    assert two == pytest.approx(2 * async_step_cost_s(x, 0.08, 0.02, t))
    # Their durations add up on the one side stream: a step that hides one layer exposes the second.
    step = 1.5 * x.layer_s
    hidden = 2 * (1e-4 + x.copy_s)
    assert async_layers_cost_s([x, x], step, 0.0, t) == pytest.approx(hidden + 2 * x.layer_s - step)
    assert async_layers_cost_s([], 0.08, 0.0, t) == 0.0


@pytest.mark.parametrize("per_step", [1, 4])
def test_async_plan_moves_layers_per_step_and_commits_each_layer(per_step: int) -> None:
    m = model(f"eplb.layers_per_step={per_step}", "eplb.interval_steps=1")
    old = m.phy2log.copy()
    m.window = skewed(m)
    m.maybe_rebalance(1)
    new = m.transfer.phy2log.copy()
    assert (new != old).any(axis=1).all()  # both simulated layers change (4 real layers each)
    steps = 0
    while m.transfer is not None:
        m.transfer_step(0.08, 0.0)
        steps += 1
        moved = min(steps * per_step, 8)
        # A simulated layer's placement is in force once its 4 real layers have moved, not before.
        for layer in range(2):
            want = new[layer] if moved >= 4 * (layer + 1) else old[layer]
            assert np.array_equal(m.phy2log[layer], want)
    assert steps == -(-8 // per_step)
    assert len(m.async_layer_costs) == 8


def test_commit_at_end_holds_every_layer_until_the_last() -> None:
    m = model("eplb.commit_per_layer=false", "eplb.interval_steps=1")
    old = m.phy2log.copy()
    m.window = skewed(m)
    m.maybe_rebalance(1)
    new = m.transfer.phy2log.copy()
    for _ in range(7):
        m.transfer_step(0.08, 0.0)
        assert np.array_equal(m.phy2log, old)
    m.transfer_step(0.08, 0.0)
    assert m.transfer is None and np.array_equal(m.phy2log, new)


def test_half_life_window_weighs_recent_load_and_survives_a_plan() -> None:
    m = model("eplb.window_half_life_s=1.0", "eplb.interval_steps=1000", "experts.drift_timescale_s=.inf")
    m.route(1000)
    first = m.decayed.total()
    assert first.sum() == pytest.approx(m.L * 1000 * m.top_k, rel=0.05)  # Poisson counts, every layer
    m.drift(2.0)  # two half-lives
    assert np.allclose(m.decayed.total(), first / 4)
    assert not m.window.any()  # the since-last-plan window is not used
    m.decayed.reset()
    m.decayed.add(skewed(m))
    m.maybe_rebalance(1000)
    assert m.rebalances == 1
    assert np.allclose(m.decayed.total(), skewed(m))  # a plan does not reset the weighted load


def test_driving_options_run_end_to_end_and_are_checked() -> None:
    base = [
        "cluster.num_ranks=4",
        "cluster.max_num_seqs=6",
        "workload.num_requests=40",
        "workload.input_len=200",
        "workload.output_len=40",
        "workload.max_concurrency=24",
        "model.num_experts=16",
        "model.num_moe_layers=8",
        "experts.sim_layers=2",
        "experts.skew_sigma=1.2",
        "eplb.policy=swift",
        "eplb.interval_steps=10",
        "seed=2",
    ]
    runs = [
        simulate(apply_overrides(load_config(None), base + extra), "off")
        for extra in ([], ["eplb.layers_per_step=4", "eplb.window_half_life_s=0.5"])
    ]
    for r in runs:
        assert r.eplb_rebalances >= 1
    # Four layers per step: the same eight layers of a plan take two steps instead of eight.
    fast = runs[1]
    assert np.count_nonzero(fast.transfer_s) <= 2 * fast.eplb_rebalances
    for bad in ("eplb.layers_per_step=0", "eplb.window_half_life_s=0", "eplb.interval_steps=0"):
        with pytest.raises(ValueError, match="eplb"):
            apply_overrides(load_config(None), [bad])


def test_first_plan_steps_plans_once_after_the_warm_up() -> None:
    m = model("eplb.interval_steps=10", "eplb.first_plan_steps=2")
    m.window = skewed(m)
    m.maybe_rebalance(1)
    assert m.transfer is None  # not yet: the warm-up is 2 steps
    m.maybe_rebalance(2)
    assert m.transfer is not None and m.rebalances == 1
    while m.transfer is not None:
        m.transfer_step(0.08, 0.0)
    # After the first plan, full windows (eplb.pacing.plan_due): due 10 steps after the attempt at
    # step 2, when the attempt reads and resets the window.
    m.window = skewed(m)
    m.maybe_rebalance(11)
    assert m.window.sum() > 0
    m.maybe_rebalance(12)
    assert m.window.sum() == 0
    # Without the option the first plan waits a full interval.
    d = model("eplb.interval_steps=10")
    d.window = skewed(d)
    d.maybe_rebalance(2)
    assert d.transfer is None


def test_layers_fit_step_moves_what_the_step_hides() -> None:
    m = model("eplb.interval_steps=1", "eplb.layers_fit_step=true")
    m.window = skewed(m)
    m.maybe_rebalance(1)
    new = m.transfer.phy2log.copy()
    pending = len(m.transfer.layers)
    per_layer = m.transfer.layers[0].layer_s
    # A step as long as three layers' transfers moves three; a short one still moves one.
    m.transfer_step(3.5 * per_layer, 0.0)
    assert len(m.transfer.layers) == pending - 3
    m.transfer_step(0.1 * per_layer, 0.0)
    assert len(m.transfer.layers) == pending - 4
    m.transfer_step(100.0, 0.0)
    assert m.transfer is None
    assert np.array_equal(m.phy2log, new)
    assert len(m.async_layer_costs) == pending


def test_pacing_options_are_validated() -> None:
    for bad in ("eplb.first_plan_steps=0", "eplb.first_plan_steps=1.5"):
        with pytest.raises(ValueError):
            apply_overrides(load_config(None), [bad]).validate()
