"""Sliding window over per-step expert load (pure numpy; the collection hooks live elsewhere).

Each `add` is one step's token counts per (layer, logical expert), or per (layer, physical slot) in the
rank's second window; `total` sums the last `window_steps` of them. Old steps fall out so the planner
follows the current traffic, not the whole history.
"""

from __future__ import annotations

import numpy as np


class LoadWindow:
    """Ring buffer of window_steps arrays float64 [num_layers, num_logical] with a running sum."""

    def __init__(self, num_layers: int, num_logical: int, window_steps: int) -> None:
        if num_layers < 1 or num_logical < 1 or window_steps < 1:
            raise ValueError(
                f"LoadWindow needs positive sizes, got layers={num_layers} logical={num_logical} window={window_steps}"
            )
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.window_steps = window_steps
        self._buf = np.zeros((window_steps, num_layers, num_logical), dtype=np.float64)
        self._sum = np.zeros((num_layers, num_logical), dtype=np.float64)
        self._next = 0  # buffer row the next add writes
        self._count = 0  # rows currently holding data (<= window_steps)
        self._adds_since_resum = 0

    @property
    def steps_recorded(self) -> int:
        """Steps currently in the window (at most window_steps)."""
        return self._count

    def is_complete(self) -> bool:
        """True once the window holds window_steps steps."""
        return self._count == self.window_steps

    def add(self, step_counts: np.ndarray) -> None:
        """Record one step: step_counts int or float [num_layers, num_logical], finite and >= 0."""
        arr = np.asarray(step_counts)
        if arr.shape != (self.num_layers, self.num_logical):
            raise ValueError(
                f"step counts have shape {arr.shape}, expected {(self.num_layers, self.num_logical)}"
            )
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"step counts must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError("step counts must be finite and non-negative")
        slot = self._buf[self._next]
        self._sum -= slot  # the evicted step (zeros until the ring wraps)
        slot[...] = arr
        self._sum += arr
        self._next = (self._next + 1) % self.window_steps
        self._count = min(self._count + 1, self.window_steps)
        # Integer counts are exact in float64, but float inputs accumulate rounding in the running
        # sum; re-summing once per window bounds that drift at negligible cost.
        self._adds_since_resum += 1
        if self._adds_since_resum >= self.window_steps:
            self._sum = self._buf.sum(axis=0)
            self._adds_since_resum = 0

    def total(self) -> np.ndarray:
        """Load over the window: float64 [num_layers, num_logical] (a copy; zeros when empty)."""
        # Tiny negative residue from float cancellation must not reach the planner as negative load.
        return np.maximum(self._sum, 0.0)

    def reset(self) -> None:
        """Forget every recorded step (e.g. after a rebalance, so the next plan sees the new regime)."""
        self._buf[...] = 0.0
        self._sum[...] = 0.0
        self._next = 0
        self._count = 0
        self._adds_since_resum = 0


def decay_factor(dt_s: float, half_life_s: float) -> float:
    """Weight left on load seen ``dt_s`` seconds ago when weights halve every ``half_life_s`` seconds:
    0.5 ** (dt_s / half_life_s), in (0, 1]. Raises ValueError for a half-life <= 0 or a negative dt."""
    if not half_life_s > 0:
        raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
    if dt_s < 0:
        raise ValueError(f"dt_s must be >= 0, got {dt_s}")
    return 0.5 ** (dt_s / half_life_s)


class DecayingLoad:
    """Recency-weighted load: float64 [num_layers, num_logical], each recorded count weighted by
    0.5 ** (its age in seconds / half_life_s).

    A sliding window weighs its whole span equally, so under drifting expert popularity the planner
    sees load that is on average half a window old; a half-life decouples that age from how often a
    plan is made, and no plan needs to reset it (the logical load does not depend on the placement).
    """

    def __init__(self, num_layers: int, num_logical: int, half_life_s: float) -> None:
        if num_layers < 1 or num_logical < 1:
            raise ValueError(
                f"DecayingLoad needs positive sizes, got layers={num_layers} logical={num_logical}"
            )
        decay_factor(0.0, half_life_s)  # validates the half-life
        self.half_life_s = float(half_life_s)
        self._sum = np.zeros((num_layers, num_logical), dtype=np.float64)

    def add(self, step_counts: np.ndarray) -> None:
        """Record counts seen now: int or float [num_layers, num_logical], finite and >= 0."""
        arr = np.asarray(step_counts)
        if arr.shape != self._sum.shape:
            raise ValueError(f"step counts have shape {arr.shape}, expected {self._sum.shape}")
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"step counts must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError("step counts must be finite and non-negative")
        self._sum += arr

    def advance(self, dt_s: float) -> None:
        """Let ``dt_s`` seconds pass: everything recorded so far weighs decay_factor(dt_s) less."""
        self._sum *= decay_factor(dt_s, self.half_life_s)

    def total(self) -> np.ndarray:
        """The weighted load: float64 [num_layers, num_logical] (a copy)."""
        return self._sum.copy()

    def reset(self) -> None:
        """Forget everything recorded."""
        self._sum[...] = 0.0
