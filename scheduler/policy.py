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
``bounded_hold``   hold new prefills until enough ranks can share the prefill step, never longer than
                   a step budget, and never while the group is too empty for holding to pay (below).

``bounded_hold``
~~~~~~~~~~~~~~~~
A prefill step costs every rank the slowest rank's prefill (lockstep), so it is nearly as cheap with
prefills on all ranks as on one. Holding merges prefills into fewer steps; each held step adds to the
held requests' TTFT. A rank is *ready* when it has waiting requests and a free slot
(``waiting > 0 and running < max_num_seqs``). The group *queues* when more requests wait than there
are free slots on all live ranks together (``sum(waiting) > sum(max(0, max_num_seqs - running))``):
then requests wait for slots whatever the gate does, their TTFT is set by the queue, and more
throughput shortens it, so the gate holds longer and fills the prefill step on every rank. The group
is *loaded* when it queues now or queued at a share of recent steps of at least ``load_queue_share``
(``GroupLoad.queued_share``, below). With ``L`` live ranks, the hold bound ``H`` and the quorum ``Q``
are

    not loaded: ``H = max_hold_steps``,                      ``Q = min(L, max(2, ceil(quorum * L)))``
    loaded:     ``H = max_hold_steps * queue_hold_factor``,  ``Q = L`` (every live rank ready)

and for step ``s``:

1. no rank ready                          -> closed (nothing to admit; a request arriving before the
                                             step is held under the same bound as any other);
2. ``s % H == 0``                         -> open (*hold bound*: a request that could be admitted waits
                                             at most ``H - 1`` steps for the gate);
3. ready ranks ``>= Q``                   -> open (the prefill step is shared widely enough to pay; at
                                             least two ranks, since one rank alone is the unaligned
                                             prefill the gate exists to avoid, so 2 ranks need both);
4. ``sum(running) < min_occupancy * sum(max_num_seqs)``
                                          -> open (*saturation guard*: with this many free slots a prefill
                                             step stalls few decodes and throughput follows arrivals, so
                                             holding only costs TTFT; it also lets an idle group start at once);
5. otherwise                              -> closed.

With a closed-loop client whose concurrency is at most the group's slots, requests in flight never
outnumber the slots, so the group never queues and only the first row applies.

The load signal
~~~~~~~~~~~~~~~
One snapshot does not tell an overloaded group from a lightly loaded one: under open-loop arrivals
above what the group serves, holding drains the queue it builds, so the snapshot between two queue
episodes shows free slots and nothing queued, as at light load. The history does: a group at light
load never queues, an overloaded one queues again and again. ``GroupLoad.queued_share`` is the share
of recent steps whose snapshot queued, an exponential moving average over about ``window_steps``
(default 256) steps that `LoadWindow` builds from the snapshots it is fed (the coordinator feeds it
the snapshot each frozen decision is made from, the simulator each step's; it is plain data, the same
for the same snapshots). While it is at least ``load_queue_share``, the loaded row applies between
queue episodes too, so the gate keeps merging admissions instead of reopening for one rank at a time
and letting the queue form again. With no history (``load`` omitted or ``steps == 0``) the group is
loaded only while it queues now.

Busy (opt-in, off by default)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Two more signals of the recent load, both built by `LoadWindow` from the changes between successive
snapshots (the ranks report no admission or arrival counts, so they are derived from the counts):
``GroupLoad.admitted_share``, the share of recent steps whose snapshot shows an admission since the
previous one (some rank's waiting fell or its running rose: the nearest thing to the share of prefill
steps that the counts give; steps that only continue a chunked prefill do not show), and
``GroupLoad.arrival_rate``, the requests per step that joined a waiting queue (the sum over ranks of
each rank's rise in waiting: exact while the rank admits nothing in between, a lower bound otherwise;
preempted requests count too). The group is *busy* when ``admitted_share >= load_prefill_share`` and
``arrival_rate >= load_arrival_rate * L``, each test only while its parameter is above 0 (so with one
parameter set, that test alone) and only once the window has seen a change. A busy group skips the
saturation guard (rule 4); its row is chosen as before. Under load the guard reopens the gate for
each arrival while occupancy sits below ``min_occupancy``, which lets the queue form again; a group
that runs nearly full (closed-loop clients) seldom reaches the guard, so being busy changes little
there. Both signals are counted in steps, so they follow occupancy as much as load: a request holds
its slot for about its output length in steps, and a nearly full closed-loop group sees about as many
arrivals per step as an overloaded one. ``benchmarks/results/sim_gate_load_signal.md`` measures them.

