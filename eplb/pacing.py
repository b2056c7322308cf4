"""When to plan and how many layers to move per step: pure functions of counts and seconds.

Two rules that the simulator's EPLB study (benchmarks/results/sim_eplb_gap_note.md) found to matter:

- `plan_due`: the first plan after a short warm-up window instead of a full interval. A serving group
  starts on the start-up placement with every rank prefilling its first prompts; those steps are the
  longest of the run and carry the largest imbalance cost, and a full interval of them passes before
  a plan can exist. A window of a couple of whole-group prefill steps already holds millions of routed
  tokens, enough to plan from.
- `layers_this_step`: an asynchronous plan moves, on each step, as many pending layers as the side
  stream finishes within the step's own compute (at least a floor). A long (prefill) step hides many
  layers at no exposed time; a short decode step still moves the floor, as before.

`plan_due` counts the steps in the load window (since the last planning attempt), which is what the
EPLB actor (eplb.actor) and the simulator (cluster.sim.experts) both call. `layers_this_step` needs a
step time every rank agrees on: the ranks' mean step time, carried in the DP step sync's sums
(eplb.agreement), so that all ranks post the same staging pieces at the same step.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_due(
    window_steps: int, interval_steps: int, first_plan_steps: int | None = None, plans_so_far: int = 0
) -> bool:
    """Whether a plan is due on a load window of `window_steps` steps (steps since the last planning
    attempt, or since start): once it covers `interval_steps`, or, while no plan has been made yet,
    `first_plan_steps` (None: no warm-up, the first plan waits a full interval)."""
    if interval_steps < 1:
        raise ValueError("interval_steps must be >= 1")
    if first_plan_steps is not None and first_plan_steps < 1:
        raise ValueError("first_plan_steps must be None or >= 1")
    target = interval_steps
    if first_plan_steps is not None and plans_so_far == 0:
        target = min(first_plan_steps, interval_steps)
    return window_steps >= target


def layers_this_step(pending_layer_s: Sequence[float], step_s: float, min_layers: int = 1) -> int:
    """How many of the pending layers (seconds each takes on the side stream, in order) to move this
    step: the longest prefix whose transfers end within `step_s`, the step's compute without them, and
    never fewer than `min_layers` (nor more than are pending)."""
    if min_layers < 1:
        raise ValueError("min_layers must be >= 1")
    n = len(pending_layer_s)
    k, acc = 0, 0.0
    for s in pending_layer_s:
        if acc + s > step_s:
            break
        acc += s
        k += 1
    return min(n, max(k, min_layers))
