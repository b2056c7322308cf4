"""The ingress's view of its ranks without Ray or engines: stats riding on a rank's output batches
replace that rank's poll, idle ranks are still polled, and a dead engine or rank is noticed either way;
the output channel's frames are authenticated and numbered (forged, malformed and replayed frames are
dropped and counted, lost ones end the requests they may have carried); requests have deadlines; a busy
rank whose engine stops stepping is declared hung; a stuck re-formation makes the ingress unhealthy."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

import deployments.group_supervisor as supervisor_module
from deployments.config import DPServeConfig
from deployments.frame_sequence import SEQ
from deployments.group_supervisor import RankGroupSupervisor
from deployments.rank_outbox import RankOutbox
from deployments.request_channel import RequestReceiver
from scheduler.frame_auth import FrameAuth, new_key
from tests.helpers import until


class Frame:
    """A frame the stand-in rank sends as given: sequence number `seq`, `payload` (a (batch, stats)
    pair to encode, or raw bytes), sealed with the group's key or, with `key`, another one."""

    def __init__(self, seq: int, payload: Any, key: bytes | None = None) -> None:
        self.seq, self.payload, self.key = seq, payload, key

    def seal(self, auth: FrameAuth) -> bytes:
        body = self.payload if isinstance(self.payload, bytes) else msgspec.msgpack.encode(self.payload)
        return (FrameAuth(self.key) if self.key else auth).seal(SEQ.pack(self.seq) + body)


class _Metrics:
    def __init__(self) -> None:
        self.gauges: list[tuple[int, dict]] = []
        self.dropped: list[tuple[str, str]] = []

    def rank_gauges(self, rank: int, stats: dict[str, Any]) -> None:
        self.gauges.append((rank, stats))

    def internal_frame_dropped(self, channel: str, reason: str) -> None:
        self.dropped.append((channel, reason))


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def remote(self, *args: Any):
        self.calls += 1

        async def call():
            return self.fn(*args)

        return self.fn(*args) if asyncio.iscoroutinefunction(self.fn) else call()


class _Sent:
    """A fire-and-forget actor call (the caller never awaits its ref): takes effect at once."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> None:
        self.fn(*args)


class _Rank:
    """Stands in for a DPRank actor handle: get_stats.remote() and output_stream."""

    def __init__(
        self,
        rank: int,
        batches: list | None = None,
        fail_after_s: float | None = None,
        reachable: bool = True,
        request_socket: bool = False,
    ) -> None:
        self.rank = rank
        self.get_stats = _Method(lambda: {"rank": rank, "running": 1, "waiting": 0, "ready": True})
        self.batches = batches or []
        self.output_stream = self
        self.push_outputs = _Method(self._push)
        self.aborted: list[str] = []
        self.abort = _Sent(self.aborted.append)
        self.fail_after_s = fail_after_s
        self.reachable = reachable
        self.requests: list[tuple[Any, ...]] = []  # what arrived on its request socket
        self.receiver: RequestReceiver | None = None
        if request_socket:  # else like a rank whose request socket does not open: requests are Ray calls
            self.open_requests = _Method(self._open_requests)

    async def _open_requests(self, local: bool, key: bytes, max_frame_bytes: int) -> str:
        """DPRank.open_requests with a real request socket that records what arrives."""
        self.receiver = RequestReceiver(
            key,
            lambda *args: self.requests.append(("submit", *args)),
            lambda rid: self.requests.append(("abort", rid)),
            max_frame_bytes,
        )
        return self.receiver.bind("127.0.0.1")

    async def _push(self, address: str, key: bytes, max_frame_bytes: int) -> None:
        """DPRank.push_outputs' wire format over a real ZMQ socket (each batch numbered in order and
        sealed with `key`; raw bytes and `Frame`s are sent as they are); raises like a dead rank's
        call after `fail_after_s`."""
        assert max_frame_bytes >= 1 << 20  # serving.max_output_frame_bytes
        import msgspec
        import zmq
        import zmq.asyncio

        if not self.reachable:  # like a firewalled port: nothing ever arrives
            await asyncio.Event().wait()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(address)
        auth, seq = FrameAuth(key), 0
        try:
            for item in self.batches:
                if isinstance(item, Frame):
                    item = item.seal(auth)
                elif not isinstance(item, bytes):
                    item, seq = auth.seal(SEQ.pack(seq) + msgspec.msgpack.encode(item)), seq + 1
                await sock.send(item)
            if self.fail_after_s is not None:
                await asyncio.sleep(self.fail_after_s)
                raise ConnectionError("rank actor died")
            await asyncio.Event().wait()
        finally:
            ctx.destroy(linger=0)

    def options(self, **_: Any) -> _Rank:
        return self

    def remote(self):
        batches = self.batches

        async def stream():
            for item in batches:

                async def ref(item=item):
                    return item

                yield ref()
            await asyncio.Event().wait()  # a live rank's stream stays open

        return stream()


def _server(ranks: list[_Rank], transport: str = "ray") -> Any:
    """The ingress's rank group over stand-in ranks, adopted as generation 1 (no real group starts)."""
    config = DPServeConfig.from_args(
        {"engine": {"data_parallel_size": len(ranks)}, "serving": {"output_transport": transport}}
    )
    server = RankGroupSupervisor(config, _Metrics())
    server.adopt(ranks, None, [{} for _ in ranks])
    server.recoveries_started: list[str] = []
    server.start_recovery = server.recoveries_started.append
    return server