Parameters: ``max_hold_steps`` (int >= 1, default 8) is the operator's TTFT budget in steps: with a
decode step of ``d`` ms a held request waits at most ``(max_hold_steps - 1) * d`` ms once the snapshot
shows its rank ready (``(H - 1) * d`` while the group is loaded), and larger values move the policy along
its own throughput/TTFT frontier. Counted
in the rank's own steps, the decision pipeline adds up to ``lead + 2`` steps: a decision is frozen
``lead`` steps ahead, from the counts of the ranks that have reported by then (one step older when a
peer's report freezes it first), and a rank reports at the lockstep point, before the engine reads
new requests for the next step (so a request that arrives is in the counts one step after it is in
the queue). A request can therefore wait up to ``H + lead + 1`` steps from the step it is first in
the waiting queue with a free slot, ``H + lead`` when a finished request frees its slot (checked on
real engines by ``tests/scheduler/test_balance_e2e.py``). ``quorum`` (0 < q <= 1, default 0.5) is the
fraction of live ranks that must be ready to open early while the group is not loaded.
``queue_hold_factor`` (int >= 1, default 4) lengthens the hold bound while the group is loaded; 1 turns
the extension off (the not-loaded row then applies throughout, the rule before issue #17).
``load_queue_share`` (0 <= s <= 1, default 0.05) is the share of recent queued steps from which the
group counts as loaded without a queue in the snapshot; 0 turns the load signal off (loaded only
while queued now).
``load_prefill_share`` (0 <= p <= 1, default 0: off) is the share of recent steps with an admission
from which the group is busy. ``load_arrival_rate`` (>= 0, default 0: off) is the arrivals per step per
live rank from which the group is busy; it depends on the workload's output length (a request holds
its slot for about that many steps), so it is a per-deployment setting.
``min_occupancy`` (0 <= m <= 1, default 0.9) is the saturation guard's threshold; 0 disables it.
Below about 90 % of the slots running, requests do not queue for slots, so the group serves what
arrives whether or not it holds. The rule reads only the snapshot, the step number and the load
built from earlier snapshots, so every rank and the simulator get the same decision from the same
counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = [
    "POLICIES",
    "AnyAtCap",
    "BoundedHold",
    "Cadence",
    "GateDecision",
    "GatePolicy",
    "GroupLoad",
    "LoadWindow",
    "MaxMinusOne",
    "Off",
    "RankCounts",
    "make_policy",
    "queued",
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
class GroupLoad:
    """The group's recent load: what one snapshot cannot show, from the snapshots before it.

    ``queued_share`` is the share of recent steps at which the group queued for slots (more requests
    waiting than free slots on all live ranks together), an exponential moving average over about
    ``LoadWindow.window_steps`` steps; ``steps`` is how many snapshots it has seen (0: no history).
    ``admitted_share`` (the share of recent steps whose snapshot shows an admission since the one
    before) and ``arrival_rate`` (requests that joined a waiting queue per step, all ranks together)
    are averaged over the same window from the changes between successive snapshots; ``changes`` is
    how many such changes it has seen (0: those two say nothing yet). Module docstring, "Busy".
    """

    queued_share: float = 0.0
    steps: int = 0
    admitted_share: float = 0.0
    arrival_rate: float = 0.0
    changes: int = 0


# A setting's rule: the types it may have (never a bool), the range it must be in, and how to say it.
_Rule = tuple[tuple[type, ...], Callable[[Any], bool], str]
_INT_AT_LEAST_1: _Rule = ((int,), lambda v: v >= 1, "an integer >= 1")
_SHARE: _Rule = ((int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _check(where: str, name: str, value: Any, rule: _Rule) -> None:
    """ValueError naming the setting unless ``value`` follows ``rule``."""
    kinds, ok, what = rule
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        raise ValueError(f"{where}: {name} must be {what}, got {value!r}")


def queued(counts: Sequence[RankCounts]) -> tuple[bool, int, int]:
    """Whether the group queues for slots in ``counts``, with its waiting and free-slot totals. A rank
    over its cap frees no slot for the others."""
    waiting = sum(c.waiting for c in counts)
    free = sum(max(0, c.max_num_seqs - c.running) for c in counts)
    return waiting > free, waiting, free


class LoadWindow:
    """Builds the `GroupLoad` a policy reads from the snapshots it is fed, one per decided step.

    The coordinator and the simulator each keep one and feed it the snapshot each decision is made
    from, so both hand the policy the same load for the same sequence of snapshots. A step's weight
    decays with the steps since (``exp(-gap / window_steps)``), so a decision frozen for several steps
    from one snapshot (``horizon``) or a skipped step count by their step numbers, not by calls.
    ``reset`` forgets the history (a new wave starts from an idle group).

    The busy signals (``admitted_share``, ``arrival_rate``) compare each rank's counts with the same
    rank's counts in the previous snapshot whose counts were taken at an earlier step (the counts'
    own ``step``), so a snapshot fed again for a horizon's later steps adds no change, and the change
    over a gap of ``g`` steps counts as ``g`` steps at its rate.
    """

    def __init__(self, window_steps: int = 256) -> None:
        _check("load window", "window_steps", window_steps, _INT_AT_LEAST_1)
        self.window_steps = window_steps
        self.reset()

    def reset(self) -> None:
        """Forget every snapshot seen."""
        self._share = 0.0
        self._steps = 0
        self._last: int | None = None
        self._admitted = 0.0
        self._arrivals = 0.0
        self._weight = 0.0
        self._changes = 0
        self._prev: dict[int, RankCounts] = {}
        self._prev_at: int | None = None

    @property
    def load(self) -> GroupLoad:
        """The load as of the last snapshot observed."""
        return GroupLoad(
            queued_share=self._share,
            steps=self._steps,
            admitted_share=self._admitted / self._weight if self._weight else 0.0,
            arrival_rate=self._arrivals / self._weight if self._weight else 0.0,
            changes=self._changes,
        )

    def observe(self, counts: Sequence[RankCounts], step: int) -> GroupLoad:
        """Add the snapshot taken for ``step`` and return the load including it. A step not after the
        last one observed adds no weight (the snapshot is already counted)."""
        if not counts:
            return self.load
        now = 1.0 if queued(counts)[0] else 0.0
        if self._last is None:
            self._share = now
        elif step > self._last:
            self._share += (1.0 - math.exp(-(step - self._last) / self.window_steps)) * (now - self._share)
        self._last = step if self._last is None else max(self._last, step)
        self._steps += 1
        self._observe_changes(counts)
        return self.load

    def _observe_changes(self, counts: Sequence[RankCounts]) -> None:
        # Waiting only grows by arrivals (and preemptions) and only shrinks by admissions, and
        # running only grows by admissions, so per rank a drop in waiting or a rise in running is an
        # admission and a rise in waiting is at least that many arrivals (a rank that admitted and
        # received requests between the two snapshots shows only the net change: a lower bound).
        at = max(c.step for c in counts)
        if self._prev_at is not None and at <= self._prev_at:
            return
        prev, prev_at = self._prev, self._prev_at
        self._prev, self._prev_at = {c.rank: c for c in counts}, at
        if prev_at is None:
            return
        gap = at - prev_at
        arrivals = 0
        admitted = False
        for c in counts:
            p = prev.get(c.rank)
            if p is None:
                continue  # a rank that joins: its queue is not an arrival the group saw
            arrivals += max(0, c.waiting - p.waiting)
            admitted = admitted or c.waiting < p.waiting or c.running > p.running
        # A weighted mean with the same decay, normalized by the weight so far: the first changes
        # (one step's arrivals at a wave's start) weigh as much as the steps after them, not the
        # whole window.
        keep = math.exp(-gap / self.window_steps)
        self._admitted = keep * self._admitted + (1.0 - keep) * float(admitted)
        self._arrivals = keep * self._arrivals + (1.0 - keep) * arrivals / gap
        self._weight = keep * self._weight + (1.0 - keep)
        self._changes += 1


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

    def decide(
        self, counts: Sequence[RankCounts], step: int, load: GroupLoad | None = None
    ) -> GateDecision: ...


def _empty(step: int) -> GateDecision:
    # No live rank reported: nothing can be unbalanced, and closing would only stall a rank that joins.
    return GateDecision(step=step, admit=True, reason="no live ranks in snapshot; admit by default")


@dataclass(frozen=True)
class Off:
    """Always admit: plain vLLM behaviour, the baseline."""

    name: ClassVar[str] = "off"

    def decide(self, counts: Sequence[RankCounts], step: int, load: GroupLoad | None = None) -> GateDecision:
        """Admit unconditionally."""
        if not counts:
            return _empty(step)
        return GateDecision(step=step, admit=True, reason="gate off")


@dataclass(frozen=True)
class _CapThreshold:
    """Close the gate while any rank's running count reaches ``max_num_seqs - slack``."""

    slack: ClassVar[int] = 0
    name: ClassVar[str] = ""

    def decide(self, counts: Sequence[RankCounts], step: int, load: GroupLoad | None = None) -> GateDecision:
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
        _check("cadence", "interval", self.interval, _INT_AT_LEAST_1)

    def decide(self, counts: Sequence[RankCounts], step: int, load: GroupLoad | None = None) -> GateDecision:
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


@dataclass(frozen=True)
class BoundedHold:
    """Hold prefills until a quorum of ranks is ready, at most ``max_hold_steps`` (``queue_hold_factor``
    times that, and until every rank is ready, while the group queues for slots or did so recently;
    module docstring)."""

    max_hold_steps: int = 8
    quorum: float = 0.5
    min_occupancy: float = 0.9
    queue_hold_factor: int = 4
    load_queue_share: float = 0.05
    load_prefill_share: float = 0.0
    load_arrival_rate: float = 0.0
    name: ClassVar[str] = "bounded_hold"

    def __post_init__(self) -> None:
        where = "bounded_hold"
        _check(where, "max_hold_steps", self.max_hold_steps, _INT_AT_LEAST_1)
        _check(where, "quorum", self.quorum, ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"))
        _check(where, "min_occupancy", self.min_occupancy, _SHARE)
        _check(where, "queue_hold_factor", self.queue_hold_factor, _INT_AT_LEAST_1)
        _check(where, "load_queue_share", self.load_queue_share, _SHARE)
        _check(where, "load_prefill_share", self.load_prefill_share, _SHARE)
        _check(where, "load_arrival_rate", self.load_arrival_rate,
               ((int, float), lambda v: 0 <= v < math.inf, "a finite number >= 0"))  # fmt: skip

    def _busy(self, load: GroupLoad | None, ranks: int) -> str:
        """Why the group is busy (module docstring, "Busy"), or "" when it is not."""
        if (
            load is None
            or load.changes == 0
            or not (self.load_prefill_share > 0 or self.load_arrival_rate > 0)
        ):
            return ""
        why = []
        if self.load_prefill_share > 0:
            if load.admitted_share < self.load_prefill_share:
                return ""
            why.append(f"admitted at {load.admitted_share:.0%} of recent steps")
        if self.load_arrival_rate > 0:
            if load.arrival_rate < self.load_arrival_rate * ranks:
                return ""
            why.append(f"{load.arrival_rate / ranks:.3g} arrivals per step per rank")
        return "; busy: " + ", ".join(why)

    def decide(self, counts: Sequence[RankCounts], step: int, load: GroupLoad | None = None) -> GateDecision:
        """Apply rules 1-5 of the module docstring to one snapshot and the group's recent load."""
        if not counts:
            return _empty(step)
        ready = sum(1 for c in counts if c.waiting > 0 and c.running < c.max_num_seqs)
        if ready == 0:
            return GateDecision(
                step=step, admit=False, reason="no rank has a waiting request and a free slot"
            )
        now_queued, waiting, free = queued(counts)
        recent = (
            load is not None
            and load.steps > 0
            and self.load_queue_share > 0
            and load.queued_share >= self.load_queue_share
        )
        if self.queue_hold_factor > 1 and (now_queued or recent):
            hold = self.max_hold_steps * self.queue_hold_factor
            need = len(counts)
            if now_queued:
                mode = f"; queue: {waiting} waiting > {free} free slots"
            else:
                mode = f"; loaded: queued at {load.queued_share:.0%} of recent steps"  # type: ignore[union-attr]
        else:
            hold = self.max_hold_steps
            need = min(len(counts), max(2, math.ceil(self.quorum * len(counts))))
            mode = ""
        busy = self._busy(load, len(counts))
        mode += busy
        if step % hold == 0:
            return GateDecision(
                step=step, admit=True, reason=f"hold bound: step {step} on {hold}-step deadline{mode}"
            )
        if ready >= need:
            return GateDecision(
                step=step,
                admit=True,
                reason=f"quorum: {ready}/{len(counts)} ranks ready (need {need}){mode}",
            )
        running = sum(c.running for c in counts)
        slots = sum(c.max_num_seqs for c in counts)
        if not busy and running < self.min_occupancy * slots:
            return GateDecision(
                step=step,
                admit=True,
                reason=f"saturation guard: {running}/{slots} slots running, below {self.min_occupancy:g}",
            )
        return GateDecision(
            step=step,
            admit=False,
            reason=(
                f"holding: {ready}/{len(counts)} ranks ready (need {need}), {running}/{slots} slots running"
                f"{mode}"
            ),
        )


POLICIES: dict[str, type] = {
    Off.name: Off,
    AnyAtCap.name: AnyAtCap,
    MaxMinusOne.name: MaxMinusOne,
    Cadence.name: Cadence,
    BoundedHold.name: BoundedHold,
}

# The parameters each policy accepts; anything else is a configuration mistake worth stopping on.
_PARAMS: dict[str, frozenset[str]] = {
    "off": frozenset(),
    "any_at_cap": frozenset(),
    "max_minus_one": frozenset(),
    "cadence": frozenset({"interval"}),
    "bounded_hold": frozenset(
        {
            "max_hold_steps",
            "quorum",
            "min_occupancy",
            "queue_hold_factor",
            "load_queue_share",
            "load_prefill_share",
            "load_arrival_rate",
        }
    ),
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
