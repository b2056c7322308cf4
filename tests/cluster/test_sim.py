"""Simulator invariants: conservation, lockstep, determinism, and that it runs the real gate policies."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cluster.sim.engine as engine
from cluster.cli import main
from cluster.sim import load_config, simulate
from cluster.sim.cli import DEFAULT_CONFIG
from cluster.sim.config import apply_overrides
from scheduler.policy import GateDecision, GroupLoad, LoadWindow, RankCounts, make_policy


def small(*overrides: str):
    """A small, fast config with varied lengths (desynchronised ranks exercise every code path)."""
    base = [
        "cluster.num_ranks=4",
        "cluster.max_num_seqs=6",
        "cluster.max_num_batched_tokens=512",
        "workload.num_requests=80",
        "workload.input_len=300",
        "workload.output_len=40",
        "workload.len_range_ratio=0.5",
        "workload.max_concurrency=30",
        "workload.client_delay_jitter_s=0.01",
        "model.num_experts=16",
        "model.num_moe_layers=8",
        "experts.sim_layers=2",
    ]
    return apply_overrides(load_config(None), base + list(overrides))


@pytest.mark.parametrize("policy", ["off", "any_at_cap", "max_minus_one", "cadence", "bounded_hold"])
@pytest.mark.parametrize("threshold", [0, 100])
def test_conservation(policy: str, threshold: int) -> None:
    cfg = small(f"cluster.long_prefill_token_threshold={threshold}")
    res = simulate(cfg, policy)
    assert (res.finish_count == 1).all()  # every request finished exactly once
    assert (res.prefilled == res.prompt_len).all()  # every prompt token computed exactly once
    assert res.prefill_tokens.sum() == res.prompt_len.sum()
    assert res.output_tokens.sum() == res.output_len.sum()
    # Decodes + one first token per request = the output tokens.
    assert res.decode_tokens.sum() + len(res.output_len) == res.output_len.sum()
    assert (res.first_t >= res.send_t).all() and (res.finish_t >= res.first_t).all()
    assert (res.running <= cfg.cluster.max_num_seqs).all()
    assert res.admitted.sum() == len(res.prompt_len)


def test_lockstep_step_time_is_slowest_rank() -> None:
    res = simulate(small(), "off")
    assert res.rank_time.shape == (res.steps, 4)
    np.testing.assert_array_equal(res.step_time, res.rank_time.max(axis=1))
    # Ranks really differ in some steps (otherwise the test above proves nothing).
    assert (res.rank_time.max(axis=1) > res.rank_time.min(axis=1) * 1.01).any()
    # Steps follow each other without gaps unless every engine was idle.
    gaps = np.diff(res.step_start) - res.step_time[:-1]
    assert (gaps >= -1e-12).all()


def test_prefill_on_one_rank_stalls_all() -> None:
    """A step in which some rank prefills costs every rank at least that rank's prefill-heavy time."""
    res = simulate(small(), "off")
    heavy = res.prefill_tokens > 0
    assert heavy.any() and (~heavy).any()
    assert np.median(res.step_time[heavy]) > 1.5 * np.median(res.step_time[~heavy])


def test_determinism_under_seed() -> None:
    a, b = simulate(small(), "any_at_cap"), simulate(small(), "any_at_cap")
    np.testing.assert_array_equal(a.step_time, b.step_time)
    np.testing.assert_array_equal(a.finish_t, b.finish_t)
    c = simulate(small("seed=1"), "any_at_cap")
    assert not np.array_equal(a.finish_t, c.finish_t)


def test_workload_independent_of_policy() -> None:
    a, b = simulate(small(), "off"), simulate(small(), "cadence")
    np.testing.assert_array_equal(a.prompt_len, b.prompt_len)
    np.testing.assert_array_equal(a.output_len, b.output_len)


class Spy:
    """Wraps a real policy and records every call."""

    name = "spy"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[list[RankCounts], int]] = []
        self.loads: list[GroupLoad | None] = []

    def decide(self, counts, step, load=None) -> GateDecision:
        self.calls.append((list(counts), step))
        self.loads.append(load)
        return self.inner.decide(counts, step, load)


def test_simulator_calls_the_real_policy_once_per_step() -> None:
    spy = Spy(make_policy("any_at_cap"))
    res = simulate(small(), spy)
    assert len(spy.calls) == res.steps
    assert [s for _, s in spy.calls] == list(range(res.steps))
    for counts, step in spy.calls:
        assert [c.rank for c in counts] == [0, 1, 2, 3]
        assert all(c.max_num_seqs == 6 and c.step == step for c in counts)
    # The snapshot the policy saw is the one recorded, and its decision was obeyed.
    np.testing.assert_array_equal(res.running, [[c.running for c in cs] for cs, _ in spy.calls])
    assert res.admitted[~res.admit].sum() == 0
    assert (~res.admit).any()