def test_stats_on_output_batches_reach_the_router_and_gauges_at_the_poll_rate() -> None:
    server = _server([_Rank(0), _Rank(1)])
    for step in range(5):
        server.take_stats(0, 1, {"running": step, "waiting": 0})
    assert server.stats[0] == {"running": 4, "waiting": 0}
    assert server.stats_at[0] > 0 and server.stats_at[1] == 0.0
    assert len(server.metrics.gauges) == 1  # five batches within one poll period: one gauge update
    server.take_stats(0, 0, {"running": 99})  # an old group's stream: ignored
    assert server.stats[0]["running"] == 4
    server.take_stats(1, 1, {"errored": True})
    assert server.recoveries_started == ["rank 1's engine died"]


CHUNK = {"text": "a", "token_ids": [5]}


def _first_chunk(rank: _Rank, transport: str, connect_timeout_s: float | None = None) -> tuple[Any, Any]:
    """The first chunk for request req-1 that rank 0's pump delivers, and the server."""

    async def main() -> tuple[Any, Any]:
        inbox: asyncio.Queue = asyncio.Queue()
        server = _server([rank], transport)
        if connect_timeout_s is not None:
            server.channel.serving.output_connect_timeout_s = connect_timeout_s
        server.channel.inboxes["req-1"] = (0, 1, inbox)
        pump = asyncio.create_task(server.channel.pump(0, rank, 1))
        try:
            return await asyncio.wait_for(inbox.get(), 5), server
        finally:
            pump.cancel()

    return asyncio.run(main())


@pytest.mark.parametrize("transport", ["ray", "zmq"])
def test_pump_takes_stats_and_delivers_chunks(transport: str) -> None:
    chunk, server = _first_chunk(
        _Rank(0, batches=[([("req-1", CHUNK)], {"running": 3, "waiting": 1})]), transport
    )
    assert chunk == CHUNK
    assert server.stats[0] == {"running": 3, "waiting": 1}


def test_a_rank_whose_push_call_fails_ends_its_requests_and_reforms_the_group() -> None:
    async def main() -> None:
        inbox: asyncio.Queue = asyncio.Queue()
        rank = _Rank(0, batches=[([("req-1", CHUNK)], {"running": 1})], fail_after_s=0.1)
        server = _server([rank], "zmq")
        server.channel.inboxes["req-1"] = (0, 1, inbox)
        await asyncio.wait_for(server.channel.pump(0, rank, 1), 5)
        assert await inbox.get() == CHUNK
        assert isinstance(await inbox.get(), ConnectionError)
        assert server.recoveries_started == ["rank 0's output channel broke (ConnectionError)"]

    asyncio.run(main())


