"""The ZMQ gate transport: wire format, pipelined decisions, coordinator death and restart.

The socket tests run a real ``GateServer`` around a real ``CoordinatorState`` (no Ray); the restart
test kills the real BalanceCoordinator actor (``max_restarts=-1``) while two clients report in
lockstep, and checks they admit meanwhile and take decisions from the restarted actor afterwards.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest

from scheduler.coordinator import CoordinatorState
from scheduler.frame_auth import new_key
from scheduler.gate_report import BalanceConfig, GateReport
from scheduler.gate_transport import (
    GateServer,
    ZmqGateClient,
    decode_decisions,
    encode_decisions,
)

KEY = new_key()


def _server(state: CoordinatorState) -> GateServer:
    lock = threading.Lock()

    def handle(r: GateReport) -> list[bool]:
        with lock:
            ds, _ = state.report(r)
        return [d.admit for d in ds]

    return GateServer(handle, "127.0.0.1", KEY)


def test_wire_roundtrip() -> None:
    report = GateReport(1, 3, 77, 4, 9, 8, 2, 4, 12.5, 100, 3)
    assert GateReport.from_bytes(report.to_bytes()) == report
    wave, first, admits = decode_decisions(encode_decisions(3, 79, [True, False, True]))
    assert (wave, first, list(admits)) == (3, 79, [1, 0, 1])
    with pytest.raises(ValueError):
        GateReport.from_bytes(b"X" + GateReport(0, 0, 0, 0, 0, 1).to_bytes()[1:])
    # The engine-core thread's direct encoding is the same wire form.
    assert GateReport.encode(1, 3, 77, 4, 9, 8, 2, 4, 12.5, 100, 3) == report.to_bytes()


@pytest.mark.parametrize("gil_held", [True, False], ids=["gil-held-calls", "pyzmq-calls"])
def test_zmq_clients_get_the_frozen_decisions(gil_held: bool) -> None:
    state = CoordinatorState("any_at_cap", timeout_s=5)
    srv = _server(state)
    cfg = BalanceConfig(lead=1)
    clients = [ZmqGateClient(cfg, r, resolve=lambda: srv.endpoint) for r in (0, 1)]
    try:
        for c in clients:
            if sys.platform == "linux":  # pyzmq's libzmq is found in /proc/self/maps
                assert c._raw is not None
            if not gil_held:
                c._raw = None  # the portable path
        assert all(c.connect() for c in clients)
        got: dict[int, list[bool | None]] = {0: [], 1: []}
        for step in range(1, 41):
            for c in clients:
                running = 4 if c.rank == 0 and (step // 5) % 2 else 1  # rank 0 at its cap at times
                c.report((0, step), running=running, waiting=2, max_num_seqs=4, lead=1)
            for c in clients:
                got[c.rank].append(c.decision((0, step + 1), 2.0))
        assert got[0] == got[1]
        assert got[0] == [state.decisions[(0, s + 1)].admit for s in range(1, 41)]
        assert True in got[0] and False in got[0]
        # Nothing was asked for a step: None at once (no wait), not counted late.
        t0 = time.perf_counter()
        assert clients[0].decision((0, 500), 60.0) is None
        assert time.perf_counter() - t0 < 30.0 and clients[0].late == 0  # far below the 60 s wait
        assert clients[0].calls == 40 and srv.served == 80
        # The client's own CPU time is part of its wall time (the rest is waiting).
        stats = clients[0].stats()
        assert 0 < stats["client_cpu_ms_total"] <= clients[0].client_s * 1e3 + 1.0
    finally:
        for c in clients:
            c.close()
        srv.close()


def test_zmq_client_horizon() -> None:
    state = CoordinatorState("cadence", params={"interval": 2}, timeout_s=5)
    srv = _server(state)
    c = ZmqGateClient(BalanceConfig(lead=1, horizon=4), 0, resolve=lambda: srv.endpoint)
    try:
        c.connect()
        c.report((0, 4), running=0, waiting=1, max_num_seqs=4, lead=1)
        assert [c.decision((0, s), 2.0) for s in (5, 6, 7, 8)] == [False, True, False, True]
        assert c.decision((0, 9), 0.0) is None
    finally:
        c.close()
        srv.close()


def test_zmq_client_outage_falls_back_without_waiting_then_reconnects() -> None:
    """The server goes away: the client declares it down after ``dead_after_s`` and stops waiting
    ``wait_s`` per step; a new server (new address, empty state) is found by the background lookup."""
    srv = _server(CoordinatorState("any_at_cap"))
    where = {"endpoint": srv.endpoint}
    c = ZmqGateClient(BalanceConfig(dead_after_s=0.3), 0, resolve=lambda: where["endpoint"], retry_s=0.05)
    step = 0

    def one_step(wait_s: float = 0.05) -> bool | None:
        nonlocal step
        step += 1
        c.report((0, step), running=4, waiting=1, max_num_seqs=4, lead=1)  # at cap: gate closed
        return c.decision((0, step + 1), wait_s)

    try:
        c.connect()
        assert [one_step() for _ in range(5)] == [False] * 5
        srv.close()
        t_dead = time.monotonic()
        while not c.down:
            assert one_step() is None  # fallback: the scheduler admits
            assert time.monotonic() - t_dead < 30.0, "outage not noticed"
        assert c.outages == 1 and time.monotonic() - t_dead >= 0.3  # not before dead_after_s
        # Down: decisions come back at once instead of after wait_s.
        t0 = time.perf_counter()
        assert one_step(wait_s=60.0) is None
        assert time.perf_counter() - t0 < 30.0  # far below the 60 s wait
        # A successor on a new address, with its own (empty) state.
        state2 = CoordinatorState("any_at_cap")
        srv = _server(state2)
        where["endpoint"] = srv.endpoint
        t_new = time.monotonic()
        decisions = []
        while not decisions or decisions[-1] is None:
            decisions.append(one_step())
            time.sleep(0.005)
            assert time.monotonic() - t_new < 30.0, "did not reconnect"
        assert decisions[-1] is False and not c.down
        assert c.reconnects == 1 and c.address == srv.address and c.last_outage_s is not None
        assert 0 in state2.ranks
    finally:
        c.close()
        srv.close()


def test_zmq_client_unreachable_at_start_keeps_looking() -> None:
    """No coordinator at start-up: the gate is open, and the client connects once it exists."""
    where: dict[str, tuple[str, bytes] | None] = {"endpoint": None}

    def resolve() -> tuple[str, bytes]:
        if where["endpoint"] is None:
            raise LookupError("no coordinator yet")
        return where["endpoint"]

    c = ZmqGateClient(BalanceConfig(), 0, resolve=resolve, retry_s=0.05)
    srv = None
    try:
        assert c.connect() is False and c.down
        c.report((0, 1), running=0, waiting=1, max_num_seqs=4, lead=1)
        assert c.decision((0, 2), 0.05) is None
        srv = _server(CoordinatorState("any_at_cap"))
        where["endpoint"] = srv.endpoint
        deadline = time.monotonic() + 3
        got = None
        step = 1
        while got is None and time.monotonic() < deadline:
            step += 1
            c.report((0, step), running=0, waiting=1, max_num_seqs=4, lead=1)
            got = c.decision((0, step + 1), 0.05)
            time.sleep(0.01)
        assert got is True and not c.down
    finally:
        c.close()
        if srv is not None:
            srv.close()


def test_zmq_client_lookup_retries_while_the_rank_is_idle() -> None:
    """The lookup that follows an outage keeps retrying in its own thread, without further reports
    (an idle rank does not step, and a restarting actor refuses the first lookups): the address is
    ready, and taken at the next report."""
    calls = {"n": 0}
    srv = _server(CoordinatorState("any_at_cap"))

    def resolve() -> tuple[str, bytes]:
        calls["n"] += 1
        if calls["n"] <= 4:  # start-up, then three refusals while "restarting"
            if calls["n"] == 1:
                raise LookupError("not yet")
            raise RuntimeError("the actor is restarting")
        return srv.endpoint

    c = ZmqGateClient(BalanceConfig(), 0, resolve=resolve, retry_s=0.05)
    try:
        assert c.connect() is False and c.down
        c.report((0, 1), running=0, waiting=1, max_num_seqs=4, lead=1)  # one step, then idle
        deadline = time.monotonic() + 3
        while calls["n"] < 5:
            assert time.monotonic() < deadline, f"lookup stopped retrying after {calls['n']} calls"
            time.sleep(0.01)
        c.report((0, 2), running=0, waiting=1, max_num_seqs=4, lead=1)
        assert c.address == srv.address and c.reconnects == 1
    finally:
        c.close()
        srv.close()


# ---- real Ray actors ---------------------------------------------------------------------------------


def test_coordinator_killed_ranks_admit_then_resume_from_restarted_actor(ray_local) -> None:
    """Two ranks (threads in lockstep, like two engine cores) report every ~5 ms; rank 0 is at its cap,
    so the coordinator's decisions close the gate. The actor is killed (Ray restarts it): decisions
    fall back to admit (None), then come from the restarted actor, on a new address, again."""
    from scheduler.coordinator import get_or_create_coordinator, release_coordinator

    name = f"test_restart_{time.monotonic_ns()}"
    actor = get_or_create_coordinator(name, "dpserve_test", "any_at_cap", None, timeout_s=2.0)
    old_address = ray_local.get(actor.zmq_address.remote())
    cfg = BalanceConfig(coordinator_name=name, namespace="dpserve_test", dead_after_s=0.5)
    clients = [ZmqGateClient(cfg, r) for r in (0, 1)]
    assert all(c.connect() for c in clients)
    barrier = threading.Barrier(2)
    stop = threading.Event()
    # Per rank: (monotonic time, step, decision) for every step.
    log: dict[int, list[tuple[float, int, bool | None]]] = {0: [], 1: []}

    def rank_loop(c: ZmqGateClient) -> None:
        step = 0
        while not stop.is_set():
            step += 1
            barrier.wait(5)  # lockstep: both ranks reach step s together
            c.report((0, step), running=4 if c.rank == 0 else 0, waiting=1, max_num_seqs=4, lead=1)
            time.sleep(0.005)  # the "model step"
            log[c.rank].append((time.monotonic(), step + 1, c.decision((0, step + 1), 0.02)))

    threads = [threading.Thread(target=rank_loop, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        t_kill = time.monotonic()
        ray_local.kill(actor, no_restart=False)
        deadline = t_kill + 60
        # Wait for both ranks to have taken a gate-closing decision from the restarted actor.
        while time.monotonic() < deadline and not all(
            c.reconnects and any(t > t_kill and d is False and not c.down for t, _, d in log[c.rank][-20:])
            for c in clients
        ):
            time.sleep(0.1)
        stop.set()
        barrier.abort()
        for t in threads:
            t.join(5)
        new_address = ray_local.get(actor.zmq_address.remote())
        stats = ray_local.get(actor.get_stats.remote())
    finally:
        stop.set()
        for c in clients:
            c.close()
        release_coordinator(name, "dpserve_test")
        ray_local.kill(actor)

    figures = {}
    for r, c in enumerate(clients):
        before = [d for t, s, d in log[r] if t < t_kill and s > 2]
        after = [(t, d) for t, s, d in log[r] if t >= t_kill]
        assert before and all(d is False for d in before), f"rank {r}: gate not closed before the kill"
        first_fallback = next(t for t, d in after if d is None)
        resumed = next(t for t, d in after if t > first_fallback and d is not None)
        assert c.outages >= 1 and c.reconnects >= 1 and c.address == new_address
        figures[r] = {
            "first_fallback_ms": round((first_fallback - t_kill) * 1e3, 1),
            "resume_ms": round((resumed - t_kill) * 1e3, 1),
            "outage_s": c.last_outage_s,
            "fallback_steps": sum(1 for _, d in after if d is None),
        }
    assert new_address != old_address
    # The restarted actor's state holds both ranks again; the ranks agree on every step both decided.
    assert sorted(stats["ranks"]) == [0, 1], stats
    by_step = [{s: d for _, s, d in log[r] if d is not None} for r in (0, 1)]
    common = set(by_step[0]) & set(by_step[1])
    assert len(common) > 50 and all(by_step[0][s] == by_step[1][s] for s in common)
    print("coordinator restart figures:", figures)


def test_server_drops_forged_malformed_and_out_of_range_frames_and_keeps_serving() -> None:
    """Whatever reaches the ROUTER socket, only authentic in-range reports touch the state; the rest
    is dropped and counted by reason, and the serving thread lives on for the real ranks."""
    import zmq

    from scheduler.frame_auth import FrameAuth

    state = CoordinatorState("any_at_cap", timeout_s=5)
    srv = _server(state)
    ctx = zmq.Context()
    attacker = ctx.socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(srv.address)
    forged = FrameAuth(new_key())  # the right format, the wrong key
    good = FrameAuth(KEY)
    at_cap = GateReport(5, 0, 1, running=4, waiting=9, max_num_seqs=4)  # would close the gate for all
    frames = [
        [b"garbage"],
        [b""],
        [b"two", b"parts"],  # the ROUTER sees three frames
        [forged.seal(at_cap.to_bytes())],
        [at_cap.to_bytes()],  # unsealed
        [good.seal(b"R" + b"\x00" * 10)],  # sealed, but no report
        # A horizon that would make the coordinator build 2**31 decisions.
        [good.seal(GateReport(1, 0, 1, 0, 0, 4, horizon=2**31 - 1).to_bytes())],
        [good.seal(GateReport(1, 0, 1, -5, 0, 4).to_bytes())],
        [good.seal(GateReport(1, 0, 1, 0, 0, 0).to_bytes())],
        [good.seal(GateReport(1, 0, 1, 0, 0, 4, lead=0).to_bytes())],
        [good.seal(GateReport(1, 0, 1, 0, 0, 4, client_ms=float("nan")).to_bytes())],
        [good.seal(GateReport(-1, 0, 1, 0, 0, 4).to_bytes())],
    ]
    c = ZmqGateClient(BalanceConfig(lead=1), 0, resolve=lambda: srv.endpoint)
    try:
        for parts in frames:
            attacker.send_multipart(parts)
        deadline = time.monotonic() + 10
        while sum(srv.dropped.values()) < len(frames):
            assert time.monotonic() < deadline, srv.dropped
            time.sleep(0.01)
        assert srv.dropped == {"unauthenticated": 4, "malformed": 1, "invalid": 7}
        assert srv.alive and state.ranks == {} and srv.served == 0
        # A real rank is still served, and the forged at-cap report closed nothing.
        assert c.connect()
        c.report((0, 1), running=0, waiting=1, max_num_seqs=4, lead=1)
        assert c.decision((0, 2), 5.0) is True
        assert srv.served == 1 and set(state.ranks) == {0}
    finally:
        c.close()
        ctx.destroy(linger=0)
        srv.close()


def test_client_drops_replies_not_sealed_with_the_key() -> None:
    """A ROUTER impersonating the coordinator: its forged and malformed replies are dropped, and only
    the authentic one is taken."""
    import zmq

    from scheduler.frame_auth import FrameAuth
    from scheduler.gate_transport import encode_decisions

    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    c = ZmqGateClient(BalanceConfig(lead=1), 0, resolve=lambda: (f"tcp://127.0.0.1:{port}", KEY))
    try:
        assert c.connect()
        c.report((0, 1), running=0, waiting=1, max_num_seqs=4, lead=1)
        assert fake.poll(5000)
        ident, frame = fake.recv_multipart()
        assert GateReport.from_bytes(FrameAuth(KEY).open(frame)).rank == 0
        for reply in (FrameAuth(new_key()).seal(encode_decisions(0, 2, [False])), encode_decisions(0, 2, [False]),
                      FrameAuth(KEY).seal(b"D"), FrameAuth(KEY).seal(encode_decisions(0, 2, [True]))):  # fmt: skip
            fake.send_multipart([ident, reply])
        assert c.decision((0, 2), 5.0) is True
        assert c.dropped_replies == 3
    finally:
        c.close()
        ctx.destroy(linger=0)


def test_report_ranges() -> None:
    ok = GateReport(3, 1, 2, 0, 0, 1, lead=1024, horizon=1024, client_ms=0.0)
    assert GateReport.from_bytes(ok.to_bytes()) == ok
    for bad in (dict(horizon=1025), dict(lead=0), dict(running=-1), dict(waiting=1 << 25), dict(wave=-1),
                dict(step=-1), dict(max_num_seqs=0), dict(client_ms=-1.0), dict(client_ms=float("inf"))):  # fmt: skip
        fields = dict(rank=0, wave=0, step=0, running=0, waiting=0, max_num_seqs=1) | bad
        with pytest.raises(ValueError):
            GateReport.from_bytes(GateReport(**fields).to_bytes())
    with pytest.raises(ValueError, match="horizon"):
        BalanceConfig.from_additional_config({"dpserve_balance": {"horizon": 4096}})


def test_server_rebinds_and_clients_follow_the_new_endpoint() -> None:
    state = CoordinatorState("any_at_cap")
    srv = _server(state)
    old = srv.address
    srv.rebind("127.0.0.1")  # the same host: nothing changes
    assert srv.address == old
    srv.rebind("0.0.0.0")
    assert srv.address != old and srv.address.startswith("tcp://0.0.0.0:")
    port = srv.address.rsplit(":", 1)[1]
    c = ZmqGateClient(BalanceConfig(lead=1), 0, resolve=lambda: (f"tcp://127.0.0.1:{port}", KEY))
    try:
        assert c.connect()
        c.report((0, 1), running=0, waiting=1, max_num_seqs=4, lead=1)
        assert c.decision((0, 2), 5.0) is True and srv.alive and srv.served == 1
    finally:
        c.close()
        srv.close()
