"""Which DP rank gets a new request: the least-loaded live rank (pure; no Ray)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# A waiting request costs more than a running one: it still needs its prefill, which in a lockstep
# MoE group slows every rank's step (vLLM's own DP load balancer weighs waiting by 4 as well).
WAITING_WEIGHT = 4


@dataclass(frozen=True)
class RankLoad:
    """What the router knows about one rank.

    `dispatched` is exact (requests the ingress sent and that have not finished); `running` and
    `waiting` come from the engine's last stats and may be a few steps old.
    """

    dispatched: int = 0
    running: int = 0
    waiting: int = 0


def load_score(load: RankLoad) -> int:
    # The ingress's own count is never stale; the engine's waiting count adds prefill pressure.
    return max(load.dispatched, load.running + load.waiting) + (WAITING_WEIGHT - 1) * load.waiting


def pick_rank(loads: Mapping[int, RankLoad], live: set[int] | None = None) -> int:
    """Least-loaded live rank; ties go to the lowest rank id. Raises LookupError if none is live."""
    candidates = [r for r in loads if live is None or r in live]
    if not candidates:
        raise LookupError("no live DP rank")
    return min(candidates, key=lambda r: (load_score(loads[r]), r))
