"""EPLB actor as a real Ray actor against fake rank actors that serve a fixed skewed load and record
the plans they receive (a unit test of the controller; the real ranks are in test_eplb_e2e.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from eplb.actor import eplb_actor_class
from eplb.messages import PlanMessage
from eplb.plan import build_transfer_plan, validate_plan
from eplb.policies import default_placement
from eplb.stats import imbalance, rank_loads

LAYERS, EXPERTS, RANKS, REDUNDANT = 3, 8, 2, 2


class FakeRank:
    """Mimics DPRank's EPLB methods: a skewed window, a placement, and plan bookkeeping."""

    def __init__(
        self, rank: int, reject: bool = False, fail: bool = False, skew: bool = True, pending_polls: int = 0
    ) -> None:
        self.rank = rank
        self.pending_polls = pending_polls  # a staged plan's outcome appears at this outcome poll
        self.reject = reject
        self.fail = fail
        self.placement = default_placement(LAYERS, EXPERTS, RANKS, REDUNDANT)
        load = np.ones((LAYERS, EXPERTS))
        if skew:
            load[:, 2:4] = 50.0  # experts 2 and 3 (only on rank 0 by default) are hot
        self.load = load
        self.steps = 0
        self.plans: list[PlanMessage] = []
        self.history: list[dict] = []
        self.resets = 0
        self.outcome_polls = 0
        self.engine_outcome_polls = 0
        self.waits: list[float] = []
        self.status_calls = 0
        self.deferred: dict | None = None  # the outcome of a plan still "applying"

    def eplb_collect(self) -> dict:
        self.steps += 10
        # rank_load: what the rank's physical-slot counts give (here the even split of `load`).
        return {"rank": self.rank, "load": self.load.tolist(), "steps": self.steps, "complete": True,
                "rank_load": rank_loads(self.load, self.placement, RANKS).tolist()}  # fmt: skip

    def eplb_reset_window(self) -> None:
        self.resets += 1
        self.steps = 0

    def eplb_outcome_local(self, plan_id: int, wait_s: float = 0.0):
        self.waits.append(wait_s)
        """DPRank.eplb_outcome_local: the record from the worker's file, no engine call."""
        return self._outcome(plan_id)

    def _outcome(self, plan_id: int):
        self.outcome_polls += 1
        if self.deferred is not None and self.outcome_polls >= self.pending_polls:
            self.history.append(self.deferred)
            self.deferred = None
        return next((h for h in reversed(self.history) if h["plan_id"] == plan_id), None)

    def eplb_call(self, method: str, *args):
        if method == "eplb_placement":
            return self.placement.tolist()
        if method == "eplb_status":
            self.status_calls += 1
            return {
                "num_logical": EXPERTS,
                "ep_size": RANKS,
                "bytes_per_expert": 1000,
                "history": self.history,
            }
        if method == "eplb_outcome":
            self.engine_outcome_polls += 1
            return self._outcome(*args)
        if method == "eplb_stage":
            msg = PlanMessage.from_dict(args[0])  # the worker's decoding
            self.plans.append(msg)
            if self.reject:
                return {"accepted": False, "error": "fake rejection"}
            # The real applier validates before anything moves; so does the fake.
            old, new = np.asarray(msg.old), np.asarray(msg.new)
            validate_plan(build_transfer_plan(old, new, RANKS, EXPERTS), EXPERTS)
            outcome = "failed" if self.fail else "committed"
            if not self.fail:
                self.placement = new
            record = {"plan_id": msg.plan_id, "outcome": outcome, "remote_bytes": 1000,
                      "error": "fake transfer failure" if self.fail else None}  # fmt: skip
            self.outcome_polls = 0
            if self.pending_polls:
                self.deferred = record
            else:
                self.history.append(record)
            return {"accepted": True}
        if method == "eplb_abort":
            self.history.append({"plan_id": args[0], "outcome": "aborted"})
            return True
        raise AssertionError(method)

    def get_plans(self) -> list[dict]:
        return self.plans

    def get_resets(self) -> int:
        return self.resets

    def get_calls(self) -> dict:
        return {"outcome_polls": self.outcome_polls, "status_calls": self.status_calls,
                "engine_outcome_polls": self.engine_outcome_polls, "waits": self.waits}  # fmt: skip


@pytest.fixture
def fake_ranks(ray_local):
    import ray

    def make(**kw):
        cls = ray.remote(FakeRank)
        return [cls.remote(r, **kw) for r in range(RANKS)]

    return make


