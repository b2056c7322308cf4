"""The ingress-to-rank direction of the ZMQ channel: new requests and aborts.

Each rank binds a PULL socket (`RequestReceiver`, started by `DPRank.open_requests`); the ingress
connects one PUSH socket per rank (`RequestSender`). A message is one frame, numbered and sealed like
the output frames (deployments/frame_sequence.py), with a key derived from the group's
(`request_key`; scheduler/frame_auth.py):

    ["submit", request_id, prompt, sampling, messages, stream_interval_ms]
    ["abort", request_id]

A submitted request's reply (`prompt_tokens`, or its error) comes back as the first chunk of its
output on the rank's output channel (deployments/rank_outbox.py), so a request costs no Ray call.

Why: a Ray actor call per request costs a serialisation, a task submission and a reply on both sides,
about as much CPU as the request's whole output stream (benchmarks/results/serving.md); a ZMQ frame
is one syscall. The rank binds and the ingress connects, so a stranger who connects to the rank's
port can only send frames, which it drops unread (no valid tag); a PUSH socket bound by the ingress
would hand requests round-robin to whoever connected.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from deployments.frame_sequence import FrameSequence, open_numbered, seal_numbered
from scheduler.frame_auth import FrameAuth

logger = logging.getLogger("dpserve.rank")

# (request id, prompt, sampling, messages, stream_interval_ms) -> None
SubmitSink = Callable[[str, Any, dict[str, Any], list | None, float], None]
AbortSink = Callable[[str], None]
# (reason) -> None: a frame was dropped (`RequestReceiver.dropped`'s reasons).
DropSink = Callable[[str], None]


def request_key(group_key: bytes) -> bytes:
    """This direction's key, derived from the group's: an output frame replayed onto a request
    socket (both are numbered from 0) does not verify."""
    return hmac.digest(group_key, b"dpserve request channel", "sha256")


def max_request_frame_bytes(max_body_bytes: int, max_prompt_chars: int) -> int:
    """The largest request frame the ingress can need to send: a body the ingress accepted, or a
    prompt of `max_prompt_chars` characters of up to 4 UTF-8 bytes, plus room for the rest."""
    return max(max_body_bytes, 4 * max_prompt_chars) + (1 << 20)


class RequestSender:
    """The ingress's PUSH socket to one rank's request PULL socket at `address`.

    Sends never wait: a frame the socket cannot take now (no completed connection, or its queue full)
    is refused (`False`), and the caller uses the rank's Ray call instead."""

    def __init__(self, address: str, key: bytes, max_frame_bytes: int) -> None:
        import zmq

        self.address = address
        self.max_frame_bytes = max_frame_bytes
        self._ctx = zmq.Context()
        try:
            self._sock = self._ctx.socket(zmq.PUSH)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.IMMEDIATE, 1)  # refuse, rather than queue for a peer not yet there
            self._sock.connect(address)
        except BaseException:
            self._ctx.destroy(linger=0)  # a context with an open socket would block when collected
            raise
        self._encode = msgspec.msgpack.Encoder().encode
        self._auth = FrameAuth(request_key(key))
        self._seq = 0

    def _send(self, message: list[Any]) -> bool:
        import zmq

        try:
            frame = seal_numbered(self._auth, self._seq, self._encode(message))
            if len(frame) > self.max_frame_bytes:  # the rank's socket would drop the connection
                return False
            self._sock.send(frame, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except (TypeError, ValueError, OverflowError, zmq.ZMQError):  # not encodable, socket closed
            logger.warning("a request frame could not be sent; using the Ray call", exc_info=True)
            return False
        self._seq += 1
        return True

    def submit(self, request_id: str, prompt: Any, sampling: dict[str, Any], messages: list | None,
               stream_interval_ms: float) -> bool:  # fmt: skip
        """Send a new request; False if the socket cannot take it now."""
        return self._send(["submit", request_id, prompt, sampling, messages, float(stream_interval_ms)])

    def abort(self, request_id: str) -> bool:
        return self._send(["abort", request_id])

    def close(self) -> None:
        self._ctx.destroy(linger=0)


class RequestReceiver:
    """A rank's request PULL socket: checks each frame (tag, number, shape) and hands submits and
    aborts to `on_submit` / `on_abort`. Frames that fail a check are dropped and counted in
    `dropped` (by reason; each also told to `on_drop`: the rank exports them as a metric); a gap in
    the numbers is counted in `lost`, which the rank's stats carry to the ingress (it then ends the
    requests the rank has not acknowledged)."""

    def __init__(self, key: bytes, on_submit: SubmitSink, on_abort: AbortSink, max_frame_bytes: int,
                 on_drop: DropSink | None = None) -> None:  # fmt: skip
        self.key = request_key(key)
        self.max_frame_bytes = max_frame_bytes
        self.on_submit = on_submit
        self.on_abort = on_abort
        self.on_drop = on_drop
        self.address: str | None = None
        self.dropped: dict[str, int] = {}
        self.sequence = FrameSequence()
        self._task: asyncio.Task | None = None
        self._ctx: Any = None

    def bind(self, host: str) -> str:
        """Bind on `host` (a random port) and start receiving; returns ``tcp://host:port``."""
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        # A larger message drops its sender's connection before it is held in memory: a stranger
        # cannot make the rank buffer gigabytes (frames are only checked once received).
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        port = sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._task = asyncio.get_running_loop().create_task(self._receive(sock))
        return self.address

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    @property
    def lost(self) -> int:
        """Request frames that never arrived (gaps in the numbers)."""
        return self.sequence.lost

    def stats(self) -> dict[str, Any]:
        return {"address": self.address, "dropped": dict(self.dropped), "lost": self.lost}

    async def _receive(self, sock: Any) -> None:
        decode = msgspec.msgpack.Decoder().decode
        auth = FrameAuth(self.key)
        while True:
            frame = (await sock.recv(copy=False)).bytes
            try:
                self.take(frame, auth, decode)
            except Exception:  # a bug in a handler must not end the channel
                logger.exception("request frame handling failed")

    def _drop(self, reason: str, size: int) -> None:
        n = self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if n == 1 or n % 1000 == 0:
            logger.warning("dropped a %d-byte frame on the request channel (%s; %d so far)", size, reason, n)
        if self.on_drop is not None:
            self.on_drop(reason)

    def take(self, frame: bytes, auth: FrameAuth, decode: Callable[[Any], Any]) -> None:
        """Check one frame and act on it."""
        opened = open_numbered(auth, frame)
        if opened is None:
            return self._drop("unauthenticated", len(frame))
        seq, payload = opened
        try:
            message = decode(payload)
            op, request_id = message[0], message[1]
            if not isinstance(request_id, str):
                raise TypeError("request id is not a string")
            if op == "submit":
                _, _, prompt, sampling, messages, interval = message
                if not isinstance(sampling, dict) or not isinstance(interval, float):
                    raise TypeError("bad submit")
            elif op != "abort" or len(message) != 2:
                raise TypeError(f"unknown message {op!r}")
        except (msgspec.DecodeError, ValueError, TypeError, IndexError):
            return self._drop("malformed", len(frame))
        missing = self.sequence.take(seq)
        if missing is None:
            return self._drop("replayed", len(frame))
        if missing:
            logger.error("%d request frame(s) to this rank were lost", missing)
        if op == "submit":
            self.on_submit(request_id, prompt, sampling, messages, interval)
        else:
            self.on_abort(request_id)
