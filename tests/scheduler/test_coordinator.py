"""BalanceCoordinator: one frozen decision per step for every rank, idle ranks, timeouts, metrics.

The state tests use an injected clock; the actor tests use real Ray actors (``ray_local``).
"""

from __future__ import annotations

import threading
import time

import pytest

from scheduler.coordinator import CoordinatorState
from scheduler.gate_report import GateReport
from scheduler.policy import GateDecision


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_decision_frozen_from_one_snapshot() -> None:
    clock = _Clock()
    st = CoordinatorState("any_at_cap", timeout_s=5, clock=clock)
    # Rank 0 reports step 3 first: decision for step 4 frozen from {rank0: 1/2} -> admit.
    (d0,), _ = st.report(GateReport(0, 0, 3, running=1, waiting=4, max_num_seqs=2, lead=1))
    # Rank 1 is at cap when it reports the same step, but the decision for step 4 is already frozen.
    (d1,), spread = st.report(GateReport(1, 0, 3, running=2, waiting=0, max_num_seqs=2, lead=1))
    assert d0 is d1 and d0.admit
    # The next step sees rank 1 at cap: closed for everyone.
    (e0,), first = st.report(GateReport(1, 0, 4, running=2, waiting=0, max_num_seqs=2, lead=1))
    clock.t += 0.002
    (e1,), spread = st.report(GateReport(0, 0, 4, running=1, waiting=3, max_num_seqs=2, lead=1))
    assert e0 is e1 and not e0.admit
    # The gather of step 4 completes with the second live rank: spread first -> last report.
    assert first is None and spread == pytest.approx(2.0)
    assert st.closed_steps == 1 and st.decided_steps == 2


def test_idle_rank_and_stale_rank_excluded_after_timeout() -> None:
    clock = _Clock()
    st = CoordinatorState("any_at_cap", timeout_s=1.0, clock=clock)
    st.report(
        GateReport(0, 0, 1, running=2, waiting=1, max_num_seqs=2)
    )  # rank 0 at cap, then stops reporting
    (d,), _ = st.report(
        GateReport(1, 0, 1, running=0, waiting=0, max_num_seqs=2)
    )  # idle rank keeps reporting
    assert not d.admit
    clock.t += 1.5
    (d,), _ = st.report(GateReport(1, 0, 2, running=0, waiting=3, max_num_seqs=2))
    assert d.admit, "a silent rank must not hold the gate closed past the timeout"
    assert st.stats()["live_ranks"] == [1]
    assert st.load_scores() == {1: 1.5}
    # It comes back: included again.
    st.report(GateReport(0, 0, 3, running=2, waiting=0, max_num_seqs=2))
    assert st.stats()["live_ranks"] == [0, 1]


def test_set_policy_at_run_time() -> None:
    st = CoordinatorState("off", clock=_Clock())
    st.report(GateReport(0, 0, 0, running=2, waiting=0, max_num_seqs=2))
    assert st.decide((0, 1)).admit
    st.set_policy("cadence", interval=4)
    assert not st.decide((0, 5)).admit and st.decide((0, 8)).admit
    assert st.decide((0, 1)).admit  # already frozen under the old policy: unchanged
    with pytest.raises(ValueError):
        st.set_policy("cadence", period=3)
    assert st.policy_name == "cadence"


@pytest.fixture
def coordinator(ray_local):
    from scheduler.coordinator import get_or_create_coordinator

    name = f"test_coord_{time.monotonic_ns()}"
    actor = get_or_create_coordinator(name, "dpserve_test", "any_at_cap", None, timeout_s=0.5)
    yield actor, name
    ray_local.kill(actor)