def _controller(ranks, **config):
    base = {"num_redundant": REDUNDANT, "window_steps": 20, "interval_s": 0.05, "policy": "deepseek"}
    return eplb_actor_class().remote(ranks, {**base, **config})


def test_plans_when_window_completes_and_pushes_to_every_rank(fake_ranks):
    import ray

    ranks = fake_ranks()
    ctl = _controller(ranks)
    ray.get(ctl.initialize.remote())
    assert ray.get(ctl.cycle.remote()) == "collecting"  # 10 steps < window_steps 20
    measured = ray.get(ctl.get_state.remote())["measured_imbalance"]  # from the ranks' rank_load
    skewed = np.ones((LAYERS, EXPERTS))
    skewed[:, 2:4] = 50.0  # FakeRank's load
    assert np.allclose(
        measured, imbalance(skewed, default_placement(LAYERS, EXPERTS, RANKS, REDUNDANT), RANKS)
    )
    assert ray.get(ctl.cycle.remote()) == "committed"
    plans = ray.get([r.get_plans.remote() for r in ranks])
    assert len(plans[0]) == 1 and plans[0] == plans[1]  # the same plan to every rank
    new = np.asarray(plans[0][0].new)
    load = np.ones((LAYERS, EXPERTS))
    load[:, 2:4] = 50.0
    cur = default_placement(LAYERS, EXPERTS, RANKS, REDUNDANT)
    assert (
        rank_loads(load, new, RANKS).max(axis=1).sum() < 0.95 * rank_loads(load, cur, RANKS).max(axis=1).sum()
    )
    state = ray.get(ctl.get_state.remote())
    assert state["rebalances"] == 1 and state["last_error"] is None
    assert (np.asarray(state["placement"]) == new).all()
    assert all(n == 1 for n in ray.get([r.get_resets.remote() for r in ranks]))
    # Now balanced: the next complete window gains nothing and commits nothing.
    ray.get(ctl.cycle.remote())
    assert ray.get(ctl.cycle.remote()) == "skipped_no_gain"
    assert len(ray.get(ranks[0].get_plans.remote())) == 1


def test_first_window_steps_brings_only_the_first_plan_forward(fake_ranks):
    """With `first_window_steps`, the first plan comes from a short window (eplb.pacing.plan_due);
    after a commit the windows are full `window_steps` again. `transfer` options go with each plan."""
    import ray

    ranks = fake_ranks()
    ctl = _controller(ranks, window_steps=30, first_window_steps=10, transfer={"fit_step": True})
    ray.get(ctl.initialize.remote())
    assert ray.get(ctl.cycle.remote()) == "committed"  # 10 steps: the warm-up window
    # The transfer options travel with the plan to every rank.
    assert [p.transfer for r in ranks for p in ray.get(r.get_plans.remote())] == [{"fit_step": True}] * 2
    assert [ray.get(ctl.cycle.remote()) for _ in range(2)] == ["collecting"] * 2  # 10, 20 < 30
    assert ray.get(ctl.cycle.remote()) == "skipped_no_gain"  # 30 steps: planned (balanced already)


def test_waits_for_a_plan_with_small_outcome_polls_at_the_configured_interval(fake_ranks):
    """While a plan applies, the actor asks each rank for that plan's record only, every poll_interval_s,
    with `eplb_outcome_local` (the rank reads the worker's file; an engine call would run on the engine's
    stepping thread), never the large full status."""
    import ray

    ranks = fake_ranks(pending_polls=4)  # the outcome appears at the 4th poll
    ctl = _controller(ranks, poll_interval_s=0.1)
    ray.get(ctl.initialize.remote())
    ray.get(ctl.cycle.remote())
    status_before = [c["status_calls"] for c in ray.get([r.get_calls.remote() for r in ranks])]
    t0 = time.monotonic()
    assert ray.get(ctl.cycle.remote()) == "committed"
    elapsed = time.monotonic() - t0
    calls = ray.get([r.get_calls.remote() for r in ranks])
    assert [c["outcome_polls"] for c in calls] == [4, 4]
    assert [c["engine_outcome_polls"] for c in calls] == [0, 0]  # the rank's local record, not the engine
    assert all(0 < w <= 5.0 for c in calls for w in c["waits"][-4:])  # each poll waits in the rank
    # One full status per rank before planning (is a plan pending?), none while waiting.
    assert [c["status_calls"] - b for c, b in zip(calls, status_before, strict=True)] == [1, 1]
    assert elapsed >= 3 * 0.1  # three sleeps between four polls
    assert ray.get(ctl.get_state.remote())["rebalances"] == 1


