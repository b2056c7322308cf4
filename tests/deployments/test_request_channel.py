"""The request direction of the ZMQ channel (deployments/request_channel.py) over real loopback
sockets: submits and aborts arrive in order and intact; forged, malformed and replayed frames are
dropped and counted, a gap in the numbers is counted; a sender with no peer refuses instead of
queueing."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import zmq

from deployments.output_channel import SEQ
from deployments.request_channel import RequestReceiver, RequestSender
from scheduler.frame_auth import FrameAuth, new_key


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def submit(self, *args: Any) -> None:
        self.events.append(("submit", *args))

    def abort(self, request_id: str) -> None:
        self.events.append(("abort", request_id))


async def _until(cond, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _send_until_taken(sender: RequestSender, send) -> None:
    """Send once the connection is up (a sender refuses frames before that)."""
    deadline = asyncio.get_running_loop().time() + 10
    while not send():
        assert asyncio.get_running_loop().time() < deadline, f"{sender.address} never connected"
        await asyncio.sleep(0.01)


def test_submits_and_aborts_arrive_in_order_and_intact() -> None:
    async def main() -> None:
        key, sink = new_key(), _Sink()
        receiver = RequestReceiver(key, sink.submit, sink.abort)
        sender = RequestSender(receiver.bind("127.0.0.1"), key)
        try:
            sampling = {"max_tokens": 8, "temperature": 0.0, "stop": ["\n"]}
            chat = [{"role": "user", "content": "hi"}]
            await _send_until_taken(sender, lambda: sender.submit("r1", "a prompt", sampling, None, 0))
            assert sender.submit("r2", [1, 2, 3], {}, chat, 50.0)
            assert sender.abort("r1")
            await _until(lambda: len(sink.events) == 3)
            assert sink.events == [
                ("submit", "r1", "a prompt", sampling, None, 0.0),
                ("submit", "r2", [1, 2, 3], {}, chat, 50.0),
                ("abort", "r1"),
            ]
            assert receiver.dropped == {} and receiver.lost == 0
        finally:
            sender.close()
            receiver.close()

    asyncio.run(main())


def test_forged_malformed_replayed_and_lost_frames() -> None:
    async def main() -> None:
        key, sink = new_key(), _Sink()
        receiver = RequestReceiver(key, sink.submit, sink.abort)
        address = receiver.bind("127.0.0.1")
        auth, encode = FrameAuth(key), msgspec.msgpack.encode

        def sealed(seq: int, message: Any, with_auth: FrameAuth = auth) -> bytes:
            body = message if isinstance(message, bytes) else encode(message)
            return with_auth.seal(SEQ.pack(seq) + body)

        frames = [
            sealed(0, ["abort", "a"]),
            b"garbage",  # no tag
            sealed(1, ["abort", "forged"], FrameAuth(new_key())),  # a key nobody in the group holds
            sealed(1, b"\xc1 not msgpack"),
            sealed(1, ["explode", "x"]),  # unknown operation
            sealed(1, ["submit", "s", "prompt", "not a dict", None, 0.0]),
            sealed(1, ["submit", 7, "prompt", {}, None, 0.0]),  # request id not a string
            sealed(0, ["abort", "a"]),  # a replay of frame 0
            sealed(3, ["abort", "b"]),  # frames 1 and 2 never sent
        ]
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(address)
        try:
            for frame in frames:
                sock.send(frame)
            await _until(lambda: len(sink.events) == 2)
            await asyncio.sleep(0.1)  # nothing else may arrive
            assert sink.events == [("abort", "a"), ("abort", "b")]
            assert receiver.dropped == {"unauthenticated": 2, "malformed": 4, "replayed": 1}
            assert receiver.lost == 2
            assert receiver.stats() == {"address": address, "dropped": receiver.dropped, "lost": 2}
        finally:
            ctx.destroy(linger=0)
            receiver.close()

    asyncio.run(main())


def test_a_sender_without_a_peer_refuses_instead_of_queueing() -> None:
    with zmq.Context() as ctx:  # a free port nobody listens on
        probe = ctx.socket(zmq.PULL)
        port = probe.bind_to_random_port("tcp://127.0.0.1")
        probe.close(linger=0)
    sender = RequestSender(f"tcp://127.0.0.1:{port}", new_key())
    try:
        assert not sender.submit("r1", "p", {}, None, 0.0)
        assert not sender.abort("r1")
    finally:
        sender.close()