def test_actor_ranks_get_identical_decisions(coordinator, ray_local) -> None:
    """Two ranks report concurrently (threads, like two engine processes) for 60 steps with loads
    that cross the cap; for every step both receive the same decision."""
    actor, _ = coordinator
    got: dict[int, dict[int, bool]] = {0: {}, 1: {}}

    def rank_loop(rank: int) -> None:
        for step in range(1, 61):
            running = 4 if (rank == 0 and (step // 7) % 2) else step % 3  # rank 0 hits the cap at times
            ref = actor.report.remote(GateReport(rank, 0, step, running, 2, 4, 1))
            (got[rank][step + 1],) = ray_local.get(ref)

    threads = [threading.Thread(target=rank_loop, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got[0] == got[1]
    assert not all(got[0].values()) and any(got[0].values())
    frozen = ray_local.get(actor.get_decisions.remote())
    assert all(frozen[(0, s)] == a for s, a in got[0].items())


def test_actor_silent_rank_does_not_stall_others(coordinator, ray_local) -> None:
    actor, _ = coordinator
    ray_local.get(actor.report.remote(GateReport(0, 0, 1, 4, 0, 4, 1)))
    # Rank 0 (at cap) goes silent; rank 1 keeps stepping and is answered at once.
    t0 = time.monotonic()
    assert ray_local.get(actor.report.remote(GateReport(1, 0, 1, 0, 2, 4, 1)))[0] is False
    time.sleep(0.7)
    assert ray_local.get(actor.report.remote(GateReport(1, 0, 2, 0, 2, 4, 1)))[0] is True
    assert time.monotonic() - t0 < 20  # answered without waiting for the silent rank
    stats = ray_local.get(actor.get_stats.remote())
    assert stats["live_ranks"] == [1] and stats["ranks"][0]["live"] is False
    assert ray_local.get(actor.get_load_scores.remote()) == {1: 0.5}


def test_actor_set_policy_and_reuse_by_name(coordinator, ray_local) -> None:
    from scheduler.coordinator import get_or_create_coordinator

    actor, name = coordinator
    again = get_or_create_coordinator(name, "dpserve_test", "cadence", {"interval": 3}, timeout_s=0.5)
    assert ray_local.get(again.get_stats.remote())["policy"] == "cadence"
    assert ray_local.get(actor.get_stats.remote())["policy"] == "cadence"  # the same actor
    with pytest.raises(Exception, match="unknown gate policy"):
        ray_local.get(actor.set_policy.remote("nope"))


def test_ray_gate_client_pipelines(coordinator, ray_local) -> None:
    """The engine-side client: report at step n returns the decision for n + lead, read later."""
    from scheduler.balance_scheduler import BalanceConfig, RayGateClient

    _, name = coordinator
    client = RayGateClient(BalanceConfig(coordinator_name=name, namespace="dpserve_test", lead=1), rank=0)
    client.report((0, 1), running=4, waiting=1, max_num_seqs=4, lead=1)
    assert client.decision((0, 1), 0.0) is None  # nothing was asked for step 1
    assert client.decision((0, 2), 2.0) is False  # at cap -> closed at step 2
    client.report((0, 2), running=1, waiting=1, max_num_seqs=4, lead=1)
    assert client.decision((0, 3), 2.0) is True
    assert client.calls == 2 and client.client_s > 0


def test_report_freezes_horizon_steps_from_one_snapshot() -> None:
    clock = _Clock()
    st = CoordinatorState("any_at_cap", clock=clock)
    span0, _ = st.report(GateReport(0, 0, 4, running=2, waiting=0, max_num_seqs=2, lead=1, horizon=4))
    assert [d.step for d in span0] == [5, 6, 7, 8] and not any(d.admit for d in span0)
    # Rank 1 reports the same aligned step with a different view: it gets the frozen span.
    span1, _ = st.report(GateReport(1, 0, 4, running=0, waiting=0, max_num_seqs=2, lead=1, horizon=4))
    assert span1 == span0


def test_decisions_read_the_load_of_earlier_snapshots() -> None:
    # Two ranks of 4 slots. While the group queues (5 waiting > 1 free) the window fills; after the
    # queue is gone, the decision for step 48 from a calm snapshot (1 waiting, 1 free, 1 of 2 ranks
    # ready) is "loaded": 48 is not on the 32-step bound and both ranks must be ready. The same
    # snapshot in a new wave (history reset) opens on the plain 8-step bound.
    st = CoordinatorState("bounded_hold", {"min_occupancy": 0.0}, clock=_Clock())
    calm = [(3, 1), (4, 0)]

    def step(wave: int, n: int, counts: list[tuple[int, int]]) -> GateDecision:
        for rank, (running, waiting) in enumerate(counts):
            (d,), _ = st.report(GateReport(rank, wave, n, running=running, waiting=waiting, max_num_seqs=4))
        return d

    for n in range(40):
        step(0, n, [(3, 3), (4, 2)])
    assert st.stats()["queued_share"] == pytest.approx(1.0)
    for n in range(40, 47):
        step(0, n, calm)
    held = step(0, 47, calm)
    assert held.step == 48 and not held.admit, held.reason
    assert held.reason.endswith("loaded: queued at 97% of recent steps"), held.reason
    assert 0.9 < st.stats()["queued_share"] < 1.0
    for n in range(40, 47):
        step(1, n, calm)
    fresh = step(1, 47, calm)
    assert fresh.admit and fresh.reason == "hold bound: step 48 on 8-step deadline", fresh.reason
    assert st.stats()["queued_share"] == 0.0
    st.reset()
    assert st.load_window.load.steps == 0


def test_ray_gate_client_horizon(coordinator, ray_local) -> None:
    from scheduler.balance_scheduler import BalanceConfig, RayGateClient

    actor, name = coordinator
    ray_local.get(actor.set_policy.remote("cadence", {"interval": 2}))
    client = RayGateClient(
        BalanceConfig(coordinator_name=name, namespace="dpserve_test", lead=1, horizon=4), rank=0
    )
    client.report((0, 4), running=0, waiting=1, max_num_seqs=4, lead=1)
    assert client.calls == 1
    assert [client.decision((0, s), 2.0) for s in (5, 6, 7, 8)] == [False, True, False, True]
    assert client.decision((0, 9), 0.0) is None


def test_actor_restart_keeps_run_time_policy_and_timeout(coordinator, ray_local) -> None:
    """A run-time set_policy / set_timeout survives a Ray restart of the actor (max_restarts=-1):
    the restarted actor decides with the policy set last, not the one it was created with. A new
    actor created later under the same name does not inherit it."""
    from scheduler.coordinator import BalanceCoordinator

    actor, name = coordinator  # created with any_at_cap, timeout 0.5
    ray_local.get([actor.set_policy.remote("cadence", {"interval": 3}), actor.set_timeout.remote(7.0)])
    old_address = ray_local.get(actor.zmq_address.remote())
    ray_local.kill(actor, no_restart=False)
    deadline = time.monotonic() + 60
    while True:  # calls fail while the actor is down
        try:
            stats = ray_local.get(actor.get_stats.remote(), timeout=5)
            if stats["zmq_address"] != old_address:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "the coordinator was not restarted"
        time.sleep(0.1)
    assert (stats["policy"], stats["params"]) == ("cadence", {"interval": 3}), stats
    assert stats["decided_steps"] == 0  # a restarted actor: empty state
    # Decisions come from the restored policy object (cadence 3), not only its name: a rank well
    # under its cap is closed off cadence (any_at_cap would admit it).
    decisions = [ray_local.get(actor.report.remote(GateReport(0, 0, s, 0, 1, 4, 1)))[0] for s in range(5)]
    assert decisions == [False, False, True, False, False]
    # The restored timeout (7 s, not 0.5 s): a rank silent for 1 s is still live.
    time.sleep(1.0)
    assert ray_local.get(actor.get_stats.remote())["live_ranks"] == [0]

    # Killed for good, then a new actor under the same name: its own creation policy.
    ray_local.kill(actor)
    deadline = time.monotonic() + 30
    while True:
        try:
            fresh = (
                ray_local.remote(BalanceCoordinator)
                .options(name=name, namespace="dpserve_test", num_cpus=0, max_restarts=-1)
                .remote("off", None, 0.5)
            )
            break
        except ValueError:  # the name is freed a moment after the kill
            assert time.monotonic() < deadline
            time.sleep(0.1)
    try:
        assert ray_local.get(fresh.get_stats.remote())["policy"] == "off"
    finally:
        ray_local.kill(fresh)


def test_a_second_group_start_keeps_the_coordinator_alive(ray_local) -> None:
    """Each group start (the first, then every re-formation) calls get_or_create_coordinator; the
    actor must survive the calls after the first, which get it through get_if_exists."""
    import gc

    from scheduler.coordinator import get_or_create_coordinator, release_coordinator

    name = f"test_keep_{time.monotonic_ns()}"
    first = get_or_create_coordinator(name, "dpserve_test", "any_at_cap", None, 5.0)
    actor_id = first._actor_id
    del first
    try:
        for _ in range(3):  # re-formations
            assert (
                get_or_create_coordinator(name, "dpserve_test", "any_at_cap", None, 5.0)._actor_id == actor_id
            )
            gc.collect()
        time.sleep(1.0)  # an actor whose last owning handle went is killed within moments
        again = ray_local.get_actor(name, namespace="dpserve_test")
        assert again._actor_id == actor_id and ray_local.get(again.ping.remote(), timeout=30)
    finally:
        release_coordinator(name, "dpserve_test")