def test_background_thread_rebalances_and_state_answers(fake_ranks):
    import ray

    ranks = fake_ranks()
    ctl = _controller(ranks)
    ray.get(ctl.start.remote())
    deadline = time.monotonic() + 60  # liveness bounds, generous for a loaded 2-core box
    while ray.get(ctl.get_state.remote())["rebalances"] < 1:
        assert time.monotonic() < deadline, ray.get(ctl.get_state.remote())
        time.sleep(0.05)
    state = ray.get(ctl.get_state.remote())
    assert state["alive"] and state["imbalance"]["planned"] < state["imbalance"]["current"]
    ray.get(ctl.stop.remote())
    # Stopped, it cycles no more; started again, it does.
    cycles = ray.get(ctl.get_state.remote())["cycles"]
    time.sleep(0.3)
    assert ray.get(ctl.get_state.remote())["cycles"] == cycles
    ray.get(ctl.start.remote())
    while ray.get(ctl.get_state.remote())["cycles"] <= cycles:
        assert time.monotonic() < deadline + 60, "start() after stop() did not resume the cycles"
        time.sleep(0.05)
    ray.get(ctl.stop.remote())


def test_policy_that_raises_is_logged_skipped_and_reported(fake_ranks):
    import ray

    ranks = fake_ranks()
    ctl = _controller(ranks, policy="no_such_policy")
    ray.get(ctl.start.remote())
    deadline = time.monotonic() + 20
    while ray.get(ctl.get_state.remote())["policy_failures"] < 2:  # keeps running after a failure
        assert time.monotonic() < deadline
        time.sleep(0.05)
    state = ray.get(ctl.get_state.remote())
    assert state["alive"] and "no_such_policy" in state["last_error"] and state["rebalances"] == 0
    assert ray.get(ranks[0].get_plans.remote()) == []
    ray.get(ctl.stop.remote())


def test_rejected_or_failed_plans_keep_the_old_placement(fake_ranks):
    import ray

    for kw, outcome in (({"reject": True}, "rejected"), ({"fail": True}, "failed")):
        ranks = fake_ranks(**kw)
        ctl = _controller(ranks)
        ray.get(ctl.initialize.remote())
        ray.get(ctl.cycle.remote())
        assert ray.get(ctl.cycle.remote()) == outcome
        state = ray.get(ctl.get_state.remote())
        assert state["rebalances"] == 0 and state["plan_failures"] == 1
        assert (np.asarray(state["placement"]) == default_placement(LAYERS, EXPERTS, RANKS, REDUNDANT)).all()


def test_balanced_load_never_plans(fake_ranks):
    import ray

    ranks = fake_ranks(skew=False)
    ctl = _controller(ranks)
    ray.get(ctl.initialize.remote())
    results = [ray.get(ctl.cycle.remote()) for _ in range(4)]
    assert "committed" not in results and "skipped_no_gain" in results
    assert ray.get(ranks[0].get_plans.remote()) == []


def test_killed_actor_is_restarted_and_resumes_from_the_ranks(fake_ranks):
    """A crash (ray.kill with restart allowed): Ray re-creates the actor from its constructor
    arguments; it re-reads the ranks' placement and plan ids and runs its cycles again."""
    import ray

    ranks = fake_ranks()
    ctl = (
        eplb_actor_class()
        .options(max_restarts=-1)
        .remote(
            ranks,
            {
                "num_redundant": REDUNDANT,
                "window_steps": 20,
                "interval_s": 0.05,
                "policy": "deepseek",
                "resume_retry_s": 0.1,
            },  # fmt: skip
        )
    )
    ray.get(ctl.start.remote())
    deadline = time.monotonic() + 20
    while ray.get(ctl.get_state.remote())["rebalances"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    placement = ray.get(ranks[0].eplb_call.remote("eplb_placement"))
    t0 = time.monotonic()
    ray.kill(ctl, no_restart=False)
    while True:
        try:
            state = ray.get(ctl.get_state.remote(), timeout=5)
            if state["restarted"] and state["alive"]:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    print(f"\nEPLB actor back after {time.monotonic() - t0:.2f} s")
    assert state["placement"] == placement  # learnt from the ranks, not the default
    assert any(e["event"] == "resumed" for e in state["history"])
    # The fake load stays skewed but is balanced under the committed placement: the resumed actor
    # keeps pulling windows and deciding (no gain), and its plan ids stay above the ranks' history.
    while ray.get(ctl.get_state.remote())["skipped_no_gain"] < 1:
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    assert ray.get(ctl.get_state.remote())["rebalances"] == 0
    ray.get(ctl.stop.remote())
    ray.kill(ctl)
