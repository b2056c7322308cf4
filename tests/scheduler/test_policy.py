"""Table-driven tests for the pure prefill gate policies."""

from __future__ import annotations

import math

import pytest

from scheduler.policy import (
    POLICIES,
    GateDecision,
    GatePolicy,
    GroupLoad,
    LoadWindow,
    RankCounts,
    make_policy,
)


def _snap(*running: int, cap: int = 4, waiting: int = 1) -> list[RankCounts]:
    return [RankCounts(rank=i, running=r, waiting=waiting, max_num_seqs=cap) for i, r in enumerate(running)]


# (policy name, params, running counts per rank (cap 4), step, expected admit)
CASES = [
    ("off", {}, (4, 4, 4), 0, True),
    ("off", {}, (0, 0), 7, True),
    ("any_at_cap", {}, (3, 3, 3), 0, True),
    ("any_at_cap", {}, (3, 4, 0), 0, False),
    ("any_at_cap", {}, (4, 4, 4), 0, False),
    ("any_at_cap", {}, (5, 0), 0, False),  # over cap (e.g. after a config change) also closes
    ("any_at_cap", {}, (0, 0, 0), 0, True),
    ("max_minus_one", {}, (2, 2), 0, True),
    ("max_minus_one", {}, (2, 3), 0, False),
    ("max_minus_one", {}, (4, 0), 0, False),
    ("cadence", {"interval": 3}, (4, 4), 0, True),
    ("cadence", {"interval": 3}, (0, 0), 1, False),
    ("cadence", {"interval": 3}, (0, 0), 2, False),
    ("cadence", {"interval": 3}, (0, 0), 3, True),
    ("cadence", {"interval": 1}, (0, 0), 5, True),
    ("cadence", {}, (0, 0), 1, False),  # default interval 2
]


@pytest.mark.parametrize(("name", "params", "running", "step", "admit"), CASES)
def test_decide_table(name: str, params: dict, running: tuple[int, ...], step: int, admit: bool) -> None:
    policy = make_policy(name, **params)
    decision = policy.decide(_snap(*running), step)
    assert isinstance(decision, GateDecision)
    assert decision.admit is admit
    assert decision.step == step
    assert decision.reason


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_empty_snapshot_admits(name: str) -> None:
    decision = make_policy(name).decide([], 1)
    assert decision.admit is True
    assert "no live ranks" in decision.reason


def test_per_rank_caps_are_respected() -> None:
    counts = [
        RankCounts(rank=0, running=8, waiting=0, max_num_seqs=16),
        RankCounts(rank=1, running=4, waiting=2, max_num_seqs=4),
    ]
    assert make_policy("any_at_cap").decide(counts, 0).admit is False
    counts[1] = RankCounts(rank=1, running=3, waiting=2, max_num_seqs=4)
    assert make_policy("any_at_cap").decide(counts, 0).admit is True
    assert make_policy("max_minus_one").decide(counts, 0).admit is False


def test_reason_names_the_full_rank() -> None:
    decision = make_policy("any_at_cap").decide(_snap(1, 4, 2), 9)
    assert "rank 1" in decision.reason and "4/4" in decision.reason