def test_an_unreachable_zmq_channel_falls_back_to_the_ray_stream() -> None:
    rank = _Rank(0, batches=[([("req-1", CHUNK)], {"running": 1})], reachable=False)
    chunk, server = _first_chunk(rank, "zmq", connect_timeout_s=0.2)
    assert chunk == CHUNK
    assert server.recoveries_started == []


def test_malformed_messages_on_the_zmq_channel_are_dropped() -> None:
    good = ([("req-1", CHUNK)], {"running": 1})
    rank = _Rank(0, batches=[b"not msgpack \xc1", msgspec.msgpack.encode([1, 2, 3]), good])
    chunk, server = _first_chunk(rank, "zmq")
    assert chunk == CHUNK
    assert server.recoveries_started == []


def test_output_transport_is_checked() -> None:
    with pytest.raises(ValueError, match="output_transport"):
        DPServeConfig.from_args({"serving": {"output_transport": "carrier-pigeon"}})


class _Clock:
    """The ingress's clock, moved by the test: what is due for a poll depends on this clock only,
    however slowly the machine runs the poller's loop."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_only_ranks_without_recent_output_are_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(supervisor_module, "time", clock)

    async def main() -> None:
        ranks = [_Rank(0), _Rank(1)]
        server = _server(ranks)
        server.dispatched[1] = 1  # rank 1 has a request in flight but sends no output
        poller = asyncio.create_task(server.poll_stats())
        for _ in range(3):
            server.take_stats(0, 1, {"running": 8, "waiting": 0})  # rank 0's output carries stats
            polled = ranks[1].get_stats.calls
            clock.now += supervisor_module.STATS_POLL_S * 1.5  # rank 1 is due, rank 0 reported just now
            server.take_stats(0, 1, {"running": 8, "waiting": 0})
            # Polled, and its answer taken at this clock time (before the clock moves on).
            await until(
                lambda polled=polled: ranks[1].get_stats.calls > polled and server.stats_at[1] == clock.now
            )
        poller.cancel()
        assert ranks[0].get_stats.calls == 0
        assert ranks[1].get_stats.calls >= 3
        assert server.stats[1]["running"] == 1

    asyncio.run(main())


def test_ranks_with_nothing_in_flight_are_polled_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(supervisor_module, "time", clock)
    busy_s, idle_s = supervisor_module.STATS_POLL_S, supervisor_module.IDLE_STATS_POLL_S

    async def main() -> None:
        ranks = [_Rank(0), _Rank(1)]
        server = _server(ranks)
        server.dispatched[0] = 2
        poller = asyncio.create_task(server.poll_stats())
        periods = int(2.5 * idle_s / busy_s)  # 2.5 idle poll periods
        for i in range(1, periods + 1):
            await until(lambda i=i: ranks[0].get_stats.calls >= i and server.stats_at[0] == clock.now)
            clock.now += busy_s * 1.05  # a little over STATS_POLL_S: exactly one busy poll falls due
        poller.cancel()
        busy, idle = ranks[0].get_stats.calls, ranks[1].get_stats.calls
        assert busy == periods and idle == 3, (busy, idle)  # at the start, after 1 and 2 idle periods

    asyncio.run(main())


def test_a_rank_that_stops_answering_is_given_up_after_missed_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "STATS_POLL_S", 0.01)

    async def main() -> None:
        ranks = [_Rank(0)]

        def hung():
            raise TimeoutError("no answer")

        ranks[0].get_stats = _Method(hung)
        server = _server(ranks)
        poller = asyncio.create_task(server.poll_stats())
        await until(lambda: server.recoveries_started)
        poller.cancel()
        assert server.recoveries_started == [
            f"rank 0 stopped answering for {supervisor_module.DEAD_AFTER_MISSED_POLLS} polls"
        ]

    asyncio.run(main())


def _pump_until(
    server: Any, rank: _Rank, inboxes: dict[str, asyncio.Queue], cond, timeout_s: float = 10
) -> None:
    """Run rank 0's ZMQ pump with `inboxes` open until `cond()` holds."""

    async def main() -> None:
        server.channel.actors, server.channel.generation = [rank], 1  # what `start` sets
        for request_id, inbox in inboxes.items():
            server.channel.inboxes[request_id] = (0, 1, inbox)
        pump = asyncio.create_task(server.channel.pump(0, rank, 1))
        try:
            await until(cond, timeout_s)
        finally:
            pump.cancel()

    asyncio.run(main())


