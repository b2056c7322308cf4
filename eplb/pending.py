"""A plan in flight on one worker (`PendingPlan`) and a layer staged for commit (`Staged`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eplb.messages import TRANSFER_DEFAULTS
from eplb.plan import TransferPlan


@dataclass
class Staged:
    """One layer, ready to commit: rows of this rank to overwrite and their new weights, new tables."""

    rows: torch.Tensor  # int64 [n] local rows
    w13: torch.Tensor  # [n, 2I, H]
    w2: torch.Tensor  # [n, H, I]
    table: torch.Tensor  # log2phy int64 [E, cap]
    replica_count: torch.Tensor  # int64 [E]
    new_row: np.ndarray  # phy2log of the layer


@dataclass
class PendingPlan:
    """A plan this worker accepted and has not finished: its options, staging progress and records."""

    plan_id: int
    plan: TransferPlan
    blocking: bool  # stop-the-world: transfer at the agreed step instead of in the background
    opts: dict[str, Any] = field(default_factory=lambda: dict(TRANSFER_DEFAULTS))
    t_received: float = field(default_factory=time.perf_counter)
    staged: dict[int, Staged] = field(default_factory=dict)
    step_done: threading.Event = field(default_factory=threading.Event)  # set after each engine step
    slot_seq: int = 0
    started: bool = False  # every rank accepted it and the staging thread runs (no abort from here)
    ready: bool = False
    failed: str | None = None
    aborted: bool = False
    stage_ms: float = 0.0
    stage_cpu_ms: float = 0.0  # CPU time of the staging thread (or of the step, stop-the-world)
    remote_bytes: int = 0
    commit_layers: list[int] = field(default_factory=list)
    commit_ms: list[float] = field(default_factory=list)
    steps_waited: int = 0
    t_ready: float = 0.0  # perf_counter when staging finished (0: not yet)
    layer_ms: list[tuple[int, float, float]] = field(default_factory=list)  # (layer, t_start, t_end)
    # Inline staging: pieces (layer, piece, weight) still to post, the seconds each is expected to take
    # (fit_step; empty otherwise), the pieces posted at the previous step.
    todo: list[tuple[int, int, int]] = field(default_factory=list)
    todo_s: list[float] = field(default_factory=list)
    inflight: list[Any] = field(default_factory=list)  # exchange.Posted
    exchanges: dict[int, Any] = field(default_factory=dict)  # layer -> exchange.Exchange
    seq: int = 0  # pieces posted so far (their tags)
    wait_ms: list[float] = field(default_factory=list)  # per step boundary with pieces in flight: its wait
    inline_steps: list[tuple[float, float]] = field(default_factory=list)  # (wall ms, main-thread CPU ms)
    injected: bool = False  # fault injection taken for this plan (inline staging)
    t_started: float = 0.0  # perf_counter when every rank agreed to start staging
    prepared: bool = True  # plan, pieces (and inline layouts) ready; False while the preparing thread runs
    prep_ms: float = 0.0  # wall time of the preparation (thread or stage RPC)
    prep_cpu_ms: float = 0.0
