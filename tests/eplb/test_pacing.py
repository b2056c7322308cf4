"""eplb.pacing: when the first plan comes, and how many layers a step moves."""

from __future__ import annotations

import pytest

from eplb.pacing import layers_this_step, plan_due


def test_without_warm_up_a_plan_is_due_once_the_window_covers_the_interval() -> None:
    assert [w for w in range(0, 30) if plan_due(w, 25)] == list(range(25, 30))
    # A window that was polled late (the actor looks every few seconds) is still due.
    assert plan_due(1000, 25, plans_so_far=3)


def test_warm_up_brings_only_the_first_plan_forward() -> None:
    assert plan_due(2, 25, first_plan_steps=2, plans_so_far=0)
    assert plan_due(7, 25, first_plan_steps=2, plans_so_far=0)
    assert not plan_due(1, 25, first_plan_steps=2, plans_so_far=0)
    # Once a plan has been made the windows are full intervals again.
    assert not plan_due(2, 25, first_plan_steps=2, plans_so_far=1)
    assert plan_due(25, 25, first_plan_steps=2, plans_so_far=1)
    assert not plan_due(0, 25, first_plan_steps=2)
    # A warm-up longer than the interval never delays the first plan.
    assert plan_due(25, 25, first_plan_steps=40, plans_so_far=0)


def test_the_simulator_plans_on_the_windows_the_rule_names() -> None:
    """Every due window starts a new one: with no transfer in flight, plans come at the warm-up and
    then every interval after it, as the actor's windows restart after each attempt."""
    starts, window_start, plans = [], 0, 0
    for step in range(1, 60):
        if plan_due(step - window_start, 25, first_plan_steps=2, plans_so_far=plans):
            starts.append(step)
            window_start, plans = step, plans + 1
    assert starts == [2, 27, 52]


@pytest.mark.parametrize(("interval", "first"), [(0, None), (25, 0)])
def test_plan_due_rejects_bad_settings(interval: int, first: int | None) -> None:
    with pytest.raises(ValueError):
        plan_due(5, interval, first_plan_steps=first)


def test_a_long_step_hides_as_many_layers_as_fit() -> None:
    layers = [0.01, 0.02, 0.03, 0.04]
    assert layers_this_step(layers, 0.035) == 2  # 0.01 + 0.02 end within the step; + 0.03 would not
    assert layers_this_step(layers, 0.06) == 3  # exactly at the step's end still fits
    assert layers_this_step(layers, 10.0) == 4  # never more than are pending


def test_a_short_step_still_moves_the_floor() -> None:
    layers = [0.05, 0.05, 0.05]
    assert layers_this_step(layers, 0.01) == 1
    assert layers_this_step(layers, 0.01, min_layers=2) == 2
    assert layers_this_step(layers, 0.01, min_layers=5) == 3
    assert layers_this_step([], 1.0) == 0
    with pytest.raises(ValueError):
        layers_this_step(layers, 0.1, min_layers=0)