def test_forged_malformed_and_replayed_frames_are_dropped_and_counted() -> None:
    good = ([("req-1", CHUNK)], {"running": 1})
    frames = [
        Frame(0, good),
        b"garbage",  # no tag at all
        Frame(1, ([("req-1", {"text": "forged"})], {"running": 99}), key=new_key()),  # wrong key
        Frame(1, b"not msgpack \xc1"),  # authentic but undecodable
        Frame(1, msgspec.msgpack.encode({"not": "a pair"})),
        Frame(0, good),  # a replay of frame 0
        Frame(1, ([("req-1", dict(CHUNK, finish_reason="stop"))], {"running": 0})),
    ]
    rank = _Rank(0, batches=frames)
    server = _server([rank], "zmq")
    inbox: asyncio.Queue = asyncio.Queue()
    _pump_until(server, rank, {"req-1": inbox}, lambda: inbox.qsize() == 2)
    assert [inbox.get_nowait() for _ in range(2)] == [CHUNK, dict(CHUNK, finish_reason="stop")]
    assert server.channel.dropped[0] == {"unauthenticated": 2, "malformed": 2, "replayed": 1}
    assert (
        server.metrics.dropped.count(("output", "unauthenticated")) == 2 and len(server.metrics.dropped) == 5
    )
    assert server.stats[0] == {"running": 0} and server.channel.lost.get(0, 0) == 0
    assert server.recoveries_started == [] and not rank.aborted
    status = server.channel.stats()["ranks"][0]
    # Where it bound: loopback without Ray; with Ray up (the full suite) the stand-in rank has no node id.
    assert status["address"].startswith(f"tcp://{server.channel.output_host(0)}:")
    assert status["dropped"]["replayed"] == 1


def test_a_lost_frame_ends_the_ranks_requests_with_a_clear_error_and_aborts_them() -> None:
    frames = [Frame(0, ([("req-1", CHUNK)], {})), Frame(3, ([("req-2", CHUNK)], {}))]  # 1 and 2 lost
    rank = _Rank(0, batches=frames)
    server = _server([rank], "zmq")
    inboxes = {"req-1": asyncio.Queue(), "req-2": asyncio.Queue()}
    _pump_until(server, rank, inboxes, lambda: inboxes["req-2"].qsize() == 2 and len(rank.aborted) == 2)
    assert inboxes["req-1"].get_nowait() == CHUNK
    for request_id in ("req-1", "req-2"):
        err = inboxes[request_id].get_nowait()
        assert err["status"] == 503 and "2 output frame(s) from DP rank 0 were lost" in err["error"]
    assert inboxes["req-2"].get_nowait() == CHUNK  # the frame after the gap is still delivered
    assert sorted(rank.aborted) == ["req-1", "req-2"] and server.channel.lost[0] == 2
    assert server.recoveries_started == []  # the rank and the group serve on


