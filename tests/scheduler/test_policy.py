"""Table-driven tests for the pure prefill gate policies."""

from __future__ import annotations

import pytest

from scheduler.policy import POLICIES, GateDecision, GatePolicy, RankCounts, make_policy


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
    assert set(POLICIES) == {"off", "any_at_cap", "max_minus_one", "cadence"}
