"""The request direction of the ZMQ channel (deployments/request_channel.py) over real loopback
sockets: submits and aborts arrive in order and intact; forged, malformed and replayed frames (and
frames sealed with the group key itself, as output frames are) are dropped and counted, a gap in the
numbers is counted; oversized frames are refused by the sender and cut by the receiver's socket; a
sender with no peer refuses instead of queueing. The rank's side (`DPRank.open_requests`): a request
sent over the socket starts with its `prompt_tokens` chunk, an abort that arrives before its submit
(on another path) keeps the submit from starting, and the frames its socket drops are exported as
`dpserve_internal_frames_dropped{channel="request"}`."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import zmq

from deployments.frame_sequence import SEQ
from deployments.request_channel import RequestReceiver, RequestSender, request_key
from scheduler.frame_auth import FrameAuth, new_key
from tests.helpers import until

MAX_FRAME = 1 << 16


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def submit(self, *args: Any) -> None:
        self.events.append(("submit", *args))

    def abort(self, request_id: str) -> None:
        self.events.append(("abort", request_id))


async def _send_until_taken(sender: RequestSender, send) -> None:
    """Send once the connection is up (a sender refuses frames before that)."""
    deadline = asyncio.get_running_loop().time() + 10
    while not send():
        assert asyncio.get_running_loop().time() < deadline, f"{sender.address} never connected"
        await asyncio.sleep(0.01)


def test_submits_and_aborts_arrive_in_order_and_intact() -> None:
    async def main() -> None:
        key, sink = new_key(), _Sink()
        receiver = RequestReceiver(key, sink.submit, sink.abort, MAX_FRAME)
        sender = RequestSender(receiver.bind("127.0.0.1"), key, MAX_FRAME)
        try:
            sampling = {"max_tokens": 8, "temperature": 0.0, "stop": ["\n"]}
            chat = [{"role": "user", "content": "hi"}]
            await _send_until_taken(sender, lambda: sender.submit("r1", "a prompt", sampling, None, 0))
            assert sender.submit("r2", [1, 2, 3], {}, chat, 50.0)
            assert sender.abort("r1")
            await until(lambda: len(sink.events) == 3)
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
        key, sink, drops = new_key(), _Sink(), []
        receiver = RequestReceiver(key, sink.submit, sink.abort, MAX_FRAME, on_drop=drops.append)
        address = receiver.bind("127.0.0.1")
        auth, encode = FrameAuth(request_key(key)), msgspec.msgpack.encode

        def sealed(seq: int, message: Any, with_auth: FrameAuth = auth) -> bytes:
            body = message if isinstance(message, bytes) else encode(message)
            return with_auth.seal(SEQ.pack(seq) + body)

        frames = [
            sealed(0, ["abort", "a"]),
            b"garbage",  # no tag
            sealed(1, ["abort", "forged"], FrameAuth(new_key())),  # a key nobody in the group holds
            sealed(1, ["abort", "output"], FrameAuth(key)),  # the group key itself (an output frame's)
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
            await until(lambda: len(sink.events) == 2)
            await asyncio.sleep(0.1)  # nothing else may arrive
            assert sink.events == [("abort", "a"), ("abort", "b")]
            assert receiver.dropped == {"unauthenticated": 3, "malformed": 4, "replayed": 1}
            assert sorted(drops) == sorted(r for r, n in receiver.dropped.items() for _ in range(n))
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
    sender = RequestSender(f"tcp://127.0.0.1:{port}", new_key(), MAX_FRAME)
    try:
        assert not sender.submit("r1", "p", {}, None, 0.0)
        assert not sender.abort("r1")
    finally:
        sender.close()


def test_oversized_frames_are_refused_by_the_sender_and_cut_by_the_receiver() -> None:
    async def main() -> None:
        key, sink = new_key(), _Sink()
        receiver = RequestReceiver(key, sink.submit, sink.abort, MAX_FRAME)
        address = receiver.bind("127.0.0.1")
        sender = RequestSender(address, key, MAX_FRAME)
        try:
            await _send_until_taken(sender, lambda: sender.abort("first"))
            assert not sender.submit("big", "x" * MAX_FRAME, {}, None, 0.0)  # the caller uses Ray instead
            # A stranger's oversized message: libzmq drops that connection before holding it.
            ctx = zmq.Context()
            stranger = ctx.socket(zmq.PUSH)
            stranger.connect(address)
            stranger.send(b"\0" * (4 * MAX_FRAME))
            await asyncio.sleep(0.2)
            ctx.destroy(linger=0)
            assert sender.abort("after")
            await until(lambda: len(sink.events) == 2)
            assert sink.events == [("abort", "first"), ("abort", "after")]
            assert receiver.dropped == {} and receiver.lost == 0  # the big message never reached the rank
        finally:
            sender.close()
            receiver.close()

    asyncio.run(main())


class _Out:
    """What `DPRank._chunks` reads from one vLLM RequestOutput."""

    def __init__(self, token: int, finished: bool) -> None:
        self.finished = finished
        self.outputs = [type("C", (), {"text": f"t{token}", "token_ids": [token],
                                       "finish_reason": "length" if finished else None})()]  # fmt: skip


class _Engine:
    errored = False

    def __init__(self) -> None:
        self.started: list[str] = []

    async def generate(self, prompt: Any, params: Any, request_id: str):
        self.started.append(request_id)
        for i in range(params.max_tokens):
            yield _Out(i, i == params.max_tokens - 1)

    async def abort(self, request_id: str) -> None:
        pass


class _Tokenizer:
    def encode(self, text: str, **_: Any) -> list[int]:
        return [1] * len(text)

    def __len__(self) -> int:
        return 100


def test_the_rank_serves_the_socket_and_an_early_abort_keeps_its_submit_from_starting() -> None:
    from deployments.rank import DPRank

    rank = DPRank({"data_parallel_size": 1}, 0, platform_name="cpu")
    rank.engine, rank._max_model_len, rank.tokenizer = _Engine(), 64, _Tokenizer()

    async def main() -> list:
        key = new_key()
        sender = RequestSender(await rank.open_requests(True, key, MAX_FRAME), key, MAX_FRAME)
        try:
            await rank.abort("early")  # a Ray-call abort that overtook its submit
            await _send_until_taken(
                sender, lambda: sender.submit("early", "abc", {"max_tokens": 2}, None, 0.0)
            )
            assert sender.submit("r1", "hello", {"max_tokens": 2}, None, 0.0)
            chunks: list = []
            while len(chunks) < 3:
                chunks += await asyncio.wait_for(rank.outbox.next_batch(), 10)
            return chunks
        finally:
            sender.close()

    try:
        chunks = asyncio.run(main())
    finally:
        rank.engine = None
        rank.shutdown()
    assert chunks == [
        ("r1", {"prompt_tokens": 5, "rank": 0}),
        ("r1", {"text": "t0", "token_ids": [0], "finish_reason": None}),
        ("r1", {"text": "t1", "token_ids": [1], "finish_reason": "length"}),
    ]


class _Counter:
    def __init__(self) -> None:
        self.incs: list[tuple[int, dict[str, str]]] = []

    def inc(self, value: int, tags: dict[str, str]) -> None:
        self.incs.append((value, tags))


def test_the_ranks_dropped_request_frames_are_exported_as_a_metric(monkeypatch) -> None:
    import deployments.metrics as metrics_module
    from deployments.rank import DPRank

    counter = _Counter()
    monkeypatch.setattr(metrics_module, "frames_dropped_counter", lambda: counter)
    rank = DPRank({"data_parallel_size": 1}, 0, platform_name="cpu")

    async def main() -> None:
        address = await rank.open_requests(True, new_key(), MAX_FRAME)
        ctx = zmq.Context()
        try:
            stranger = ctx.socket(zmq.PUSH)
            stranger.connect(address)
            stranger.send(b"garbage")
            stranger.send(FrameAuth(new_key()).seal(SEQ.pack(0) + b"forged"))
            await until(lambda: len(counter.incs) == 2)
        finally:
            ctx.destroy(linger=0)

    try:
        asyncio.run(main())
    finally:
        rank.shutdown()
    assert counter.incs == [(1, {"channel": "request", "reason": "unauthenticated"})] * 2
    assert rank.get_stats()["request_channel"]["dropped"] == {"unauthenticated": 2}


def test_a_metric_that_cannot_be_recorded_is_given_up_once(monkeypatch, caplog) -> None:
    import deployments.metrics as metrics_module

    made: list[int] = []

    def broken() -> Any:
        made.append(1)
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(metrics_module, "frames_dropped_counter", broken)
    drops = metrics_module.FrameDrops("request")
    for _ in range(3):
        drops("malformed")  # never raises into the channel
    assert made == [1]
    assert sum("cannot be exported" in r.getMessage() for r in caplog.records) == 1


def test_stream_interval_coalesces_tokens_after_the_first() -> None:
    """`stream_interval_ms` (read once per request): 0 sends every token as its own chunk; a long
    interval sends the first token at once and the rest with the final one."""
    from deployments.rank import DPRank

    rank = DPRank({"data_parallel_size": 1}, 0, platform_name="cpu")
    rank.engine = _Engine()
    params = type("P", (), {"max_tokens": 4})()

    async def chunks(interval_ms: float) -> list:
        return [c async for c in rank._chunks("r", [1], params, interval_ms)]

    try:
        every = asyncio.run(chunks(0.0))
        coalesced = asyncio.run(chunks(60_000.0))
    finally:
        rank.engine = None
        rank.shutdown()
    assert every == [{"text": f"t{i}", "token_ids": [i], "finish_reason": "length" if i == 3 else None}
                     for i in range(4)]  # fmt: skip
    assert coalesced == [
        {"text": "t0", "token_ids": [0], "finish_reason": None},
        {"text": "t1t2t3", "token_ids": [1, 2, 3], "finish_reason": "length"},
    ]
    assert rank.stats.in_flight == 0