def test_a_request_past_its_deadline_gets_a_504_and_is_aborted_on_its_rank() -> None:
    async def main() -> None:
        rank = _Rank(0)
        server = _server([rank])
        server.channel.serving.request_timeout_s = 0.2
        server.channel.start([rank], 1, [{}])
        slow = server.channel.open("slow", 0, 1)
        done = server.channel.open("done", 0, 1)
        server.channel.close("done")  # finished in time: its deadline is cancelled
        err = await asyncio.wait_for(slow.get(), 10)
        assert err["status"] == 504 and "request_timeout_s (0.2 s)" in err["error"]
        await until(lambda: rank.aborted)  # the abort is a call to the rank after the error
        await asyncio.sleep(0.3)  # past the closed request's deadline too
        assert done.empty() and rank.aborted == ["slow"] and server.channel.timed_out == 1
        server.channel.stop()

    asyncio.run(main())


def test_a_busy_rank_whose_engine_stops_stepping_is_declared_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(supervisor_module, "time", clock)
    server = _server([_Rank(0), _Rank(1)])
    hang_s = server.config.serving.hang_timeout_s
    assert hang_s <= 60

    def stats(rank: int, step: int, in_flight: int) -> None:
        server.take_stats(rank, 1, {"step": step, "in_flight": in_flight, "running": in_flight})

    for t in range(0, int(3 * hang_s), 5):  # idle with a still counter, then stepping with work: fine
        clock.now += 5
        stats(0, 7, 0)
        stats(1, t, 3)
    for _ in range(int(3 * hang_s) // 5):  # stats without a step counter: nothing to judge a hang by
        clock.now += 5
        server.take_stats(0, 1, {"in_flight": 2})
    assert server.recoveries_started == []
    stats(1, 9999, 3)
    clock.now += hang_s - 1
    stats(1, 9999, 3)  # stalled, not yet for hang_timeout_s
    assert server.recoveries_started == []
    clock.now += 2
    stats(1, 9999, 3)
    assert len(server.recoveries_started) == 1 and server.hangs == 1
    assert server.recoveries_started[0].startswith("rank 1 is hung: no engine step for")


def test_a_stuck_recovery_makes_the_ingress_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(supervisor_module, "time", clock)
    server = _server([_Rank(0)])
    assert server.health_problem() is None
    server.recovering_since = clock.now
    server.recovery_error = "attempt 3: TimeoutError: no bundles"
    clock.now += server.config.serving.recovery_bound_s - 1
    assert server.health_problem() is None  # re-forming, within its bound
    clock.now += 2
    assert "re-forming for more than 1800 s" in server.health_problem()
    assert "no bundles" in server.health_problem()


def test_requests_and_aborts_go_over_the_ranks_request_socket_once_its_output_channel_works() -> None:
    rank = _Rank(0, batches=[([], {"running": 0})], request_socket=True)
    server = _server([rank], "zmq")
    channel = server.channel
    assert not channel.submit(0, "early", "p", {}, None, 0.0)  # no request socket yet: the caller uses Ray
    seen: dict[str, Any] = {}

    def done() -> bool:
        if "submitted" not in seen:  # the socket refuses frames until its connection is up
            if 0 not in channel.senders or not channel.submit(
                0, "req-1", "a prompt", {"max_tokens": 4}, None, 0.0
            ):
                return False
            seen["submitted"] = channel.stats()["ranks"][0]["requests"]
            channel.abort(0, 1, "req-1")
            channel.abort(0, 2, "req-1")  # another generation's rank: nothing is sent
        return len(rank.requests) == 2

    _pump_until(server, rank, {}, done)
    assert rank.requests == [
        ("submit", "req-1", "a prompt", {"max_tokens": 4}, None, 0.0),
        ("abort", "req-1"),
    ]
    assert rank.aborted == []  # the abort took the socket, not a Ray call
    assert seen["submitted"] == rank.receiver.address
    assert channel.senders == {}  # closed with the pump
    rank.receiver.close()


def test_lost_request_frames_end_the_ranks_unacknowledged_requests() -> None:
    async def main() -> None:
        rank = _Rank(0)
        server = _server([rank], "zmq")
        channel = server.channel
        channel.start([rank], 1, [{}])
        channel.stop()  # no pumps: this test delivers batches itself

        class _Sender:
            address = "tcp://127.0.0.1:1"

            def submit(self, *_: Any) -> bool:
                return True

            def abort(self, _: str) -> bool:
                return False  # so the abort shows up as the stand-in's Ray call

            def close(self) -> None:
                pass

        channel.senders[0] = _Sender()
        acked, waiting = channel.open("acked", 0, 1), channel.open("waiting", 0, 1)
        assert channel.submit(0, "acked", "p", {}, None, 0.0) and channel.submit(
            0, "waiting", "p", {}, None, 0.0
        )
        channel.deliver(0, 1, [("acked", {"prompt_tokens": 1, "rank": 0})], {"running": 1})
        channel.deliver(0, 1, [], {"request_channel": {"address": "x", "dropped": {}, "lost": 1}})
        err = waiting.get_nowait()
        assert err["status"] == 503 and "may not have reached DP rank 0" in err["error"]
        assert (
            acked.get_nowait() == {"prompt_tokens": 1, "rank": 0} and acked.empty()
        )  # acknowledged: untouched
        assert rank.aborted == ["waiting"] and channel.request_frames_lost[0] == 1
        channel.deliver(0, 1, [], {"request_channel": {"address": "x", "dropped": {}, "lost": 1}})
        assert rank.aborted == ["waiting"]  # the same count again: nothing more

    asyncio.run(main())


def test_batches_over_the_frame_bound_arrive_whole_and_a_strangers_oversized_message_is_cut() -> None:
    """The real `RankOutbox.push` into the ingress's socket with a 4 KiB bound: a 20 kB chunk arrives
    in pieces, whole and in order, with nothing dropped or lost; a stranger's message over the bound
    is cut by the socket (never counted), its small one before it is dropped and counted."""
    import zmq

    bound = 4096
    rank = _Rank(0)
    rank.outbox = RankOutbox(0, lambda: {"running": 1})
    rank.push_outputs = _Method(rank.outbox.push)
    server = _server([rank], "zmq")
    channel = server.channel
    channel.serving = channel.serving.model_copy(
        update={"max_output_frame_bytes": bound}
    )  # below the config's floor
    text, ids = "é" * 10_000, list(range(3000))

    async def main() -> list[dict[str, Any]]:
        channel.actors, channel.generation = [rank], 1
        inbox = channel.open("req-1", 0, 1)
        pump = asyncio.create_task(channel.pump(0, rank, 1))
        ctx = zmq.Context()
        try:
            await until(lambda: 0 in channel.addresses, 10)
            stranger = ctx.socket(zmq.PUSH)
            stranger.connect(channel.addresses[0])
            stranger.send(b"small junk")
            stranger.send(b"\0" * (2 * bound))
            await until(lambda: channel.dropped.get(0), 10)
            await asyncio.sleep(0.2)  # the oversized message has reached the socket too
            rank.outbox.queue.put_nowait(("req-1", {"text": text, "token_ids": ids, "finish_reason": "stop"}))
            chunks = [await asyncio.wait_for(inbox.get(), 10)]
            while chunks[-1].get("finish_reason") is None:
                chunks.append(await asyncio.wait_for(inbox.get(), 10))
            return chunks
        finally:
            ctx.destroy(linger=0)
            pump.cancel()

    chunks = asyncio.run(main())
    assert len(chunks) > 1 and rank.outbox.seq == 1 + len(chunks)  # the empty first frame, then one per piece
    assert "".join(c["text"] for c in chunks) == text and [i for c in chunks for i in c["token_ids"]] == ids
    assert channel.dropped[0] == {"unauthenticated": 1} and channel.lost.get(0, 0) == 0
    assert server.recoveries_started == []
