"""A rank's multiplexed output: every request's chunks go into one outbox that the ingress drains
through one channel (one message per batch, not per request and token).

A batch is a list of (request id, chunk); a chunk is a plain dict (`text`, `token_ids`,
`finish_reason`, or for a request that failed `request_errors.error_reply`: `error` + `status`,
and `rank_failed` when the engine is gone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from deployments.frame_sequence import seal_numbered
from deployments.request_errors import RequestError, error_reply
from scheduler.frame_auth import FrameAuth

logger = logging.getLogger("dpserve.rank")

Batch = list[tuple[str, dict[str, Any]]]
TEXT_CHUNK_KEYS = frozenset({"text", "token_ids", "finish_reason"})


def split_chunk(chunk: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A text chunk as two consecutive ones that carry the same text and token ids between them (the
    ingress concatenates text and counts token ids; `finish_reason` stays on the second); None for any
    other chunk (`prompt_tokens`, an error: small) or one of at most a character and a token."""
    if chunk.keys() != TEXT_CHUNK_KEYS:
        return None
    text, ids = chunk["text"], chunk["token_ids"]
    if len(text) <= 1 and len(ids) <= 1:
        return None
    t, i = len(text) // 2, len(ids) // 2
    return ({"text": text[:t], "token_ids": ids[:i], "finish_reason": None},
            {"text": text[t:], "token_ids": ids[i:], "finish_reason": chunk["finish_reason"]})  # fmt: skip


def halves(batch: Batch) -> tuple[Batch, Batch] | None:
    """`batch` as two batches that deliver the same chunks in the same order (a lone chunk split by
    `split_chunk`), or None when it cannot be split."""
    if len(batch) > 1:
        mid = len(batch) // 2
        return batch[:mid], batch[mid:]
    if not batch:
        return None
    request_id, chunk = batch[0]
    pieces = split_chunk(chunk)
    return None if pieces is None else ([(request_id, pieces[0])], [(request_id, pieces[1])])


def fitting_payloads(encode: Callable[[Any], bytes], batch: Batch, stats: dict[str, Any],
                     max_bytes: int) -> Iterator[bytes]:  # fmt: skip
    """`(batch, stats)` encoded as payloads of at most `max_bytes` each where it can be split that
    far (every part carries `stats`); one payload, as usual, when it fits. A batch is every chunk
    queued since the last send: an engine step's worth (kilobytes) normally, without bound after the
    ingress stalled, so only the frames' size can be bounded."""
    payload = encode((batch, stats))
    parts = halves(batch) if len(payload) > max_bytes else None
    if parts is None:  # fits, or cannot be split: one small chunk, far below the least bound allowed
        yield payload
        return
    for part in parts:
        yield from fitting_payloads(encode, part, stats, max_bytes)


class RankOutbox:
    """The outbox of DP rank `rank`; `get_stats` gives the rank's stats sent with each batch."""

    def __init__(self, rank: int, get_stats: Callable[[], dict[str, Any]]) -> None:
        self.rank = rank
        self.get_stats = get_stats
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.tasks: dict[str, asyncio.Task] = {}  # request id -> the task feeding its chunks
        self.seq = 0  # the next output frame's number on the ZMQ channel (`push`)

    def start(self, request_id: str, chunks: AsyncIterator[dict[str, Any]]) -> None:
        """Feed request `request_id`'s chunks into the outbox in the background."""
        self.tasks[request_id] = asyncio.get_running_loop().create_task(self._run(request_id, chunks))

    def cancel(self, request_id: str) -> bool:
        """Stop feeding request `request_id` (its chunk source frees the engine's slot); False when
        the outbox does not hold it."""
        task = self.tasks.pop(request_id, None)
        if task is None:
            return False
        task.cancel()
        return True

    async def _run(self, request_id: str, chunks: AsyncIterator[dict[str, Any]]) -> None:
        try:
            finished = False
            async for chunk in chunks:
                self.queue.put_nowait((request_id, chunk))
                finished = chunk.get("finish_reason") is not None  # the first chunk has none
            if not finished:  # the engine ended the stream without a final output: say so
                self.queue.put_nowait((request_id, {"text": "", "token_ids": [], "finish_reason": "abort"}))
        except asyncio.CancelledError:
            pass  # aborted by the ingress: the chunk source freed the engine's slot
        except RequestError as exc:  # this request's own error: the rank serves on
            logger.info(
                "request %s failed on rank %d: %s (%d)", request_id, self.rank, exc.message, exc.status
            )
            self.queue.put_nowait((request_id, error_reply(exc)))
        except Exception as exc:
            logger.exception("request %s failed on rank %d", request_id, self.rank)
            self.queue.put_nowait((request_id, error_reply(exc)))
        finally:
            self.tasks.pop(request_id, None)

    async def next_batch(self) -> Batch:
        """All chunks ready now (at least one): typically one engine step's worth for all running
        requests."""
        batch = [await self.queue.get()]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    async def stream(self) -> AsyncIterator[tuple[Batch, dict[str, Any]]]:
        """Batches with the rank's stats as of then, for a Ray stream (`DPRank.output_stream`)."""
        while True:
            yield await self.next_batch(), self.get_stats()

    async def push(self, address: str, key: bytes, max_frame_bytes: int) -> None:
        """The same batches and stats, msgpack-encoded and pushed over ZMQ to the ingress's PULL
        socket at `address` (``tcp://host:port``), each frame numbered and sealed with the group's
        `key` (deployments/output_channel.py checks both) and at most `max_frame_bytes` long (the
        ingress's socket cuts longer ones: a batch that does not fit goes as several frames,
        `fitting_payloads`). Runs until cancelled.

        Why not a Ray stream: each streamed item costs a serialisation in an executor thread plus
        core-worker RPCs on both sides, about half the rank actor's and much of the ingress's CPU at
        one item per engine step (py-spy, benchmarks/results/serving.md). A ZMQ message is one
        syscall; vLLM moves the same outputs from its engine core the same way."""
        import msgspec
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        # Sends wait for a completed connection instead of queueing: if the ingress cannot be reached
        # no chunk is taken from the outbox, and the ingress's fallback (`stream`) gets them.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(address)
        encode = msgspec.msgpack.Encoder().encode
        auth = FrameAuth(key)
        max_payload = max_frame_bytes - len(seal_numbered(auth, 0, b""))  # less the tag and the number
        self.seq = 0  # the next frame's number (an attribute: a fault test skips one to lose a frame)

        async def send(batch: Batch) -> None:
            for payload in fitting_payloads(encode, batch, self.get_stats(), max_payload):
                sealed = seal_numbered(auth, self.seq, payload)
                self.seq += 1
                await sock.send(sealed, copy=False)

        try:
            await send([])  # an empty batch first: tells the ingress the channel works
            while True:
                await send(await self.next_batch())
        finally:
            ctx.destroy(linger=0)