def test_simulator_passes_the_load_of_the_snapshots_it_decided_from() -> None:
    # A queue forms (16 requests at once for 4 x 2 slots), so the load is not trivially zero; the
    # engine's load at each step is what a fresh LoadWindow builds from the same snapshots.
    spy = Spy(make_policy("bounded_hold"))
    simulate(small("cluster.max_num_seqs=2", "workload.max_concurrency=null"), spy)
    window = LoadWindow()
    expected = [window.observe(counts, step) for counts, step in spy.calls]
    assert spy.loads == expected
    assert all(isinstance(x, GroupLoad) for x in spy.loads)
    assert max(x.queued_share for x in spy.loads) > 0


def test_simulate_by_name_uses_scheduler_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler.policy

    assert engine.make_policy is scheduler.policy.make_policy  # the product's, not a copy
    made = []

    def fake_make_policy(name, **params):
        made.append((name, params))
        return make_policy(name, **params)

    monkeypatch.setattr(engine, "make_policy", fake_make_policy)
    simulate(small(), "cadence")
    assert made == [("cadence", {"interval": 4})]  # the engine resolves the gate through make_policy
    import scheduler.policy

    assert engine.RankCounts is scheduler.policy.RankCounts


def test_closed_gate_blocks_admission() -> None:
    class Never:
        name = "never"

        def decide(self, counts, step, load=None):
            return GateDecision(step, step == 0, "only step 0")

    # With admission only at step 0, requests that were not admitted then can never run.
    with pytest.raises(RuntimeError, match="did not finish"):
        simulate(small(), Never(), max_steps=2000)


def test_expert_imbalance_raises_step_time() -> None:
    flat = simulate(small("experts.skew_sigma=0.0"), "off")
    skew = simulate(small("experts.skew_sigma=1.5"), "off")
    assert skew.moe_imbalance.mean() > flat.moe_imbalance.mean() + 0.2
    assert skew.step_time.sum() > flat.step_time.sum()


def test_calibrated_config_reproduces_the_row_it_was_fitted_on() -> None:
    """The shipped costs were fitted (benchmarks/sim_fit.py) to the seed's baseline row only: a change
    of the model or the costs that moves the simulated baseline off that row fails here."""
    cfg = load_config(DEFAULT_CONFIG)
    got = simulate(cfg, "off").metrics()
    for key in ("mean_ttft_ms", "mean_tpot_ms", "output_tok_s"):
        want = cfg.reference["baseline"][key]
        assert abs(got[key] / want - 1) < 0.10, (key, got[key], want)


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(load_config(None), ["costs.nope=1"])
    with pytest.raises(ValueError, match="divide evenly"):
        apply_overrides(load_config(None), ["cluster.num_ranks=3"])
    with pytest.raises(ValueError, match="quote 'off'"):
        apply_overrides(load_config(None), ["gate.policies=[off]"])


def test_cli_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "sim",
            "--config",
            str(DEFAULT_CONFIG),
            "--requests",
            "40",
            "--policies",
            "off",
            "any_at_cap",
            "--set",
            "workload.output_len=50",
            "--set",
            "workload.max_concurrency=16",
            "--set",
            "cluster.max_num_seqs=4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "Average TPOT" in text and "any_at_cap vs off" in text and "seed baseline" in text
    payload = json.loads(out.with_suffix(".json").read_text())
    assert set(payload["results"]) == {"off", "any_at_cap"}
    assert (tmp_path / "run_step_time.png").stat().st_size > 1000
    assert (tmp_path / "run_running.png").stat().st_size > 1000


def test_cli_bad_policy(capsys) -> None:
    assert main(["sim", "--requests", "8", "--policies", "bogus"]) == 2
    assert "unknown gate policy" in capsys.readouterr().err


