"""The ranks' output channel into the ingress: one pump per rank moves its batched chunks into the
inboxes of the requests waiting on them.

A rank pushes each batch (every request's chunks from about one engine step, plus the rank's stats)
over ZMQ to a PULL socket bound here (`DPRank.push_outputs`), or, with `output_transport: ray` or
when its ZMQ channel does not connect, as a Ray streaming call (`DPRank.output_stream`).

ZMQ frames are sealed with the group's key (scheduler/frame_auth.py: made here for each generation and
handed to the ranks in the `push_outputs` call) and numbered per rank: a frame that does not verify,
does not decode or repeats a number is dropped and counted; a gap in the numbers means frames were
lost, and every request then in flight on that rank ends with a clear error and is aborted there
(which of them lost a chunk is unknown; the rank and the group serve on).

With ZMQ, new requests and aborts travel the other way over the same kind of channel
(deployments/request_channel.py: each rank binds a request socket once its output channel works; the
ingress connects to it); until then, and with `output_transport: ray`, they are Ray calls.

Each request may have a deadline (`serving.request_timeout_s`): past it the request gets a 504 error
chunk and is aborted on its rank.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from deployments.config import ServingSection
from deployments.frame_sequence import FrameSequence, open_numbered
from scheduler.frame_auth import FrameAuth, new_key

logger = logging.getLogger("dpserve.app")

# (rank, group generation, stats) -> None: a rank's stats arrived with its output.
StatsSink = Callable[[int, int, dict[str, Any]], None]
# (rank, group generation, reason) -> None: a rank's channel broke.
BrokenSink = Callable[[int, int, str], None]
# (rank, reason) -> None: a frame on a rank's ZMQ channel was dropped.
DropSink = Callable[[int, str], None]


class OutputChannelUnreachable(ConnectionError):
    """A rank's ZMQ output channel did not connect to the ingress (e.g. a firewalled port)."""


def cancel_ref(ref: Any) -> None:
    """Stop a rank's long-running call (best effort: the rank may already be gone)."""
    import ray

    if isinstance(ref, ray.ObjectRef):
        try:
            ray.cancel(ref)
        except Exception:
            pass


