"""BalanceCoordinator: gathers every DP rank's counts per lockstep step and serves gate decisions.

``CoordinatorState`` is the logic (plain Python, unit-testable, clock injectable); ``BalanceCoordinator``
is the Ray actor around it that adds metrics (``ray.util.metrics``). Ranks call ``report`` once per
lockstep step (see ``scheduler/balance_scheduler.py`` for the step key and the pipelining):

* the decision for step key ``(wave, step + lead)`` is frozen the first time any rank asks for it,
  from one snapshot of the latest counts of all live ranks, and every later asker gets the same
  decision — so all ranks apply the same gate at the same step even though they report at slightly
  different times;
* nobody ever waits for a missing rank: a rank whose last report is older than ``timeout_s`` is left
  out of snapshots (logged once, re-admitted when it reports again);
* the policy can be swapped at run time (``set_policy``); decisions already frozen stay as they are;
* each frozen decision also reads the group's recent load (``scheduler.policy.LoadWindow``), built
  from the snapshots earlier decisions of the same wave were frozen from.

Transports: ranks reach the actor either through Ray method calls (``report``; transport ``"ray"``)
or, by default, through a ZMQ ROUTER socket the actor serves from a thread (``zmq_address``; see
``scheduler/gate_transport.py``). Both paths share one lock around the same ``CoordinatorState``.

Restarts: the actor is created with ``max_restarts=-1``. A restarted actor starts empty (no ranks, no
frozen decisions) on a new ZMQ address; ranks notice the silence, admit meanwhile, and look the address
up again. Its configuration (policy, params, timeout) is *not* lost: every change is written to the
GCS key-value store (``ConfigStore`` in ``scheduler/coordinator_config.py``) and a restarted actor
reads it back, so a run-time ``set_policy`` survives the restart instead of reverting to the
creation-time policy. The actor's Ray metrics are ``Metrics`` in ``scheduler/coordinator_metrics.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scheduler.coordinator_config import ConfigStore
from scheduler.coordinator_metrics import Metrics
from scheduler.frame_auth import new_key
from scheduler.gate_report import GateReport, StepKey
from scheduler.policy import GateDecision, GatePolicy, GroupLoad, LoadWindow, RankCounts, make_policy

logger = logging.getLogger("dpserve.balance.coordinator")

DEFAULT_NAME = "dpserve_balance_coordinator"
DEFAULT_NAMESPACE = "dpserve"

_KEEP_DECISIONS = 4096  # enough history for tests and debugging; bounded memory


@dataclass
class _RankState:
    counts: RankCounts
    wave: int
    seen: float  # clock() of the last report
    client_ms: float = 0.0  # the rank's cumulative time spent in its gate client
    client_calls: int = 0
    client_late: int = 0  # the rank's decisions that came back too late (fallback applied)
    excluded: bool = False


class CoordinatorState:
    """The coordinator's bookkeeping and decisions, without Ray."""

    def __init__(
        self,
        policy: str = "any_at_cap",
        params: dict[str, Any] | None = None,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.clock = clock
        self.policy_name = policy
        self.policy_params: dict[str, Any] = dict(params or {})
        self.policy: GatePolicy = make_policy(policy, **self.policy_params)
        self.ranks: dict[int, _RankState] = {}
        self.decisions: OrderedDict[StepKey, GateDecision] = OrderedDict()
        # The group's recent load (scheduler.policy.GroupLoad), from the snapshots decisions are
        # frozen from; a new wave starts from an idle group, so its history starts over.
        self.load_window = LoadWindow()
        self._load_wave = -1
        self.closed_steps = 0
        self.decided_steps = 0
        self.gathers = 0  # steps every live rank reported (each one observed in the gather-latency metric)
        # Per step key: (first report time, ranks that reported) — for the gather latency.
        self._gather: OrderedDict[StepKey, tuple[float, set[int]]] = OrderedDict()
        self.on_exclude: Callable[[int, float], None] | None = None

    # ---- configuration ---------------------------------------------------------------------------
    def set_policy(self, name: str, **params: Any) -> None:
        """Swap the policy; raises ValueError (and keeps the old one) if name/params are invalid."""
        policy = make_policy(name, **params)
        self.policy, self.policy_name, self.policy_params = policy, name, dict(params)
        logger.info("balance policy set to %s %s", name, params)

    def reset(self) -> None:
        """Forget ranks and decisions (a new rank group starts its waves at 0 again)."""
        self.ranks.clear()
        self.decisions.clear()
        self._gather.clear()
        self.load_window.reset()
        self._load_wave = -1
        self.closed_steps = self.decided_steps = self.gathers = 0

    # ---- liveness --------------------------------------------------------------------------------
    def live_counts(self, now: float | None = None) -> list[RankCounts]:
        """The latest counts of every rank that reported within ``timeout_s``."""
        now = self.clock() if now is None else now
        live = []
        for rank, st in sorted(self.ranks.items()):
            stale = now - st.seen > self.timeout_s
            if stale and not st.excluded:
                st.excluded = True
                logger.warning(
                    "balance: rank %d has not reported for %.1f s (timeout %.1f s); excluded from the gate",
                    rank,
                    now - st.seen,
                    self.timeout_s,
                )
                if self.on_exclude is not None:
                    self.on_exclude(rank, now - st.seen)
            if not stale:
                live.append(st.counts)
        return live

    # ---- the per-step call -----------------------------------------------------------------------
    def report(self, r: GateReport) -> tuple[list[GateDecision], float | None]:
        """Record rank ``r.rank``'s counts at ``(wave, step)``; return the decisions for the
        ``r.horizon`` steps from ``step + lead`` (all frozen from one snapshot) and, when this report
        completed a step's gather, the gather spread in ms."""
        now = self.clock()
        prev = self.ranks.get(r.rank)
        if prev is not None and prev.excluded:
            logger.info("balance: rank %d reports again; included in the gate", r.rank)
        self.ranks[r.rank] = _RankState(
            counts=RankCounts(
                rank=r.rank, running=r.running, waiting=r.waiting, max_num_seqs=r.max_num_seqs, step=r.step
            ),
            wave=r.wave,
            seen=now,
            client_ms=r.client_ms,
            client_calls=r.client_calls,
            client_late=r.client_late,
        )
        spread = self._note_gather(r.key, r.rank, now)
        return [self.decide((r.wave, r.first_decided + i), now) for i in range(r.horizon)], spread

    def decide(self, key: StepKey, now: float | None = None) -> GateDecision:
        """The decision for ``key``: frozen on first request from one snapshot of live ranks."""
        decision = self.decisions.get(key)
        if decision is None:
            counts = self.live_counts(now)
            decision = self.policy.decide(counts, key[1], self._observe_load(key, counts))
            self.decisions[key] = decision
            self.decided_steps += 1
            if not decision.admit:
                self.closed_steps += 1
            while len(self.decisions) > _KEEP_DECISIONS:
                self.decisions.popitem(last=False)
        return decision

    def _observe_load(self, key: StepKey, counts: list[RankCounts]) -> GroupLoad:
        """The load the decision for ``key`` reads: the window with this snapshot added (a decision
        of an older wave, frozen late, reads the current load and adds nothing)."""
        wave, step = key
        if wave > self._load_wave:
            self.load_window.reset()
            self._load_wave = wave
        if wave < self._load_wave:
            return self.load_window.load
        return self.load_window.observe(counts, step)

    def _note_gather(self, key: StepKey, rank: int, now: float) -> float | None:
        first, seen = self._gather.get(key, (now, set()))
        seen.add(rank)
        self._gather[key] = (first, seen)
        while len(self._gather) > 256:
            self._gather.popitem(last=False)
        live = {r for r, st in self.ranks.items() if not st.excluded and now - st.seen <= self.timeout_s}
        if live and live <= seen:
            del self._gather[key]
            self.gathers += 1
            return (now - first) * 1e3
        return None

    # ---- read side -------------------------------------------------------------------------------
    def load_scores(self) -> dict[int, float]:
        """Per live rank: (running + waiting) / max_num_seqs — lower is less loaded (for a router)."""
        return {c.rank: (c.running + c.waiting) / max(1, c.max_num_seqs) for c in self.live_counts()}

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        live = {c.rank for c in self.live_counts(now)}
        return {
            "policy": self.policy_name,
            "params": dict(self.policy_params),
            "decided_steps": self.decided_steps,
            "closed_steps": self.closed_steps,
            "gathers": self.gathers,
            "queued_share": self.load_window.load.queued_share,
            "live_ranks": sorted(live),
            "ranks": {
                r: {
                    "running": st.counts.running,
                    "waiting": st.counts.waiting,
                    "max_num_seqs": st.counts.max_num_seqs,
                    "wave": st.wave,
                    "step": st.counts.step,
                    "age_s": now - st.seen,
                    "live": r in live,
                    "client_ms": st.client_ms,
                    "client_calls": st.client_calls,
                    "client_late": st.client_late,
                }
                for r, st in sorted(self.ranks.items())
            },
        }


class BalanceCoordinator:
    """The Ray actor (use :func:`get_or_create_coordinator`). Metrics go to the Ray dashboard."""

    def __init__(
        self,
        policy: str = "any_at_cap",
        params: dict[str, Any] | None = None,
        timeout_s: float = 5.0,
        serve_zmq: bool = True,
    ):
        # Ray restarts the actor with its *creation* arguments; the configuration set since then
        # (set_policy / set_timeout) is read back from the GCS store (see ConfigStore).
        self._store = ConfigStore.for_this_actor()
        saved = self._store.load() if self._store is not None else None
        # The key that seals gate frames: the group's (`reset`), kept across restarts with the
        # configuration; until a group sets one, a random key nobody holds (every frame is dropped).
        self._key = new_key()
        self._local_only = False  # serve the gate on loopback (every rank on this node; `bind`)
        if saved is not None:
            policy, params, timeout_s = saved["policy"], saved["params"], saved["timeout_s"]
            self._key = bytes.fromhex(saved.get("key") or self._key.hex())
            self._local_only = bool(saved.get("local_only", False))
            logger.warning("balance coordinator restarted: policy %s %s restored", policy, params)
        self.state = CoordinatorState(policy, params, timeout_s)
        self._save()
        self._metrics = Metrics()
        self.state.on_exclude = lambda rank, age: self._metrics.excluded(rank)
        # The ZMQ server thread and the Ray methods both touch the state: one lock for all of it.
        self._lock = threading.Lock()
        self._server = None
        if serve_zmq:
            from scheduler.gate_transport import GateServer

            host = "127.0.0.1" if self._local_only else _node_ip()
            self._server = GateServer(self.report, host, self._key, on_drop=self._metrics.dropped)

    def zmq_address(self) -> str | None:
        """Where the ranks' ZMQ gate clients connect (changes when the actor restarts)."""
        return None if self._server is None else self._server.address

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def bind(self, local_only: bool) -> str | None:
        """Serve the gate on loopback (`local_only`: every rank of the group is on this node) or on
        this node's address; returns the ZMQ address. Kept across restarts."""
        with self._lock:
            self._local_only = bool(local_only)
            self._save()
        if self._server is not None:
            self._server.rebind("127.0.0.1" if local_only else _node_ip())
        return self.zmq_address()

    def gate_endpoint(self) -> tuple[str, bytes] | None:
        """The ZMQ address and the frame key the ranks' gate clients use (a Ray call: the key never
        crosses a socket)."""
        return None if self._server is None else self._server.endpoint

    def report(self, r: GateReport) -> list[bool]:
        """One rank's counts at ``(wave, step)``; returns admit for steps ``step + lead`` ..
        ``step + lead + horizon - 1`` (one call per ``horizon`` steps amortizes the transport).
        Called by the ZMQ server thread and, with transport ``"ray"``, as a Ray method."""
        with self._lock:
            closed_before = self.state.closed_steps
            decisions, spread = self.state.report(r.checked())
            for _ in range(self.state.closed_steps - closed_before):
                self._metrics.closed()
            if spread is not None:
                self._metrics.gather(spread)
            return [d.admit for d in decisions]

    def set_policy(self, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            self.state.set_policy(name, **(params or {}))
            self._save()
        return {"policy": name, "params": dict(params or {})}

    def set_timeout(self, timeout_s: float) -> None:
        with self._lock:
            self.state.timeout_s = float(timeout_s)
            self._save()

    def _save(self) -> None:
        if self._store is not None:
            self._store.save(
                self.state.policy_name,
                self.state.policy_params,
                self.state.timeout_s,
                self._key,
                self._local_only,
            )

    def reset(self, key: bytes | None = None) -> None:
        """Start over for a new rank group; `key`: the group's gate-frame key (None: keep the key)."""
        with self._lock:
            self.state.reset()
            if key is not None:
                self._key = bytes(key)
                if self._server is not None:
                    self._server.set_key(self._key)
                self._save()

    def get_decision(self, wave: int, step: int) -> dict[str, Any] | None:
        with self._lock:
            d = self.state.decisions.get((wave, step))
        return None if d is None else {"step": d.step, "admit": d.admit, "reason": d.reason}

    def get_decisions(self) -> dict[StepKey, bool]:
        with self._lock:
            return {k: d.admit for k, d in self.state.decisions.items()}

    def get_load_scores(self) -> dict[int, float]:
        with self._lock:
            return self.state.load_scores()

    def get_stats(self) -> dict[str, Any]:
        with self._lock:
            out = self.state.stats()
        out["zmq_address"] = self.zmq_address()
        out["zmq_served"] = 0 if self._server is None else self._server.served
        # Frames dropped by reason (unauthenticated, malformed, invalid) and whether the thread serves.
        out["zmq_dropped"] = {} if self._server is None else dict(self._server.dropped)
        out["zmq_server_alive"] = self._server is not None and self._server.alive
        return out

    def ping(self) -> bool:
        return True


def get_or_create_coordinator(
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    policy: str = "any_at_cap",
    params: dict[str, Any] | None = None,
    timeout_s: float = 5.0,
) -> Any:
    """The named coordinator actor, created if absent (its policy is then set to ``policy``).

    It needs almost no CPU (one small call per rank per step), so it asks for none: it must never
    keep a rank from being placed. ``max_restarts=-1``: Ray restarts it whenever it dies (empty state,
    the last policy set, new ZMQ address); the ranks admit meanwhile and reconnect by themselves.
    Blocking (two Ray round trips): call it from a thread in async code.
    """
    import ray

    actor = (
        ray.remote(BalanceCoordinator)
        .options(
            name=name,
            namespace=namespace,
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=1,
            max_restarts=-1,
        )
        .remote(policy, params, timeout_s)
    )
    # get_if_exists returns a running actor unchanged: apply this group's policy and timeout to it.
    ray.get([actor.set_policy.remote(policy, params), actor.set_timeout.remote(timeout_s)])
    # A non-detached actor dies when its creator drops the last handle; the engines only look it up
    # by name, so this process keeps one for as long as it lives (or until release_coordinator). The
    # handle kept is the creating one: a later call (the next group's start) gets the running actor
    # through get_if_exists, and dropping the creating handle for that one ends the actor ("all
    # references to the actor were removed") under the group being formed.
    held = _HANDLES.get((namespace, name))
    if held is None or held._actor_id != actor._actor_id:
        _HANDLES[(namespace, name)] = actor
    return actor


def release_coordinator(
    name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, kill: bool = True
) -> None:
    """Drop this process's handle on the named coordinator (and kill it unless ``kill=False``)."""
    actor = _HANDLES.pop((namespace, name), None)
    if actor is not None and kill:
        import ray

        ray.kill(actor)


_HANDLES: dict[tuple[str, str], Any] = {}


def _node_ip() -> str:
    """This node's IP as Ray knows it (what other nodes reach it at); loopback outside Ray."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"