def test_eplb_rebalances_with_the_real_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["experts.skew_sigma=1.2", "experts.drift_timescale_s=1e9", "eplb.interval_steps=50"]
    none = simulate(small(*common), "off")
    calls = []
    import eplb.policies

    real = eplb.policies.rebalance

    def spy(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    import cluster.sim.experts as experts_mod

    monkeypatch.setattr(experts_mod, "_load_eplb", lambda: (eplb.policies.POLICIES, spy))
    res = simulate(small(*common, "eplb.policy=deepseek", "experts.num_redundant=4"), "off")
    assert calls and set(calls) == {"deepseek"}
    assert res.eplb_rebalances >= 1 and res.eplb_moved_slots > 0
    assert (res.finish_count == 1).all()
    late = res.steps // 2
    assert res.moe_imbalance[late:].mean() < none.moe_imbalance[late:].mean()


def test_unknown_eplb_policy() -> None:
    with pytest.raises(ValueError, match="eplb.policy 'nope' unknown"):
        simulate(small("eplb.policy=nope"), "off")


@pytest.mark.parametrize("hold", [2, 5])
def test_bounded_hold_bound_is_honoured(hold: int) -> None:
    """Whenever some rank could admit (waiting and a free slot), the gate opens within max_hold_steps."""
    policy = make_policy("bounded_hold", max_hold_steps=hold, min_occupancy=0.0, quorum=1.0)
    res = simulate(small("cluster.num_ranks=4", "workload.max_concurrency=24"), policy)
    admissible = ((res.waiting > 0) & (res.running < 6)).any(axis=1)
    closed_run = 0
    longest = 0
    for can, admit in zip(admissible, res.admit, strict=True):
        closed_run = closed_run + 1 if can and not admit else 0
        longest = max(longest, closed_run)
    assert not res.admit.all(), "the gate never held, so the bound was never exercised"
    assert longest <= hold - 1


def test_burst_arrivals_come_in_groups() -> None:
    from cluster.sim.workload import make_requests

    cfg = small("workload.request_rate=5.0", "workload.burst_size=4", "workload.num_requests=10")
    ready = make_requests(cfg.workload, np.random.default_rng(0)).ready_t
    assert ready[0] == ready[3] < ready[4] == ready[7] < ready[8] == ready[9]


def test_output_len_range_ratio_spreads_outputs_only() -> None:
    from cluster.sim.workload import make_requests

    cfg = small("workload.len_range_ratio=0", "workload.output_len_range_ratio=0.2")
    reqs = make_requests(cfg.workload, np.random.default_rng(0))
    assert (reqs.prompt_len == 300).all()
    assert reqs.output_len.min() >= 32 and reqs.output_len.max() <= 48 and len(set(reqs.output_len)) > 1


@pytest.mark.parametrize("policy", ["off", "any_at_cap", "bounded_hold"])
def test_kv_pressure_preempts_and_conserves(policy: str) -> None:
    # 6 slots x (up to 450 prompt + 60 output) tokens need up to 3060 tokens of KV; 1200 forces preemption.
    cfg = small("cluster.kv_cache_tokens=1200")
    res = simulate(cfg, policy)
    assert res.preemptions > 0
    assert (res.finish_count == 1).all()
    assert res.output_tokens.sum() == res.output_len.sum()  # recomputed tokens are not emitted twice
    assert res.prefill_tokens.sum() > res.prompt_len.sum()  # the recompute is paid for
    assert (res.first_t >= res.send_t).all() and (res.finish_t >= res.first_t).all()
    unlimited = simulate(small(), policy)
    assert unlimited.preemptions == 0
    assert res.metrics()["duration_s"] > unlimited.metrics()["duration_s"]


def test_kv_cache_smaller_than_a_request_is_rejected() -> None:
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        small("cluster.kv_cache_tokens=100")


def test_gate_lag_decides_from_an_older_snapshot() -> None:
    seen: list[tuple[int, int]] = []

    class Spy:
        name = "spy"

        def decide(self, counts, step, load=None):  # noqa: ANN001, ANN202
            seen.append((step, counts[0].step))
            return GateDecision(step=step, admit=True, reason="spy")

    simulate(small("cluster.gate_lag_steps=2"), Spy(), max_steps=10_000)
    assert seen[0] == (0, 0) and seen[1] == (1, 0)
    assert all(step - snap == 2 for step, snap in seen[2:])


def test_dpserve_router_is_the_products_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """`router.kind: dpserve` routes every request through deployments.router.pick_rank, with the
    ingress's exact in-flight counts (waiting + running) as `dispatched`."""
    import deployments.router as product_router

    original = product_router.pick_rank
    spy_calls = []

    def recording_pick_rank(loads, live=None):
        spy_calls.append(dict(loads))
        return original(loads, live)

    monkeypatch.setattr(product_router, "pick_rank", recording_pick_rank)
    res = simulate(small("router.kind=dpserve", "router.stats_interval_s=0.2"), "off")
    assert len(spy_calls) == 80  # one call per request
    assert all(sorted(loads) == [0, 1, 2, 3] for loads in spy_calls)
    first = spy_calls[0]
    assert all(load == product_router.RankLoad() for load in first.values())  # nothing in flight yet
    assert any(
        load.dispatched > load.running + load.waiting for loads in spy_calls for load in loads.values()
    )
    assert res.steps > 0 and int(np.asarray(res.admitted).sum()) == 80
