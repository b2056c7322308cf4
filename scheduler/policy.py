"""Prefill admission gates for data-parallel ranks that step in lockstep.

Every synchronized engine step, each live DP rank reports how many requests it is running and how many
are waiting. A gate policy looks at one snapshot of all those counts and decides, for that step, whether
any rank may admit new prefills. The same snapshot goes to every rank, so the decision is identical on
every rank — that is what keeps the prefills of different ranks batched into the same steps instead of
each rank stalling the whole lockstep group at a different step.

This module is pure (no Ray, no vLLM): the scheduler adapter, the coordinator actor and the simulator
(`cluster/sim`) all call these same classes.

Policies
--------
``off``            always admit (vLLM's default behaviour).
``any_at_cap``     close the gate on every rank while any live rank runs ``>= max_num_seqs`` requests
                   (vllm-ascend's shipped ``BalanceScheduler`` rule ``max(counts) == max_num_seqs``).
``max_minus_one``  close while any rank runs ``>= max_num_seqs - 1`` (the variant vllm-ascend reverted
                   after a TTFT regression; kept for comparison).
``cadence``        admit only on steps where ``step % interval == 0`` (upstream vLLM's
                   ``--prefill-schedule-interval`` lever).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = [
    "POLICIES",
    "AnyAtCap",
    "Cadence",
    "GateDecision",
    "GatePolicy",
    "MaxMinusOne",
    "Off",
    "RankCounts",
    "make_policy",
]


@dataclass(frozen=True)
class RankCounts:
    """One rank's scheduler counts at the lockstep point of a step.

    ``running`` is ``len(scheduler.running)`` (requests holding a slot, partially prefilled ones
    included), ``waiting`` is the number of requests queued but not admitted, ``max_num_seqs`` the
    rank's slot limit and ``step`` the synchronized step the counts were taken at.
    """

    rank: int
    running: int
    waiting: int
    max_num_seqs: int
    step: int = 0


@dataclass(frozen=True)
class GateDecision:
    """Whether new prefills may be admitted in synchronized step ``step``, and why (for logs/metrics)."""

    step: int
    admit: bool
    reason: str


@runtime_checkable
class GatePolicy(Protocol):
    """A prefill gate: one snapshot of every live rank in, one decision for the whole group out."""

    name: str

    def decide(self, counts: Sequence[RankCounts], step: int) -> GateDecision: ...


def _empty(step: int) -> GateDecision:
    # No live rank reported: nothing can be unbalanced, and closing would only stall a rank that joins.
    return GateDecision(step=step, admit=True, reason="no live ranks in snapshot; admit by default")


@dataclass(frozen=True)
class Off:
    """Always admit: plain vLLM behaviour, the baseline."""

    name: ClassVar[str] = "off"

    def decide(self, counts: Sequence[RankCounts], step: int) -> GateDecision:
        """Admit unconditionally."""
        if not counts:
            return _empty(step)
        return GateDecision(step=step, admit=True, reason="gate off")


@dataclass(frozen=True)
class _CapThreshold:
    """Close the gate while any rank's running count reaches ``max_num_seqs - slack``."""

    slack: ClassVar[int] = 0
    name: ClassVar[str] = ""

    def decide(self, counts: Sequence[RankCounts], step: int) -> GateDecision:
        """Close if any live rank is at (or within ``slack`` of) its own ``max_num_seqs``."""
        if not counts:
            return _empty(step)
        # Each rank is compared against its own limit, so mixed max_num_seqs across ranks work too;
        # with equal limits this is exactly vllm-ascend's max(counts) >= max_num_seqs - slack.
        full = [c for c in counts if c.running >= c.max_num_seqs - self.slack]
        if full:
            worst = max(full, key=lambda c: (c.running - c.max_num_seqs, -c.rank))
            limit = "max_num_seqs" if self.slack == 0 else f"max_num_seqs-{self.slack}"
            return GateDecision(
                step=step,
                admit=False,
                reason=(
                    f"{len(full)} rank(s) at {limit}; e.g. rank {worst.rank} running "
                    f"{worst.running}/{worst.max_num_seqs}"
                ),
            )
        top = max(counts, key=lambda c: (c.running, -c.rank))
        return GateDecision(
            step=step,
            admit=True,
            reason=f"no rank at cap (max running {top.running}/{top.max_num_seqs} on rank {top.rank})",
        )


@dataclass(frozen=True)
class AnyAtCap(_CapThreshold):
    """vllm-ascend's rule: no rank admits while any rank runs ``max_num_seqs`` requests."""

    name: ClassVar[str] = "any_at_cap"
    slack: ClassVar[int] = 0


@dataclass(frozen=True)
class MaxMinusOne(_CapThreshold):
    """The reverted variant: no rank admits while any rank runs ``>= max_num_seqs - 1`` requests."""

    name: ClassVar[str] = "max_minus_one"
    slack: ClassVar[int] = 1


@dataclass(frozen=True)
class Cadence:
    """Admit only every ``interval``-th synchronized step (upstream vLLM's prefill schedule interval)."""

    interval: int = 2
    name: ClassVar[str] = "cadence"

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"cadence: interval must be an integer >= 1, got {self.interval!r}")

    def decide(self, counts: Sequence[RankCounts], step: int) -> GateDecision:
        """Admit on steps that are a multiple of ``interval`` (step 0 admits)."""
        if not counts:
            return _empty(step)
        if step % self.interval == 0:
            return GateDecision(step=step, admit=True, reason=f"step {step} on cadence {self.interval}")
        return GateDecision(
            step=step,
            admit=False,
            reason=f"step {step} off cadence {self.interval} (admits every {self.interval})",
        )


POLICIES: dict[str, type] = {
    Off.name: Off,
    AnyAtCap.name: AnyAtCap,
    MaxMinusOne.name: MaxMinusOne,
    Cadence.name: Cadence,
}

# The parameters each policy accepts; anything else is a configuration mistake worth stopping on.
_PARAMS: dict[str, frozenset[str]] = {
    "off": frozenset(),
    "any_at_cap": frozenset(),
    "max_minus_one": frozenset(),
    "cadence": frozenset({"interval"}),
}


def make_policy(name: str, **params: Any) -> GatePolicy:
    """Build the gate policy called ``name`` with its parameters.

    Raises ``ValueError`` naming the known policies for an unknown name, and naming the accepted
    parameters for an unknown or invalid parameter.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown gate policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    unknown = set(params) - _PARAMS[name]
    if unknown:
        accepted = ", ".join(sorted(_PARAMS[name])) or "none"
        raise ValueError(
            f"gate policy {name!r} got unknown parameter(s) {', '.join(sorted(unknown))}; accepted: {accepted}"
        )
    return POLICIES[name](**params)
