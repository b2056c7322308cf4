"""eplb.pacing: when the first plan comes, and how many layers a step moves."""

from __future__ import annotations

import pytest

from eplb.pacing import layers_this_step, plan_due


def test_without_warm_up_plans_come_every_interval() -> None:
    # The simulator's and the study's rule before pacing: every interval, never at step 0.
    due = [s for s in range(0, 80) if plan_due(s, 25)]
    assert due == [25, 50, 75]


def test_warm_up_brings_only_the_first_plan_forward() -> None:
    assert plan_due(2, 25, first_plan_steps=2, plans_so_far=0)
    # Once a plan has been made the warm-up step is not special any more.
    assert not plan_due(2, 25, first_plan_steps=2, plans_so_far=1)
    assert not plan_due(3, 25, first_plan_steps=2, plans_so_far=0)
    # The regular cadence holds whether or not the warm-up plan happened.
    assert plan_due(25, 25, first_plan_steps=2, plans_so_far=0)
    assert plan_due(50, 25, first_plan_steps=2, plans_so_far=1)
    assert not plan_due(0, 25, first_plan_steps=2)


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