class OutputChannel:
    """Request inboxes and the per-rank pumps that fill them."""

    def __init__(self, serving: ServingSection, on_stats: StatsSink, on_broken: BrokenSink,
                 on_drop: DropSink | None = None) -> None:  # fmt: skip
        self.serving = serving
        self.on_stats = on_stats
        self.on_broken = on_broken
        self.on_drop = on_drop
        # request id -> (rank, group generation, queue of its chunks)
        self.inboxes: dict[str, tuple[int, int, asyncio.Queue]] = {}
        self.deadlines: dict[str, asyncio.TimerHandle] = {}  # request id -> its timeout
        self.pumps: list[asyncio.Task] = []
        self.actors: list[Any] = []
        self.generation = 0
        self.start_info: list[dict[str, Any]] = []  # per rank: where it runs (node_id)
        self.key = new_key()  # this generation's frame key (a new one per generation)
        # Per rank of this generation: the PULL socket's address, frames dropped by reason, frames lost.
        self.addresses: dict[int, str] = {}
        self.senders: dict[int, Any] = {}  # rank -> RequestSender, once its request socket is open
        self.submits: dict[int, list[int]] = {}  # rank -> [requests sent over its socket, over Ray]
        # Per rank: requests sent over its socket whose first chunk has not come yet, and how many
        # request frames the rank last said were lost (its stats' `request_channel.lost`).
        self.unacknowledged: dict[int, set[str]] = {}
        self.request_frames_lost: dict[int, int] = {}
        self.dropped: dict[int, dict[str, int]] = {}
        self.lost: dict[int, int] = {}
        self.timed_out = 0

    # ---- requests --------------------------------------------------------------------------------
    def open(self, request_id: str, rank: int, generation: int) -> asyncio.Queue:
        """The inbox request `request_id` reads its chunks from (or an exception: its rank broke)."""
        inbox: asyncio.Queue = asyncio.Queue()
        self.inboxes[request_id] = (rank, generation, inbox)
        timeout = self.serving.request_timeout_s
        if timeout is not None:
            loop = asyncio.get_running_loop()
            self.deadlines[request_id] = loop.call_later(timeout, self._expire, request_id, timeout)
        return inbox

    def close(self, request_id: str) -> None:
        entry = self.inboxes.pop(request_id, None)
        if entry is not None:
            self.unacknowledged.get(entry[0], set()).discard(request_id)
        timer = self.deadlines.pop(request_id, None)
        if timer is not None:
            timer.cancel()

    def _end(self, request_id: str, message: str, status: int) -> None:
        """End request `request_id` with an error chunk (this request only) and abort it on its rank."""
        entry = self.inboxes.get(request_id)
        if entry is None:
            return
        rank, generation, inbox = entry
        inbox.put_nowait({"error": message, "status": status})
        self.abort(rank, generation, request_id)  # frees its batch slot and KV cache

    def submit(self, rank: int, request_id: str, prompt: Any, sampling: dict[str, Any],
               messages: list | None, stream_interval_ms: float) -> bool:  # fmt: skip
        """Send a new request to rank `rank` of this generation over its request socket; False when
        there is none or it cannot take the frame now (the caller then uses the rank's Ray call)."""
        sender = self.senders.get(rank)
        sent = sender is not None and sender.submit(
            request_id, prompt, sampling, messages, stream_interval_ms
        )
        self.submits.setdefault(rank, [0, 0])[0 if sent else 1] += 1
        if sent:
            self.unacknowledged.setdefault(rank, set()).add(request_id)
        return sent

    def abort(self, rank: int, generation: int, request_id: str) -> None:
        """Stop request `request_id` on rank `rank` of group `generation` (nothing if that group is gone)."""
        if generation != self.generation or rank >= len(self.actors):
            return
        sender = self.senders.get(rank)
        if sender is not None and sender.abort(request_id):
            return
        try:
            self.actors[rank].abort.remote(request_id)
        except Exception:  # the rank is gone: nothing left to free
            pass

    def fail_generation(self, generation: int, reason: str) -> None:
        """Every request waiting on group `generation` gets a rank failure (the group is going)."""
        for _, g, inbox in list(self.inboxes.values()):
            if g == generation:
                inbox.put_nowait(ConnectionError(reason))

    def _expire(self, request_id: str, timeout: float) -> None:
        self.deadlines.pop(request_id, None)
        self.timed_out += 1
        logger.warning(
            "request %s exceeded serving.request_timeout_s (%g s); aborting it", request_id, timeout
        )
        self._end(request_id, f"the request did not finish within serving.request_timeout_s ({timeout:g} s) "
                              "and was aborted", 504)  # fmt: skip

    # ---- pumps -----------------------------------------------------------------------------------
    def start(self, actors: list[Any], generation: int, start_info: list[dict[str, Any]]) -> None:
        """Replace the pumps with one per rank of group `generation`."""
        self.stop()
        self.start_info = list(start_info)
        self.actors, self.generation, self.key = list(actors), generation, new_key()
        self.addresses, self.lost = {}, {r: 0 for r in range(len(actors))}
        self.submits = {r: [0, 0] for r in range(len(actors))}
        self.unacknowledged = {r: set() for r in range(len(actors))}
        self.request_frames_lost = {r: 0 for r in range(len(actors))}
        self.dropped = {r: {} for r in range(len(actors))}
        loop = asyncio.get_running_loop()
        self.pumps = [loop.create_task(self.pump(r, a, generation)) for r, a in enumerate(actors)]

    def stop(self) -> None:
        for task in self.pumps:
            task.cancel()
        self.pumps = []
        for sender in self.senders.values():
            sender.close()
        self.senders = {}

    async def pump(self, rank: int, actor: Any, generation: int) -> None:
        """Move rank `rank`'s batched output into the requests' inboxes. If the rank's channel breaks,
        every request waiting on that rank gets the error (and `on_broken` is told)."""
        try:
            if self.serving.output_transport == "zmq":
                try:
                    await self._pump_zmq(rank, actor, generation)
                except OutputChannelUnreachable as exc:
                    logger.warning("%s; rank %d's output goes through Ray instead", exc, rank)
                else:
                    raise RuntimeError("the output channel ended")
            async for ref in actor.output_stream.options(num_returns="streaming").remote():
                self.deliver(rank, generation, *await ref)
            raise RuntimeError("the output channel ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.on_broken(rank, generation, f"rank {rank}'s output channel broke ({type(exc).__name__})")
            for r, g, inbox in list(self.inboxes.values()):
                if r == rank and g == generation:
                    inbox.put_nowait(exc)

    def stats(self) -> dict[str, Any]:
        """For /dpserve/status: per rank the PULL address, dropped frames by reason, lost frames."""
        return {"transport": self.serving.output_transport, "timed_out_requests": self.timed_out,
                "ranks": {r: {"address": self.addresses.get(r), "dropped": dict(self.dropped.get(r, {})),
                              "lost": self.lost.get(r, 0),
                              "requests": self.senders[r].address if r in self.senders else None,
                              "submitted": dict(zip(("socket", "ray"), self.submits.get(r, [0, 0]), strict=True))}
                          for r in range(len(self.actors))}}  # fmt: skip

    def _drop(self, rank: int, reason: str, size: int) -> None:
        counts = self.dropped.setdefault(rank, {})
        n = counts[reason] = counts.get(reason, 0) + 1
        if n == 1 or n % 1000 == 0:  # a flood must not flood the log as well
            logger.warning("dropped a %d-byte frame on rank %d's output channel (%s; %d so far)",
                           size, rank, reason, n)  # fmt: skip
        if self.on_drop is not None:
            self.on_drop(rank, reason)

    def _frames_lost(self, rank: int, generation: int, missing: int) -> None:
        """`missing` frames of rank `rank` never arrived: the requests in flight there may each have
        lost a chunk, so each ends with a clear error (and is aborted on the rank)."""
        self.lost[rank] = self.lost.get(rank, 0) + missing
        affected = [rid for rid, (r, g, _) in self.inboxes.items() if r == rank and g == generation]
        logger.error("%d output frame(s) of rank %d were lost; ending its %d requests in flight",
                     missing, rank, len(affected))  # fmt: skip
        for request_id in affected:
            self._end(request_id, f"{missing} output frame(s) from DP rank {rank} were lost, so this "
                                  "request's output is incomplete; retry it", 503)  # fmt: skip

    def deliver(self, rank: int, generation: int, batch: list, stats: dict[str, Any]) -> None:
        self.on_stats(rank, generation, stats)
        waiting = self.unacknowledged.get(rank, set())
        for request_id, chunk in batch:
            entry = self.inboxes.get(request_id)
            if entry is not None and entry[1] == generation:
                entry[2].put_nowait(chunk)
                waiting.discard(request_id)
        lost = (stats.get("request_channel") or {}).get("lost", 0)
        if (
            generation == self.generation
            and isinstance(lost, int)
            and lost > self.request_frames_lost.get(rank, 0)
        ):
            self._request_frames_lost(rank, lost)

    def _request_frames_lost(self, rank: int, lost: int) -> None:
        """Rank `rank` says request frames were lost: any request it has not acknowledged may be one
        of them, so each ends now with a clear error (and an abort, in case it did arrive)."""
        self.request_frames_lost[rank] = lost
        affected = sorted(self.unacknowledged.get(rank, set()))
        logger.error("request frames to rank %d were lost (%d so far); ending its %d unacknowledged requests",
                     rank, lost, len(affected))  # fmt: skip
        for request_id in affected:
            self._end(request_id, f"the request may not have reached DP rank {rank} (request frames were "
                                  "lost); retry it", 503)  # fmt: skip

    async def _pump_zmq(self, rank: int, actor: Any, generation: int) -> None:
        """The rank pushes its batches to a PULL socket bound here (`DPRank.push_outputs`); the Ray
        call that does it stays open, and its failure (the rank died) ends the pump."""
        import msgspec
        import zmq
        import zmq.asyncio

        host = self.output_host(rank)
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        # A larger message drops its sender's connection before it is held in memory; the rank
        # splits its batches to fit (`RankOutbox.push`), so only a stranger's message is cut.
        max_frame = self.serving.max_output_frame_bytes
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        port = sock.bind_to_random_port(f"tcp://{host}")
        address = self.addresses[rank] = f"tcp://{host}:{port}"
        decode = msgspec.msgpack.Decoder().decode
        auth = FrameAuth(self.key)
        pushing = actor.push_outputs.remote(address, self.key, max_frame)
        sequence = FrameSequence()

        def take(message: Any) -> None:
            frame = message.bytes
            opened = open_numbered(auth, frame)
            if opened is None:
                return self._drop(rank, "unauthenticated", len(frame))
            seq, payload = opened
            try:
                batch, stats = decode(payload)
                if not isinstance(batch, list) or not isinstance(stats, dict):
                    raise TypeError("not a (batch, stats) pair")
            except (msgspec.DecodeError, ValueError, TypeError):
                return self._drop(rank, "malformed", len(frame))
            missing = sequence.take(seq)
            if missing is None:  # a replay of a frame already taken
                return self._drop(rank, "replayed", len(frame))
            if missing:
                self._frames_lost(rank, generation, missing)
            try:
                self.deliver(rank, generation, batch, stats)
            except (ValueError, TypeError):  # authentic, yet not a list of (request id, chunk)
                self._drop(rank, "malformed", len(frame))

        async def receive() -> None:
            while True:
                take(await sock.recv(copy=False))

        first = asyncio.ensure_future(sock.recv(copy=False))
        watching = asyncio.ensure_future(pushing)
        receiving = None
        try:
            # The rank's first message (an empty batch) proves the channel; a firewalled port would
            # otherwise leave every request on this rank waiting forever.
            timeout = self.serving.output_connect_timeout_s
            done, _ = await asyncio.wait(
                {first, watching}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if first not in done:
                if watching in done:
                    watching.result()  # the rank's failure
                    raise RuntimeError("the rank's output channel ended")
                raise OutputChannelUnreachable(
                    f"rank {rank} did not reach this ingress at tcp://{host}:{port} within {timeout:.0f} s"
                )
            take(first.result())
            receiving = asyncio.ensure_future(receive())
            await self._open_requests(rank, actor, generation, host == "127.0.0.1")
            done, _ = await asyncio.wait({receiving, watching}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the rank's failure (or a receive error)
        finally:
            for task in (first, receiving, watching):
                if task is not None:
                    task.cancel()
            cancel_ref(pushing)
            ctx.destroy(linger=0)
            sender = self.senders.pop(rank, None) if generation == self.generation else None
            if sender is not None:  # (a newer generation's `start` closed this one's senders)
                sender.close()

    async def _open_requests(self, rank: int, actor: Any, generation: int, local: bool) -> None:
        """Have rank `rank` bind its request socket and connect to it (deployments/request_channel.py).
        If that fails the rank's requests stay Ray calls: slower, not broken."""
        from deployments.request_channel import RequestSender, max_request_frame_bytes

        try:
            max_frame = max_request_frame_bytes(self.serving.max_body_bytes, self.serving.max_prompt_chars)
            ref = actor.open_requests.remote(local, self.key, max_frame)
            address = await asyncio.wait_for(ref, self.serving.output_connect_timeout_s)
            if generation == self.generation:
                self.senders[rank] = RequestSender(address, self.key, max_frame)
        except Exception as exc:
            logger.warning("rank %d's request channel did not open (%s: %s); its requests go through Ray",
                           rank, type(exc).__name__, exc)  # fmt: skip

    def output_host(self, rank: int) -> str:
        """Where this ingress binds rank `rank`'s output socket: loopback when the rank runs on this
        node (nothing off the node can reach it), else this node's Ray address."""
        import ray

        if not ray.is_initialized():
            return "127.0.0.1"
        infos = self.start_info
        if rank < len(infos) and infos[rank].get("node_id") == ray.get_runtime_context().get_node_id():
            return "127.0.0.1"
        return ray.util.get_node_ip_address()
