"""The ingress's DP rank group: forming it, watching its ranks, routing to them, re-forming it.

In lockstep MoE serving one lost rank breaks every rank's collectives (vLLM's engines on the other
ranks die within seconds), so the group is replaced as a whole: each (re)formed group has a new
`generation`, and state from an older generation is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from deployments.config import DPServeConfig
from deployments.metrics import IngressMetrics
from deployments.output_channel import OutputChannel
from deployments.router import RankLoad, pick_rank

logger = logging.getLogger("dpserve.app")

STATS_POLL_S = 0.2
# Ranks with no request in flight are polled this often instead (each poll is a Ray call on both
# sides: at STATS_POLL_S an idle group's polls were most of the ingress's and the ranks' idle CPU).
IDLE_STATS_POLL_S = 1.0
# Ranks that miss this many consecutive stats polls are treated as dead (no new requests).
DEAD_AFTER_MISSED_POLLS = 10


class Overloaded(Exception):
    """Every live rank is at its admission bound."""


class RecoveryBacklogFull(LookupError):
    """The DP group is being re-formed and as many requests as allowed already wait for it."""


async def _start_rank_group(config: DPServeConfig, generation: int) -> tuple[list[Any], Any, list[dict]]:
    from deployments.rank_group import group_name_prefix, group_platform, start_rank_group

    if config.engine.platform is None:
        # An accelerator platform, once the cluster shows one, is kept in `config` for every later
        # group: re-formed while the accelerator hosts are down, the group waits for them
        # (rank_start_timeout_s) instead of re-forming on CPU bundles. cpu is asked again each time
        # (accelerator hosts may join after the ingress started).
        platform, _ = await asyncio.to_thread(group_platform, config.rank_settings)
        if platform.name != "cpu":
            config.engine.platform = platform.name
    return await start_rank_group(
        config.rank_settings,
        config.serving.placement_strategy,
        name_prefix=group_name_prefix(generation),
        start_timeout_s=config.serving.rank_start_timeout_s,
    )


async def _stop_rank_group(actors: list[Any], pg: Any, timeout_s: float = 30.0) -> None:
    from deployments.rank_group import stop_rank_group

    await stop_rank_group(actors, pg, timeout_s=timeout_s)


class RankGroupSupervisor:
    """One DP group's ranks as the ingress sees them: their handles, stats, in-flight counts and
    liveness, plus the output channel that carries their chunks (and most of their stats).

    `start_group(config, generation)` and `stop_group(actors, pg, timeout_s)` create and stop the
    rank actors (deployments.rank_group by default)."""

    def __init__(
        self,
        config: DPServeConfig,
        metrics: IngressMetrics | Any,
        start_group: Callable[[DPServeConfig, int], Awaitable[tuple[list[Any], Any, list[dict]]]] = (
            _start_rank_group
        ),
        stop_group: Callable[..., Awaitable[None]] = _stop_rank_group,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._start_group = start_group
        self._stop_group = stop_group
        n = config.engine.data_parallel_size
        self.actors: list[Any] = []
        self.pg: Any = None
        self.start_info: list[dict[str, Any]] = []
        self.max_model_len = 0
        self.generation = 0  # bumped each time the DP group is (re)formed
        self.recoveries = 0
        self.recovery_error: str | None = None  # why the last re-formation attempt failed
        self.stats: dict[int, dict[str, Any]] = {r: {} for r in range(n)}
        self.dispatched = {r: 0 for r in range(n)}
        self.served = {r: 0 for r in range(n)}
        self.missed = {r: 0 for r in range(n)}
        # When each rank's stats last arrived (with its output batches, or from a poll) and when its
        # gauges were last set: a rank that streams output is not polled as well.
        self.stats_at = {r: 0.0 for r in range(n)}
        self.gauges_at = {r: 0.0 for r in range(n)}
        self.live: set[int] = set()
        self.ready = asyncio.Event()
        self.waiting_for_recovery = 0  # new requests waiting in `wait_ready` for a re-formed group
        self.channel = OutputChannel(
            config.serving, self.take_stats, self._channel_broke, self._frame_dropped
        )
        # Liveness: per rank the engine step counter last seen and when it last moved (or the rank
        # last had nothing to do); a busy rank whose counter stands still for hang_timeout_s is hung.
        self.step_seen: dict[int, int | None] = {r: None for r in range(n)}
        self.progress_at = {r: 0.0 for r in range(n)}
        self.hangs = 0  # ranks declared hung
        self.recovering_since: float | None = None  # when the running re-formation began
        self._recovery: asyncio.Task | None = None
        self._poller: asyncio.Task | None = None

    # ---- forming ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Form the first group and start polling its stats."""
        await self.form()
        self._poller = asyncio.get_running_loop().create_task(self.poll_stats())

    async def form(self) -> None:
        actors, pg, start_info = await self._start_group(self.config, self.generation + 1)
        self.adopt(actors, pg, start_info)
        self.channel.start(actors, self.generation, start_info)

    def adopt(self, actors: list[Any], pg: Any, start_info: list[dict[str, Any]]) -> None:
        """Take `actors` as the new generation of the group (every rank live, nothing dispatched)."""
        self.actors, self.pg, self.start_info = list(actors), pg, list(start_info)
        self.max_model_len = start_info[0].get("max_model_len", 0) if start_info else 0
        self.generation += 1
        self.missed = {r: 0 for r in self.missed}
        self.stats_at = {r: 0.0 for r in self.stats_at}
        self.dispatched = {r: 0 for r in self.dispatched}  # old generation's requests are gone
        self.step_seen = {r: None for r in self.step_seen}
        self.progress_at = {r: time.monotonic() for r in self.progress_at}
        self.live = set(range(len(self.actors)))
        self.ready.set()

    async def stop(self) -> None:
        """Stop polling, pumping and a re-formation under way, and stop the ranks (their engines exit
        with them). A re-formation is cancelled and awaited first: a start it has under way removes
        what it made (start_rank_group's clean-up), and none finishes after this returns, which would
        leave a group nobody stops (Serve replacing a replica stuck in recovery runs this)."""
        if self._poller is not None:
            self._poller.cancel()
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        self.channel.stop()
        if self.actors:
            await self._stop_group(self.actors, self.pg)

    # ---- failures --------------------------------------------------------------------------------
    def start_recovery(self, reason: str) -> None:
        """Re-form the whole DP group. New requests wait for the new group; requests in flight end
        with a clear error."""
        if self._recovery is not None and not self._recovery.done():
            return
        logger.error("DP group generation %d lost: %s; re-forming it", self.generation, reason)
        self.ready.clear()
        self.live = set()
        self.recovering_since = time.monotonic()
        # The whole group goes: its requests end now (or are retried, before their first token)
        # rather than when the old ranks' channels break.
        self.channel.fail_generation(self.generation, f"the DP group is being re-formed: {reason}")
        self._recovery = asyncio.get_running_loop().create_task(self._recover())

    def _channel_broke(self, rank: int, generation: int, reason: str) -> None:
        if generation == self.generation:
            self.start_recovery(reason)

    async def _recover(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._stop_group(self.actors, self.pg, timeout_s=10)
            except Exception:
                logger.exception("stopping the old DP group failed; continuing")
            try:
                await self.form()
                self.recoveries += 1
                self.recovery_error = None
                self.recovering_since = None
                logger.warning("DP group re-formed (generation %d, attempt %d)", self.generation, attempt)
                return
            except Exception as exc:
                self.recovery_error = f"attempt {attempt}: {type(exc).__name__}: {exc}"
                logger.exception("re-forming the DP group failed (attempt %d); retrying", attempt)
                await asyncio.sleep(min(30, 2**attempt))

    # ---- stats -----------------------------------------------------------------------------------
    def take_stats(self, rank: int, generation: int, stats: dict[str, Any]) -> None:
        """A rank's stats, from its output channel or a poll (the group's `generation` then)."""
        if generation != self.generation:
            return
        if stats.get("errored"):
            self.start_recovery(f"rank {rank}'s engine died")
            return
        now = time.monotonic()
        self.missed[rank] = 0
        self.stats[rank] = stats
        self.stats_at[rank] = now
        if self._hung(rank, stats, now):
            return
        if now - self.gauges_at[rank] >= STATS_POLL_S:  # gauges at the poll rate, not per batch
            self.gauges_at[rank] = now
            self.metrics.rank_gauges(rank, stats)

    def _hung(self, rank: int, stats: dict[str, Any], now: float) -> bool:
        """Whether rank `rank` is hung: requests in flight, yet no engine step for hang_timeout_s
        (its engine is frozen or stuck in a collective; the actor itself still answers). Then the
        group is re-formed."""
        step = stats.get("step")
        busy = stats.get("in_flight", 0) > 0 or self.dispatched[rank] > 0
        if step is None or step != self.step_seen[rank] or not busy:  # no counter: nothing to judge
            self.step_seen[rank], self.progress_at[rank] = step, now
            return False
        stalled = now - self.progress_at[rank]
        if stalled < self.config.serving.hang_timeout_s:
            return False
        self.hangs += 1
        self.start_recovery(
            f"rank {rank} is hung: no engine step for {stalled:.1f} s with {stats.get('in_flight', 0)} "
            f"requests in flight (serving.hang_timeout_s {self.config.serving.hang_timeout_s:g} s)"
        )
        return True

    def _frame_dropped(self, rank: int, reason: str) -> None:
        self.metrics.internal_frame_dropped("output", reason)

    def health_problem(self) -> str | None:
        """Why this ingress cannot serve and will not recover by itself (Serve then replaces it), or
        None: a re-formation running past `serving.max_recovery_s`, or a dead watcher task."""
        bound = self.config.serving.recovery_bound_s
        if self.recovering_since is not None and time.monotonic() - self.recovering_since > bound:
            return (
                f"the DP group has been re-forming for more than {bound:g} s (serving.max_recovery_s); "
                f"last error: {self.recovery_error or 'none yet'}"
            )
        for name, task in (("stats poller", self._poller), ("re-formation", self._recovery)):
            if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
                return f"the {name} task died: {task.exception()!r}"
        return None

    async def poll_stats(self) -> None:
        """Poll the stats of ranks that sent none with their output lately: keeps the router's view
        fresh and notices a dead or hung rank. Busy ranks cost no extra Ray call; ranks with nothing
        in flight are polled every IDLE_STATS_POLL_S (a dead one is still seen at once: its output
        channel's call fails)."""
        while True:
            if self.ready.is_set():
                actors, generation = list(self.actors), self.generation
                now = time.monotonic()
                due = [
                    r
                    for r in range(len(actors))
                    if now - self.stats_at[r] >= (STATS_POLL_S if self.dispatched[r] else IDLE_STATS_POLL_S)
                ]
                results = await asyncio.gather(
                    *[asyncio.wait_for(actors[r].get_stats.remote(), STATS_POLL_S * 5) for r in due],
                    return_exceptions=True,
                )
                for r, res in zip(due, results, strict=True):
                    if generation != self.generation:
                        break
                    if isinstance(res, ray.exceptions.RayActorError):
                        self.start_recovery(f"rank {r} actor died ({type(res).__name__})")
                    elif isinstance(res, BaseException):
                        self.missed[r] += 1
                        if self.missed[r] >= DEAD_AFTER_MISSED_POLLS:
                            self.start_recovery(f"rank {r} stopped answering for {self.missed[r]} polls")
                    else:
                        self.take_stats(r, generation, res)
            await asyncio.sleep(STATS_POLL_S)

    # ---- routing ---------------------------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Return once the group serves; while it is re-formed, wait for it (at most
        `serving.recovery_wait_s`, and only `serving.max_waiting_during_recovery` requests at a time:
        each waiter holds its body and a connection). LookupError when that is not possible."""
        if self.ready.is_set():
            return
        bound = self.config.serving.max_waiting_during_recovery
        if self.waiting_for_recovery >= bound:
            raise RecoveryBacklogFull(
                f"the DP group is being re-formed and {bound} requests already wait for it"
            )
        self.waiting_for_recovery += 1
        try:
            await asyncio.wait_for(self.ready.wait(), self.config.serving.recovery_wait_s)
        except TimeoutError:
            raise LookupError("the DP group is being re-formed") from None
        finally:
            self.waiting_for_recovery -= 1

    def choose_rank(self) -> int:
        """The least-loaded live rank; raises Overloaded when it is at the admission bound."""
        loads = {
            r: RankLoad(self.dispatched[r], self.stats[r].get("running", 0), self.stats[r].get("waiting", 0))
            for r in range(len(self.actors))
        }
        rank = pick_rank(loads, self.live)
        if self.dispatched[rank] >= self.config.queue_bound:
            raise Overloaded()
        return rank

    def is_healthy(self) -> bool:
        return bool(self.live) and all(self.stats[r].get("ready") for r in self.live)

    def rank_states(self) -> list[dict[str, Any]]:
        return [
            dict(
                self.stats[r],
                dispatched=self.dispatched[r],
                served=self.served[r],
                live=r in self.live,
                # the rank actor's process and name (tests and operators find this group's ranks by them)
                pid=self.start_info[r].get("pid") if r < len(self.start_info) else None,
                actor_name=self.start_info[r].get("actor_name") if r < len(self.start_info) else None,
            )
            for r in range(len(self.actors))
        ]

    async def side_actor_states(self) -> dict[str, Any]:
        """The balance coordinator's and the EPLB actor's state (None where that part is off)."""
        from deployments.rank_group import get_eplb_actor

        out: dict[str, Any] = {"balance": None, "eplb": None}
        calls = {}
        balance = self.config.balance
        if balance is not None:
            try:
                coordinator = ray.get_actor(balance.coordinator_name, namespace=balance.namespace)
                calls["balance"] = coordinator.get_stats.remote()
            except ValueError:
                out["balance"] = {"error": "coordinator not running"}
        controller = get_eplb_actor(self.actors)
        if controller is not None:
            calls["eplb"] = controller.get_state.remote()
        for key, ref in calls.items():
            try:
                state = await asyncio.wait_for(ref, 5)
                if key == "eplb":  # the full placement table is too big for a status line
                    state = {k: v for k, v in state.items() if k not in ("placement", "history")}
                out[key] = state
            except Exception as exc:
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}
        return out