def test_deterministic_and_order_independent() -> None:
    policy = make_policy("any_at_cap")
    snap = _snap(3, 4, 1)
    assert policy.decide(snap, 2) == policy.decide(snap, 2)
    assert policy.decide(snap, 2).admit == policy.decide(list(reversed(snap)), 2).admit


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_satisfy_protocol(name: str) -> None:
    policy = make_policy(name)
    assert isinstance(policy, GatePolicy)
    assert policy.name == name


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("nope", {}, "unknown gate policy 'nope'.*any_at_cap"),
        ("off", {"interval": 2}, "unknown parameter.*interval"),
        ("any_at_cap", {"slack": 1}, "unknown parameter.*slack"),
        ("cadence", {"interval": 0}, "interval must be an integer >= 1"),
        ("cadence", {"interval": 1.5}, "interval must be an integer >= 1"),
        ("cadence", {"interval": True}, "interval must be an integer >= 1"),
        ("cadence", {"every": 2}, "accepted: interval"),
    ],
)
def test_bad_names_and_params(name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_policy(name, **params)


def test_registry_names() -> None:
    assert set(POLICIES) == {"off", "any_at_cap", "max_minus_one", "cadence", "bounded_hold"}


def _counts(*ranks: tuple[int, int], cap: int = 4) -> list[RankCounts]:
    """Ranks as (running, waiting) pairs with a shared cap."""
    return [RankCounts(rank=i, running=r, waiting=w, max_num_seqs=cap) for i, (r, w) in enumerate(ranks)]


FULL = (4, 0)  # at cap, nothing waiting
READY = (3, 1)  # a free slot and a waiting request
BLOCKED = (4, 2)  # waiting, but no free slot

# (params, ranks as (running, waiting), step, expected admit, expected reason prefix)
HOLD_CASES = [
    # Rule 1: nothing admissible keeps the gate closed, even on the deadline step.
    ({}, (FULL, FULL, BLOCKED, FULL), 8, False, "no rank"),
    # Rule 2, the hold bound: below quorum and above the occupancy threshold, only the deadline opens.
    ({}, (READY, FULL, FULL, FULL), 1, False, "holding"),
    ({}, (READY, FULL, FULL, FULL), 7, False, "holding"),
    ({}, (READY, FULL, FULL, FULL), 8, True, "hold bound"),
    ({}, (READY, FULL, FULL, FULL), 16, True, "hold bound"),
    ({"max_hold_steps": 3}, (READY, FULL, FULL, FULL), 2, False, "holding"),
    ({"max_hold_steps": 3}, (READY, FULL, FULL, FULL), 3, True, "hold bound"),
    ({"max_hold_steps": 1}, (READY, FULL, FULL, FULL), 5, True, "hold bound"),
    # Rule 3, quorum: ceil(0.5 * 4) = 2 ready ranks open early; blocked ranks do not count.
    ({}, (READY, READY, FULL, FULL), 1, True, "quorum"),
    ({}, (READY, BLOCKED, BLOCKED, FULL), 1, False, "holding"),
    ({"quorum": 1.0, "min_occupancy": 0.0}, (READY, READY, READY, FULL), 1, False, "holding"),
    ({"quorum": 1.0}, (READY, READY, READY, READY), 1, True, "quorum"),
    ({"quorum": 0.2}, (READY, FULL, FULL, FULL), 1, False, "holding"),  # at least two ranks
    ({"quorum": 0.2}, (READY, READY, FULL, FULL), 1, True, "quorum"),
    ({"min_occupancy": 0.0}, (READY, FULL), 1, False, "holding"),  # two ranks: both must be ready
    ({"min_occupancy": 0.0}, (READY, READY), 1, True, "quorum"),
    # Rule 4, the saturation guard: 14 of 16 slots running is below 0.9 of them (14.4), 15 is not.
    ({}, ((3, 1), (4, 0), (4, 0), (3, 0)), 1, True, "saturation guard"),
    ({}, ((3, 1), (4, 0), (4, 0), (4, 0)), 1, False, "holding"),
    ({"min_occupancy": 0.5}, ((3, 1), (2, 0), (1, 0), (1, 0)), 1, True, "saturation guard"),  # 7 < 8
    ({"min_occupancy": 0.5}, ((3, 1), (2, 0), (2, 0), (1, 0)), 1, False, "holding"),  # 8 of 16: not below
    ({"min_occupancy": 0.0}, ((1, 1), (0, 0), (0, 0), (0, 0)), 1, False, "holding"),
    ({"min_occupancy": 1.0}, (READY, FULL, FULL, FULL), 1, True, "saturation guard"),
    # An idle group starts at once (guard), and a single-rank group is its own quorum.
    ({}, ((0, 3), (0, 0), (0, 0), (0, 0)), 3, True, "saturation guard"),
    ({"min_occupancy": 0.0}, ((3, 1),), 5, True, "quorum"),
    # The queue extension: more waiting than free slots (2 > 1 here) stretches the bound to
    # max_hold_steps * queue_hold_factor (8 * 4 = 32) ...
    ({}, ((3, 2), FULL, FULL, FULL), 8, False, "holding"),
    ({}, ((3, 2), FULL, FULL, FULL), 24, False, "holding"),
    ({}, ((3, 2), FULL, FULL, FULL), 32, True, "hold bound"),
    ({"max_hold_steps": 3}, ((3, 2), FULL, FULL, FULL), 6, False, "holding"),
    ({"max_hold_steps": 3}, ((3, 2), FULL, FULL, FULL), 12, True, "hold bound"),
    ({"queue_hold_factor": 2}, ((3, 2), FULL, FULL, FULL), 8, False, "holding"),
    ({"queue_hold_factor": 2}, ((3, 2), FULL, FULL, FULL), 16, True, "hold bound"),
    ({"queue_hold_factor": 1}, ((3, 2), FULL, FULL, FULL), 8, True, "hold bound"),  # extension off
    # ... but as many waiting as free slots is no queue (1 = 1): the plain bound applies.
    ({}, ((3, 1), FULL, FULL, FULL), 8, True, "hold bound"),
    # A rank over its cap frees no slot for the others: 1 free slot, 1 waiting, no queue.
    ({}, ((5, 0), (3, 1), FULL, FULL), 8, True, "hold bound"),
    # While queued the quorum is every live rank: 3 of 4 ready (8 waiting > 3 free) holds, 4 opens;
    # without the queue (3 waiting, 3 free) 3 of 4 is over the usual quorum of 2.
    ({"min_occupancy": 0.0}, ((3, 2), (3, 2), (3, 2), (4, 2)), 1, False, "holding"),
    ({"min_occupancy": 0.0}, ((3, 2), (3, 2), (3, 2), (3, 2)), 1, True, "quorum"),
    ({"min_occupancy": 0.0}, ((3, 1), (3, 1), (3, 1), FULL), 1, True, "quorum"),
    ({"min_occupancy": 0.0, "queue_hold_factor": 1}, ((3, 2), (3, 2), (3, 2), (4, 2)), 1, True, "quorum"),
    # The saturation guard still opens a queued group with idle slots (a burst into a quiet group).
    ({}, ((0, 20), FULL, FULL, FULL), 1, True, "saturation guard"),
]


@pytest.mark.parametrize(("params", "ranks", "step", "admit", "reason"), HOLD_CASES)
def test_bounded_hold_table(
    params: dict, ranks: tuple[tuple[int, int], ...], step: int, admit: bool, reason: str
) -> None:
    decision = make_policy("bounded_hold", **params).decide(_counts(*ranks), step)
    assert decision.admit is admit, decision.reason
    assert decision.step == step
    assert decision.reason.startswith(reason), decision.reason


@pytest.mark.parametrize("hold", [1, 2, 5, 8, 13])
def test_bounded_hold_never_holds_past_the_bound(hold: int) -> None:
    # A snapshot the gate would hold forever without the bound: one ready rank, the group full.
    policy = make_policy("bounded_hold", max_hold_steps=hold)
    snap = _counts(READY, FULL, FULL, FULL, FULL, FULL)
    opens = [s for s in range(200) if policy.decide(snap, s).admit]
    assert opens, "the gate never opened"
    # Any request that could be admitted at step s is admitted within max_hold_steps - 1 steps.
    gaps = [b - a for a, b in zip([-1, *opens], [*opens, 200], strict=True)]
    assert max(gaps) <= hold


LOADED = GroupLoad(queued_share=0.05, steps=100)  # queued at 5 % of recent steps: the default threshold
QUIET = GroupLoad(queued_share=0.049, steps=100)
NO_HISTORY = GroupLoad(queued_share=1.0, steps=0)

# The load signal: (params, load, ranks as (running, waiting), step, expected admit, reason prefix).
# The snapshots do not queue (waiting <= free slots), so only the load can make the group loaded.
LOAD_CASES = [
    # Loaded: the bound stretches to 8 * 4 = 32 and the quorum to every live rank.
    ({}, LOADED, (READY, FULL, FULL, FULL), 8, False, "holding"),
    ({}, LOADED, (READY, FULL, FULL, FULL), 31, False, "holding"),
    ({}, LOADED, (READY, FULL, FULL, FULL), 32, True, "hold bound"),
    ({"min_occupancy": 0.0}, LOADED, (READY, READY, READY, FULL), 1, False, "holding"),
    ({}, LOADED, (READY, READY, READY, READY), 1, True, "quorum"),
    # Just under the threshold, no history, the signal off, or the extension off: the plain row.
    ({}, QUIET, (READY, FULL, FULL, FULL), 8, True, "hold bound"),
    ({}, QUIET, (READY, READY, FULL, FULL), 1, True, "quorum"),
    ({}, NO_HISTORY, (READY, FULL, FULL, FULL), 8, True, "hold bound"),
    ({}, None, (READY, FULL, FULL, FULL), 8, True, "hold bound"),
    ({"load_queue_share": 0.0}, LOADED, (READY, FULL, FULL, FULL), 8, True, "hold bound"),
    ({"queue_hold_factor": 1}, LOADED, (READY, FULL, FULL, FULL), 8, True, "hold bound"),
    ({"load_queue_share": 0.5}, LOADED, (READY, READY, FULL, FULL), 1, True, "quorum"),
    ({"min_occupancy": 0.0}, GroupLoad(0.5, 10), (READY, READY, FULL, FULL), 1, False, "holding"),
    # Rule 1 still first, and the saturation guard still opens a loaded group with idle slots.
    ({}, LOADED, (FULL, FULL, BLOCKED, FULL), 32, False, "no rank"),
    ({}, LOADED, ((0, 1), FULL, FULL, FULL), 1, True, "saturation guard"),
    # A queue in the snapshot makes the group loaded whatever the history says.
    ({}, GroupLoad(0.0, 100), ((3, 2), FULL, FULL, FULL), 8, False, "holding"),
]


def test_bounded_hold_loaded_reason_shows_the_share() -> None:
    held = make_policy("bounded_hold").decide(_counts(READY, FULL, FULL, FULL), 5, LOADED)
    assert (
        held.reason
        == "holding: 1/4 ranks ready (need 4), 15/16 slots running; loaded: queued at 5% of recent steps"
    )


@pytest.mark.parametrize("name", ["off", "any_at_cap", "max_minus_one", "cadence"])
def test_other_policies_ignore_the_load(name: str) -> None:
    policy = make_policy(name)
    snap = _counts(READY, FULL, (4, 3), READY)
    for step in range(6):
        assert policy.decide(snap, step, LOADED) == policy.decide(snap, step)


@pytest.mark.parametrize("hold", [1, 3, 8])
def test_bounded_hold_loaded_bound(hold: int) -> None:
    # Loaded without a queue in the snapshot, held by the quorum: opens exactly every hold * 4 steps.
    policy = make_policy("bounded_hold", max_hold_steps=hold)
    snap = _counts(READY, FULL, FULL, FULL)
    opens = [s for s in range(200) if policy.decide(snap, s, LOADED).admit]
    assert opens == list(range(0, 200, hold * 4))


QUEUED = _counts((3, 2), FULL, FULL, FULL)  # 2 waiting > 1 free slot
CALM = _counts(READY, FULL, FULL, FULL)  # 1 waiting, 1 free slot


def test_load_window_average_and_decay() -> None:
    w = LoadWindow(window_steps=10)
    assert w.load == GroupLoad(0.0, 0)
    assert w.observe(QUEUED, 0) == GroupLoad(1.0, 1)  # the first snapshot is the whole history
    # Ten steps later a calm snapshot weighs 1 - exp(-1) of the average.
    assert w.observe(CALM, 10).queued_share == pytest.approx(math.exp(-1))
    # A snapshot for a step already observed (a horizon's later steps, a late decision) adds nothing.
    assert w.observe(QUEUED, 10).queued_share == pytest.approx(math.exp(-1))
    assert w.observe(QUEUED, 3).queued_share == pytest.approx(math.exp(-1))
    assert w.load.steps == 4
    assert w.observe([], 11) == w.load  # an empty snapshot (no live rank) is no evidence
    w.reset()
    assert w.load == GroupLoad(0.0, 0)


def test_load_window_counts_steps_not_calls() -> None:
    # One snapshot every 4 steps (horizon 4) reaches the same share as one every step.
    a, b = LoadWindow(window_steps=16), LoadWindow(window_steps=16)
    for s in range(0, 64):
        a.observe(QUEUED if s < 32 else CALM, s)
    for s in range(0, 64, 4):
        b.observe(QUEUED if s < 32 else CALM, s)
    assert b.load.queued_share == pytest.approx(a.load.queued_share, rel=0.15)
    assert 0 < a.load.queued_share < 1


def test_load_window_share_of_queued_steps() -> None:
    # Queued on one step in 10, for many windows: the share settles near 10 %.
    w = LoadWindow(window_steps=256)
    for s in range(5000):
        w.observe(QUEUED if s % 10 == 0 else CALM, s)
    assert w.load.queued_share == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("window", [0, -1, 2.5, True])
def test_load_window_rejects_bad_window(window: object) -> None:
    with pytest.raises(ValueError, match="window_steps"):
        LoadWindow(window_steps=window)  # type: ignore[arg-type]


@pytest.mark.parametrize(("hold", "factor"), [(1, 4), (2, 4), (8, 4), (3, 2), (8, 1)])
def test_bounded_hold_queue_bound(hold: int, factor: int) -> None:
    # A queued snapshot (7 waiting, 1 free slot) held by the quorum: the gate opens exactly on the
    # multiples of the stretched bound, so an admissible request waits at most hold * factor - 1 steps.
    policy = make_policy("bounded_hold", max_hold_steps=hold, queue_hold_factor=factor)
    snap = _counts((3, 2), BLOCKED, BLOCKED, (4, 1))
    opens = [s for s in range(200) if policy.decide(snap, s).admit]
    assert opens == list(range(0, 200, hold * factor))


def test_bounded_hold_queue_reason_shows_the_counts() -> None:
    decision = make_policy("bounded_hold").decide(_counts((3, 2), FULL, FULL, FULL), 5)
    assert decision.admit is False
    assert (
        decision.reason
        == "holding: 1/4 ranks ready (need 4), 15/16 slots running; queue: 2 waiting > 1 free slots"
    )
    opened = make_policy("bounded_hold").decide(_counts((3, 2), FULL, FULL, FULL), 64)
    assert opened.reason == "hold bound: step 64 on 32-step deadline; queue: 2 waiting > 1 free slots"


def test_bounded_hold_uses_each_ranks_own_cap() -> None:
    counts = [
        RankCounts(rank=0, running=8, waiting=1, max_num_seqs=16),  # ready under its own cap
        RankCounts(rank=1, running=4, waiting=1, max_num_seqs=4),  # blocked
    ]
    policy = make_policy("bounded_hold", min_occupancy=0.0)
    held = policy.decide(counts, 1)
    assert held.admit is False and held.reason.startswith("holding: 1/2 ranks ready"), held.reason
    counts.append(RankCounts(rank=2, running=3, waiting=1, max_num_seqs=4))
    assert policy.decide(counts, 1).admit is True


@pytest.mark.parametrize(
    "params",
    [
        {"max_hold_steps": 0},
        {"max_hold_steps": 2.5},
        {"max_hold_steps": True},
        {"quorum": 0},
        {"quorum": 1.5},
        {"quorum": "half"},
        {"min_occupancy": -0.1},
        {"min_occupancy": 1.1},
        {"queue_hold_factor": 0},
        {"queue_hold_factor": 2.0},
        {"queue_hold_factor": True},
        {"load_queue_share": -0.1},
        {"load_queue_share": 1.5},
        {"load_queue_share": True},
        {"load_prefill_share": -0.1},
        {"load_prefill_share": 1.5},
        {"load_prefill_share": True},
        {"load_arrival_rate": -0.01},
        {"load_arrival_rate": math.inf},
        {"load_arrival_rate": True},
        {"load_arrival_rate": "fast"},
    ],
)
def test_bounded_hold_rejects_bad_params(params: dict) -> None:
    with pytest.raises(ValueError, match="bounded_hold"):
        make_policy("bounded_hold", **params)


def test_bounded_hold_rejects_unknown_param() -> None:
    with pytest.raises(
        ValueError,
        match=(
            "accepted: load_arrival_rate, load_prefill_share, load_queue_share, max_hold_steps, min_occupancy,"
            " queue_hold_factor, quorum"
        ),
    ):
        make_policy("bounded_hold", interval=4)


def _at(step: int, *ranks: tuple[int, int], cap: int = 4) -> list[RankCounts]:
    """Ranks as (running, waiting) pairs with a shared cap, counted at ``step``."""
    return [RankCounts(i, r, w, cap, step) for i, (r, w) in enumerate(ranks)]


# The busy signals from one change between two snapshots: (before, after, step gap, admitted, arrivals per step).
CHANGE_CASES = [
    (((2, 0), (2, 0)), ((2, 2), (2, 0)), 1, False, 2.0),  # two requests join rank 0's queue
    (((2, 2), (2, 0)), ((4, 0), (2, 0)), 1, True, 0.0),  # rank 0 admits both
    (((2, 1), (2, 0)), ((3, 1), (2, 0)), 1, True, 0.0),  # admits one, one arrives: net 0, a lower bound
    (((2, 1), (2, 0)), ((1, 1), (2, 0)), 1, False, 0.0),  # a finish is no admission
    (((2, 1), (2, 0)), ((3, 0), (2, 1)), 1, True, 1.0),  # one rank admits while another receives
    (((2, 0), (2, 0)), ((2, 2), (2, 0)), 4, False, 0.5),  # two arrivals over four steps
    (((2, 0),), ((2, 1), (0, 3)), 1, False, 1.0),  # a rank that joins brings no arrivals
]


@pytest.mark.parametrize(("before", "after", "gap", "admitted", "rate"), CHANGE_CASES)
def test_load_window_busy_signals_from_one_change(
    before: tuple[tuple[int, int], ...],
    after: tuple[tuple[int, int], ...],
    gap: int,
    admitted: bool,
    rate: float,
) -> None:
    w = LoadWindow()
    first = w.observe(_at(10, *before), 10)
    assert (first.admitted_share, first.arrival_rate, first.changes) == (0.0, 0.0, 0)  # no change yet
    load = w.observe(_at(10 + gap, *after), 10 + gap)
    assert load.changes == 1
    assert load.admitted_share == float(admitted)
    assert load.arrival_rate == pytest.approx(rate)


def test_load_window_same_counts_fed_again_add_no_change() -> None:
    # A horizon freezes several decisions from one snapshot: the counts' own step does not move.
    w = LoadWindow()
    w.observe(_at(0, (2, 0)), 0)
    w.observe(_at(1, (2, 3)), 1)
    for s in (2, 3, 4):
        assert w.observe(_at(1, (2, 3)), s).changes == 1
    assert w.load.arrival_rate == 3.0
    assert w.load.steps == 5  # the queued share still counts every decided step


def test_load_window_busy_signals_average() -> None:
    # An admission every other step and one arrival every step, for many windows.
    w = LoadWindow(window_steps=64)
    running, waiting = 0, 0
    for s in range(2000):
        if s % 2:
            running, waiting = running + waiting, 0  # admit all that waits
        else:
            waiting += 2  # two arrivals over the two steps, seen at once
        w.observe(_at(s, (running, waiting), cap=10**6), s)
    assert w.load.admitted_share == pytest.approx(0.5, abs=0.05)
    assert w.load.arrival_rate == pytest.approx(1.0, abs=0.1)
    w.reset()
    assert w.load == GroupLoad()
    w.observe(_at(5, (0, 1)), 5)
    assert w.load.changes == 0  # the first snapshot after a reset has nothing to compare with


BUSY = GroupLoad(admitted_share=0.2, arrival_rate=0.2, changes=10, steps=10)
BUSY_LOADED = GroupLoad(queued_share=0.05, steps=10, admitted_share=0.2, arrival_rate=0.2, changes=10)
GUARDED = ((3, 1), (4, 0), (4, 0), (3, 0))  # 14 of 16 slots running: the saturation guard opens

# The busy rule: (params, load, ranks as (running, waiting), step, expected admit, reason prefix).
BUSY_CASES = [
    # Off by default: the guard opens as before whatever the signals say.
    ({}, BUSY, GUARDED, 1, True, "saturation guard"),
    # Busy on the admitted share: no guard; the plain row's bound (8) and quorum (2 of 4) still open.
    ({"load_prefill_share": 0.2}, BUSY, GUARDED, 1, False, "holding"),
    ({"load_prefill_share": 0.2}, BUSY, GUARDED, 7, False, "holding"),
    ({"load_prefill_share": 0.2}, BUSY, GUARDED, 8, True, "hold bound"),
    ({"load_prefill_share": 0.2}, BUSY, ((3, 1), (3, 1), FULL, FULL), 1, True, "quorum"),
    ({"load_prefill_share": 0.21}, BUSY, GUARDED, 1, True, "saturation guard"),
    # Busy and loaded: the loaded row (bound 32, every rank ready) without the guard.
    ({"load_prefill_share": 0.2}, BUSY_LOADED, GUARDED, 8, False, "holding"),
    ({"load_prefill_share": 0.2}, BUSY_LOADED, GUARDED, 32, True, "hold bound"),
    ({"load_prefill_share": 0.2}, BUSY_LOADED, ((3, 1), (3, 1), (3, 1), FULL), 1, False, "holding"),
    ({"load_prefill_share": 0.2}, BUSY_LOADED, ((3, 1), (3, 1), (3, 1), (3, 1)), 1, True, "quorum"),
    # Busy on arrivals: 0.2 per step over 4 ranks is 0.05 per rank.
    ({"load_arrival_rate": 0.05}, BUSY, GUARDED, 1, False, "holding"),
    ({"load_arrival_rate": 0.051}, BUSY, GUARDED, 1, True, "saturation guard"),
    # With both set, both must be reached.
    ({"load_prefill_share": 0.2, "load_arrival_rate": 0.05}, BUSY, GUARDED, 1, False, "holding"),
    ({"load_prefill_share": 0.21, "load_arrival_rate": 0.05}, BUSY, GUARDED, 1, True, "saturation guard"),
    ({"load_prefill_share": 0.2, "load_arrival_rate": 0.051}, BUSY, GUARDED, 1, True, "saturation guard"),
    # No change seen yet, or no history at all: not busy.
    (
        {"load_prefill_share": 0.2},
        GroupLoad(admitted_share=1.0, steps=10),
        GUARDED,
        1,
        True,
        "saturation guard",
    ),
    ({"load_prefill_share": 0.2}, None, GUARDED, 1, True, "saturation guard"),
    # Rule 1 still comes first; an idle group that is busy waits for a quorum or the bound too.
    ({"load_prefill_share": 0.2}, BUSY, (FULL, FULL, BLOCKED, FULL), 32, False, "no rank"),
    ({"load_prefill_share": 0.2}, BUSY, ((0, 1), (0, 0), (0, 0), (0, 0)), 1, False, "holding"),
]


@pytest.mark.parametrize(("params", "load", "ranks", "step", "admit", "reason"), [*LOAD_CASES, *BUSY_CASES])
def test_bounded_hold_load_table(
    params: dict,
    load: GroupLoad | None,
    ranks: tuple[tuple[int, int], ...],
    step: int,
    admit: bool,
    reason: str,
) -> None:
    decision = make_policy("bounded_hold", **params).decide(_counts(*ranks), step, load)
    assert decision.admit is admit, decision.reason
    assert decision.reason.startswith(reason), decision.reason


def test_bounded_hold_busy_reason_names_the_signal() -> None:
    snap = _counts(*GUARDED)
    by_share = make_policy("bounded_hold", load_prefill_share=0.1).decide(snap, 5, BUSY)
    assert by_share.reason == (
        "holding: 1/4 ranks ready (need 2), 14/16 slots running; busy: admitted at 20% of recent steps"
    )
    by_rate = make_policy("bounded_hold", load_arrival_rate=0.01).decide(snap, 5, BUSY)
    assert by_rate.reason.endswith("; busy: 0.05 arrivals per step per rank")
    both = make_policy("bounded_hold", load_prefill_share=0.1, load_arrival_rate=0.01).decide(snap, 5, BUSY)
    assert both.reason.endswith("; busy: admitted at 20% of recent steps, 0.05 arrivals per step per rank")


def test_default_bounded_hold_ignores_the_busy_signals() -> None:
    # The default reads only the queued share: any busy signal values give the same decisions.
    policy = make_policy("bounded_hold")
    for ranks in (GUARDED, (READY, FULL, FULL, FULL), ((3, 2), FULL, FULL, FULL), ((0, 3), FULL, FULL, FULL)):
        for step in range(40):
            for share in (0.0, 0.05):
                plain = GroupLoad(queued_share=share, steps=50)
                signalled = GroupLoad(
                    queued_share=share, steps=50, admitted_share=1.0, arrival_rate=9.0, changes=50
                )
                assert policy.decide(_counts(*ranks), step, signalled) == policy.decide(
                    _counts(*ranks), step, plain
                )


def test_load_window_first_changes_weigh_as_the_steps_after() -> None:
    # Ten arrivals at a wave's first step, then none for 99 steps: about ten in a hundred steps, not the
    # first step's rate decayed over 99 steps.
    w = LoadWindow(window_steps=256)
    w.observe(_at(0, (0, 0)), 0)
    w.observe(_at(1, (0, 10)), 1)
    for s in range(2, 101):
        w.observe(_at(s, (0, 10)), s)
    assert w.load.arrival_rate == pytest.approx(0.1, rel=0.25)
