"""The ranks' output channel into the ingress: one pump per rank moves its batched chunks into the
inboxes of the requests waiting on them.

A rank pushes each batch (every request's chunks from about one engine step, plus the rank's stats)
over ZMQ to a PULL socket bound here (`DPRank.push_outputs`), or, with `output_transport: ray` or
when its ZMQ channel does not connect, as a Ray streaming call (`DPRank.output_stream`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from deployments.config import ServingSection

logger = logging.getLogger("dpserve.app")

# (rank, group generation, stats) -> None: a rank's stats arrived with its output.
StatsSink = Callable[[int, int, dict[str, Any]], None]
# (rank, group generation, reason) -> None: a rank's channel broke.
BrokenSink = Callable[[int, int, str], None]


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

    def __init__(self, serving: ServingSection, on_stats: StatsSink, on_broken: BrokenSink) -> None:
        self.serving = serving
        self.on_stats = on_stats
        self.on_broken = on_broken
        # request id -> (rank, group generation, queue of its chunks)
        self.inboxes: dict[str, tuple[int, int, asyncio.Queue]] = {}
        self.pumps: list[asyncio.Task] = []
        self.start_info: list[dict[str, Any]] = []  # per rank: where it runs (node_id)

    # ---- requests --------------------------------------------------------------------------------
    def open(self, request_id: str, rank: int, generation: int) -> asyncio.Queue:
        """The inbox request `request_id` reads its chunks from (or an exception: its rank broke)."""
        inbox: asyncio.Queue = asyncio.Queue()
        self.inboxes[request_id] = (rank, generation, inbox)
        return inbox

    def close(self, request_id: str) -> None:
        self.inboxes.pop(request_id, None)

    # ---- pumps -----------------------------------------------------------------------------------
    def start(self, actors: list[Any], generation: int, start_info: list[dict[str, Any]]) -> None:
        """Replace the pumps with one per rank of group `generation`."""
        self.stop()
        self.start_info = list(start_info)
        loop = asyncio.get_running_loop()
        self.pumps = [loop.create_task(self.pump(r, a, generation)) for r, a in enumerate(actors)]

    def stop(self) -> None:
        for task in self.pumps:
            task.cancel()
        self.pumps = []

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

    def deliver(self, rank: int, generation: int, batch: list, stats: dict[str, Any]) -> None:
        self.on_stats(rank, generation, stats)
        for request_id, chunk in batch:
            entry = self.inboxes.get(request_id)
            if entry is not None and entry[1] == generation:
                entry[2].put_nowait(chunk)

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
        port = sock.bind_to_random_port(f"tcp://{host}")
        decode = msgspec.msgpack.Decoder().decode
        pushing = actor.push_outputs.remote(f"tcp://{host}:{port}")

        def take(message: Any) -> None:
            try:
                batch, stats = decode(message)
                self.deliver(rank, generation, batch, stats)
            except (msgspec.DecodeError, ValueError, TypeError) as exc:  # not from a rank: drop it
                logger.warning("dropped a malformed message on rank %d's output channel: %s", rank, exc)

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
            done, _ = await asyncio.wait({receiving, watching}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the rank's failure (or a receive error)
        finally:
            for task in (first, receiving, watching):
                if task is not None:
                    task.cancel()
            cancel_ref(pushing)
            ctx.destroy(linger=0)

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
