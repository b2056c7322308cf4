"""The plain data the DP prefill gate passes between processes: step keys, the rank's report, its config.

Pure module (no vLLM, Ray or ZMQ import): the engine-core scheduler, the ZMQ transport and the
coordinator actor all import it, and nothing here imports them.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, fields
from typing import Any

StepKey = tuple[int, int]  # (wave, step): identical across DP ranks at the same lockstep step

ADDITIONAL_CONFIG_KEY = "dpserve_balance"
TRANSPORTS = ("zmq", "ray", "none")

# Little endian: kind 'R', then the fields of GateReport in order. A fixed struct costs no
# msgpack/pickle work on the engine-core thread.
_WIRE = struct.Struct("<ciqqiiiiidqq")

# What a report may carry. Reports come off a socket: out of these ranges one is refused before it
# touches the coordinator's state (a horizon of 2**31 would make it build 2**31 decisions, negative
# counts would skew every rank's gate).
MAX_RANKS = 1 << 16
MAX_COUNT = 1 << 24  # running / waiting / max_num_seqs of one engine
MAX_LEAD = 1024
MAX_HORIZON = 1024
MAX_STEP = 1 << 62


@dataclass(frozen=True, slots=True)
class GateReport:
    """One rank's counts at lockstep step ``(wave, step)``, asking for the decisions of steps
    ``step + lead .. step + lead + horizon - 1``.

    ``client_ms`` / ``client_calls`` / ``client_late``: the rank's cumulative gate-client cost (time on
    the engine-core thread, calls, decisions that came back too late), shown in the coordinator's stats.
    """

    rank: int
    wave: int
    step: int
    running: int
    waiting: int
    max_num_seqs: int
    lead: int = 1
    horizon: int = 1
    client_ms: float = 0.0
    client_calls: int = 0
    client_late: int = 0

    @property
    def key(self) -> StepKey:
        return (self.wave, self.step)

    @property
    def first_decided(self) -> int:
        """The first step this report asks the decision for."""
        return self.step + self.lead

    def to_bytes(self) -> bytes:
        """The wire form (65 bytes)."""
        return GateReport.encode(*(getattr(self, f.name) for f in fields(self)))

    @staticmethod
    def encode(
        rank: int, wave: int, step: int, running: int, waiting: int, max_num_seqs: int, lead: int,
        horizon: int, client_ms: float, client_calls: int, client_late: int,
    ) -> bytes:  # fmt: skip
        """The wire form of a report with these fields, without building the report: the engine-core
        thread's path, where every step runs it with cold caches (one struct pack instead of a
        dataclass and a field walk). ``to_bytes`` packs through it, so the layout lives here only."""
        return _WIRE.pack(
            b"R", rank, wave, step, running, waiting, max_num_seqs, lead, horizon, client_ms, client_calls,
            client_late,
        )  # fmt: skip

    @classmethod
    def from_bytes(cls, payload: bytes) -> GateReport:
        """The report in `payload`; ValueError (struct.error) for a malformed or out-of-range one."""
        kind, *values = _WIRE.unpack(payload)
        if kind != b"R":
            raise ValueError(f"unknown gate message kind {kind!r}")
        return cls(*values).checked()

    def checked(self) -> GateReport:
        """This report if every field is in range, else ValueError naming the first that is not."""
        bounds = {"rank": (0, MAX_RANKS - 1), "wave": (0, MAX_STEP), "step": (0, MAX_STEP),
                  "running": (0, MAX_COUNT), "waiting": (0, MAX_COUNT), "max_num_seqs": (1, MAX_COUNT),
                  "lead": (1, MAX_LEAD), "horizon": (1, MAX_HORIZON), "client_calls": (0, MAX_STEP),
                  "client_late": (0, MAX_STEP)}  # fmt: skip
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"gate report {name}={value} outside [{low}, {high}]")
        if not 0.0 <= self.client_ms < float("inf"):  # also refuses NaN
            raise ValueError(f"gate report client_ms={self.client_ms} is not a non-negative number")
        return self


@dataclass
class BalanceConfig:
    """What the scheduler reads from ``additional_config["dpserve_balance"]``.

    ``transport``: ``"zmq"`` (ZMQ socket served by the named BalanceCoordinator actor), ``"ray"``
    (Ray calls to that actor) or ``"none"`` (no coordinator; the gate stays open unless a gate client
    is installed, e.g. by tests).
    ``lead``: how many steps ahead of use a decision is requested (>= 1).
    ``wait_ms``: how long ``schedule()`` may wait for a late decision before the fallback.
    ``horizon``: report every ``horizon`` steps (at steps that are multiples of it, the same on every
    rank) and receive the decisions of the next ``horizon`` steps in one call: transport cost / horizon,
    decisions up to ``lead + horizon - 1`` steps stale.
    ``dead_after_s`` (zmq): no reply for this long after a report means the coordinator is down.
    """

    transport: str = "zmq"
    coordinator_name: str = "dpserve_balance_coordinator"
    namespace: str = "dpserve"
    ray_address: str | None = None
    lead: int = 1
    wait_ms: float = 5.0
    horizon: int = 1
    dead_after_s: float = 1.0

    @classmethod
    def from_additional_config(cls, additional: Any) -> BalanceConfig:
        raw = dict(additional.get(ADDITIONAL_CONFIG_KEY) or {}) if isinstance(additional, dict) else {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{ADDITIONAL_CONFIG_KEY}: unknown key(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**raw)
        if not 1 <= cfg.horizon <= MAX_HORIZON:
            raise ValueError(
                f"{ADDITIONAL_CONFIG_KEY}.horizon must be in [1, {MAX_HORIZON}] (got {cfg.horizon})"
            )
        if not 1 <= cfg.lead <= MAX_LEAD:
            raise ValueError(f"{ADDITIONAL_CONFIG_KEY}.lead must be in [1, {MAX_LEAD}] (got {cfg.lead})")
        if cfg.transport not in TRANSPORTS:
            raise ValueError(f"{ADDITIONAL_CONFIG_KEY}.transport must be one of {TRANSPORTS}")
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(
        self, rank: int, key: StepKey, running: int, waiting: int, max_num_seqs: int, lead: int,
        client_s: float, calls: int, late: int,
    ) -> GateReport:  # fmt: skip
        """The report a gate client with this config sends at step ``key``."""
        wave, step = key
        return GateReport(
            rank=rank, wave=wave, step=step, running=running, waiting=waiting, max_num_seqs=max_num_seqs,
            lead=lead, horizon=self.horizon, client_ms=client_s * 1e3, client_calls=calls, client_late=late,
        )  # fmt: skip
