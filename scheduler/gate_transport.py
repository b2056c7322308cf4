"""The cheap gate transport: one ZMQ message per report, one per reply (no Ray call on the step path).

The BalanceCoordinator actor stays the one owner of the gate state; besides its Ray methods it serves
a ZMQ ROUTER socket from a thread (:class:`GateServer`). Each engine core talks to it through a DEALER
socket (:class:`ZmqGateClient`, a ``GateClient``):

* ``report`` sends the rank's counts for ``(wave, step)`` (one non-blocking ``send`` of a 65-byte
  struct) and drains whatever replies have arrived;
* the reply carries the decisions for steps ``step + lead .. step + lead + horizon - 1`` (frozen by the
  coordinator exactly as for the Ray transport); ``decision`` reads them without blocking, or polls the
  socket up to ``wait_s`` when one is expected but not there yet.

Coordinator death (the actor has ``max_restarts=-1``; a restarted actor has empty state and a new
address): when no reply has come for ``dead_after_s`` after a report, the client declares the
coordinator down. While down, ``decision`` returns ``None`` at once (the scheduler then admits: plain
vLLM, the documented fallback) instead of polling ``wait_s`` every step, and a background thread looks
the actor up again through Ray (``ray.get_actor`` + ``zmq_address``) — never a Ray call on the step
thread. When it has an address the step thread reconnects at its next report; the first reply ends
the outage. Reports keep being sent while down, so a coordinator that was only slow is picked up
again without a new address.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from scheduler.frame_auth import FrameAuth
from scheduler.gate_report import BalanceConfig, GateReport, StepKey

logger = logging.getLogger("dpserve.balance")

# Wire format (little endian). Request: ``GateReport.to_bytes``. Reply: kind 'D', wave, first step,
# then one byte per step (1 = admit). Fixed structs: no msgpack/pickle cost on the engine-core thread.
_REP_HEAD = struct.Struct("<cqq")
_KEEP = 256  # decisions / requested keys kept per client (a wave can end early: never-used keys)
_RECV_BUF = 4096  # a reply is a 32-byte tag + 17 bytes + one per step of the horizon (<= 1024)
# Where a client finds the coordinator: (ZMQ address, the group's frame key).
GateEndpoint = tuple[str, bytes]


class _GilHeldZmq:
    """libzmq's ``zmq_send`` / ``zmq_recv`` called through ``ctypes.PyDLL``: *without releasing the GIL*.

    Why: pyzmq releases the GIL around every send, recv and poll. In the engine-core process vLLM's
    output thread is busy serializing the step's outputs exactly when the lockstep hook reports; each
    release hands it the GIL and the step thread then waits for it, up to the 5 ms switch interval —
    measured, that (not the transport) was most of the per-step cost. With ``ZMQ_DONTWAIT`` these calls
    never block, so holding the GIL is safe. It must be the libzmq that pyzmq itself loaded (socket
    handles are shared), found in ``/proc/self/maps``; ``load()`` is None where it is not (pyzmq's own
    calls are used then).
    """

    def __init__(self, path: str) -> None:
        lib = ctypes.PyDLL(path)
        self.send = lib.zmq_send
        self.send.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
        self.send.restype = ctypes.c_int
        self.recv = lib.zmq_recv
        self.recv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.recv.restype = ctypes.c_int

    @staticmethod
    def load() -> _GilHeldZmq | None:
        try:
            with open("/proc/self/maps") as maps:
                paths = [line.split()[-1] for line in maps if "libzmq" in line and "/" in line]
            return _GilHeldZmq(paths[0]) if paths else None
        except Exception:  # not Linux, or no separate libzmq: fall back to pyzmq
            return None


def encode_decisions(wave: int, first_step: int, admits: list[bool]) -> bytes:
    return _REP_HEAD.pack(b"D", wave, first_step) + bytes(1 if a else 0 for a in admits)


def decode_decisions(payload: bytes) -> tuple[int, int, bytes]:
    kind, wave, first = _REP_HEAD.unpack_from(payload)
    if kind != b"D":
        raise ValueError(f"unknown gate message kind {kind!r}")
    return wave, first, payload[_REP_HEAD.size :]


class GateServer:
    """The coordinator side: a ROUTER socket served by a daemon thread.

    ``handle(report) -> list[bool]`` is called for each report (the caller holds its own lock
    around its state); replies go back to the reporting rank only. Every frame in either direction
    is sealed with the group's key (scheduler/frame_auth.py): anything that is not an authentic,
    well-formed, in-range report is dropped and counted in ``dropped`` (by reason), and no frame can
    end the serving thread.
    """

    def __init__(self, handle: Callable[[GateReport], list[bool]], host: str, key: bytes,
                 on_drop: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self._handle = handle
        self._auth = FrameAuth(key)
        self._on_drop = on_drop
        self._ctx = zmq.Context(io_threads=1)
        self.served = 0
        self.dropped: dict[str, int] = {}
        self._open(host)

    def _open(self, host: str) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, _RECV_BUF)  # a larger frame is no report: never buffered
        port = sock.bind_to_random_port(f"tcp://{host}")
        self._sock, self.host, self.address = sock, host, f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(sock, self._stop), name="dpserve-gate-server", daemon=True
        )
        self._thread.start()

    def rebind(self, host: str) -> None:
        """Serve on `host` from now on (a new port; the old socket is closed). Loopback when every
        rank runs on this node: then nothing off the node can reach the socket at all."""
        if host == self.host:
            return
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
        self._open(host)

    @property
    def endpoint(self) -> GateEndpoint:
        return self.address, self._auth.key

    def set_key(self, key: bytes) -> None:
        """Take a new group's key (frames sealed with the old one are dropped from now on)."""
        self._auth = FrameAuth(key)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _drop(self, reason: str, size: int) -> None:
        count = self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if count == 1 or count % 1000 == 0:  # a flood must not flood the log as well
            logger.warning(
                "balance gate server: dropped a %d-byte frame (%s; %d so far)", size, reason, count
            )
        if self._on_drop is not None:
            self._on_drop(reason)

    def _serve(self, sock: zmq.Socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._serve_ready(sock)
            except Exception:  # whatever a frame does, the server keeps serving
                if stop.is_set():
                    return
                logger.exception("balance gate server: unexpected error; serving on")
                time.sleep(0.01)

    def _serve_ready(self, sock: zmq.Socket) -> None:
        if not sock.poll(200):  # wake up now and then to notice close()
            return
        # Drain everything queued: one wake-up can serve both ranks. (poll(0) is ~5x cheaper than a
        # recv that raises zmq.Again.)
        while sock.poll(0):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:  # a DEALER's message is [identity, payload]
                self._drop("malformed", sum(len(f) for f in frames))
                continue
            ident, frame = frames
            payload = self._auth.open(frame)
            if payload is None:
                self._drop("unauthenticated", len(frame))
                continue
            try:
                req = GateReport.from_bytes(payload)
            except (ValueError, struct.error):  # out of range, or not a report at all
                self._drop("invalid", len(frame))
                continue
            try:
                admits = self._handle(req)
            except Exception:
                logger.exception("balance gate server: cannot serve rank %d's report", req.rank)
                continue
            reply = self._auth.seal(encode_decisions(req.wave, req.first_decided, admits))
            self.served += 1  # before the send: a client that has its reply sees it counted
            try:
                sock.send_multipart([ident, reply], zmq.NOBLOCK)
            except zmq.ZMQError:  # that rank's queue is full (it is gone), or it vanished: drop
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


def coordinator_actor(cfg: BalanceConfig) -> Any:
    """The balance coordinator's actor handle, joining Ray as a driver first if this process is not
    in Ray yet (the engine core is a subprocess of the rank actor, not a Ray worker)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=cfg.ray_address or "auto",
            namespace=cfg.namespace,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    return ray.get_actor(cfg.coordinator_name, namespace=cfg.namespace)


class ZmqGateClient:
    """Engine-core side of the ZMQ transport (one per rank; used from the engine-core thread only).

    ``resolve`` returns the coordinator's current address and the group's frame key (it may block
    and raise); by default it looks the named actor up through Ray. It runs once in ``connect``
    (start-up) and afterwards only in a background thread.
    """

    def __init__(
        self,
        cfg: BalanceConfig,
        rank: int,
        resolve: Callable[[], GateEndpoint] | None = None,
        retry_s: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.dead_after_s = float(cfg.dead_after_s)
        self.retry_s = retry_s
        self._resolve = resolve or self._resolve_via_ray
        self._ctx = zmq.Context(io_threads=1)
        self._sock: zmq.Socket | None = None
        self._handle = 0  # the socket's libzmq handle, for the GIL-held calls
        self._raw = _GilHeldZmq.load()
        self._buf = ctypes.create_string_buffer(_RECV_BUF)
        self.address: str | None = None
        self._auth: FrameAuth | None = None
        self.dropped_replies = 0  # replies that were not authentic or not well formed
        self._decisions: dict[StepKey, bool] = {}  # received, not yet used
        self._asked: dict[StepKey, None] = {}  # keys a reply is expected for (ordered set)
        self._unanswered_since: float | None = None  # first report sent after the last reply
        # Outage state, and what the resolver thread hands over (plain attribute writes).
        self.down = False
        self._down_since = 0.0
        self._resolved: GateEndpoint | None = None
        self._resolver: threading.Thread | None = None
        self._closed = False
        self._last_resolve = 0.0
        # Figures (cost per step, fallbacks, outages).
        self.client_s = 0.0  # time spent in report() + decision() on the engine-core thread
        # Of that, CPU time of the thread itself; the rest is waiting: preempted by other processes
        # or threads, or for the GIL (what a shared host adds, not what the client does).
        self.client_cpu_s = 0.0
        self.calls = 0
        self.late = 0  # decision expected but not back within wait_s (fallback applied)
        self.down_decisions = 0  # decisions skipped because the coordinator was down (fallback)
        self.outages = 0
        self.reconnects = 0
        self.last_outage_s: float | None = None  # how long the last outage lasted

    # ---- connection ----------------------------------------------------------------------------
    def _resolve_via_ray(self) -> GateEndpoint:
        import ray

        actor = coordinator_actor(self.cfg)
        address, key = ray.get(actor.gate_endpoint.remote(), timeout=10)
        return str(address), bytes(key)

    def connect(self) -> bool:
        """Resolve and connect now (start-up; blocking). On failure the gate stays open and the
        address is looked up again in the background."""
        try:
            self._attach(self._resolve(), wait_s=2.0)
            logger.info("rank %d: balance coordinator at %s (zmq)", self.rank, self.address)
            return True
        except Exception:
            logger.warning(
                "rank %d: cannot reach the balance coordinator; gate open until it is found",
                self.rank,
                exc_info=True,
            )
            self._go_down(time.monotonic())
            return False

    def _attach(self, endpoint: GateEndpoint, wait_s: float = 0.0) -> None:
        """Connect a fresh DEALER to ``endpoint``'s address; ``wait_s`` > 0 (start-up only) waits for
        the TCP connection, so that the first reports are not dropped."""
        address, key = endpoint
        if self._sock is not None:
            self._sock.close(0)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue only to a live connection and only a few messages: reports to a dead coordinator
        # are dropped, not replayed to its successor later.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 64)
        sock.connect(address)
        if wait_s > 0:
            sock.poll(int(wait_s * 1e3), zmq.POLLOUT)  # writable once connected (IMMEDIATE)
        self._sock, self.address, self._auth = sock, address, FrameAuth(key)
        self._handle = sock.underlying
        self._unanswered_since = None

    def _resolve_in_background(self) -> None:
        def run() -> None:
            # Retries on its own until found: an idle rank makes no reports (no step thread to
            # retry from), and a restarting actor refuses the first lookups.
            failures = 0
            while not self._closed:
                try:
                    self._resolved = self._resolve()
                    return
                except Exception as e:
                    failures += 1
                    log = logger.warning if failures == 1 else logger.debug
                    log(
                        "rank %d: coordinator lookup failed (retrying every %g s): %r",
                        self.rank,
                        self.retry_s,
                        e,
                    )
                time.sleep(self.retry_s)

        self._last_resolve = time.monotonic()
        self._resolver = threading.Thread(target=run, name="dpserve-gate-resolve", daemon=True)
        self._resolver.start()

    def _go_down(self, now: float) -> None:
        if not self.down:
            self.down, self._down_since = True, now
            self.outages += 1
        self._decisions.clear()
        self._asked.clear()

    def _check(self, now: float) -> None:
        """Outage detection and recovery bookkeeping; cheap, runs on every report."""
        resolved = self._resolved
        if resolved is not None:
            self._resolved = None
            if resolved[0] != self.address or self._auth is None or resolved[1] != self._auth.key:
                logger.info("rank %d: balance coordinator moved to %s; reconnecting", self.rank, resolved[0])
                self._attach(resolved)
                self.reconnects += 1
        if (
            not self.down
            and self._unanswered_since is not None
            and now - self._unanswered_since > self.dead_after_s
        ):
            logger.warning(
                "rank %d: balance coordinator silent for %.1f s; gate open (admit) until it is back",
                self.rank,
                now - self._unanswered_since,
            )
            self._go_down(self._unanswered_since)  # the outage began with the first unanswered report
        if (
            self.down
            and (self._resolver is None or not self._resolver.is_alive())
            and now - self._last_resolve >= self.retry_s
        ):
            self._resolve_in_background()

    def _recv(self) -> bytes | None:
        """One queued reply, or None; never blocks (and with ``_raw``, never drops the GIL)."""
        raw, sock = self._raw, self._sock
        if sock is None:
            return None
        if raw is not None:
            n = raw.recv(self._handle, self._buf, _RECV_BUF, zmq.DONTWAIT)
            return None if n < 0 else self._buf.raw[: min(n, _RECV_BUF)]
        # poll(0) costs ~4 us; a recv that raises zmq.Again ~25 us.
        return sock.recv(zmq.NOBLOCK) if sock.poll(0) else None

    def _send(self, msg: bytes) -> bool:
        """Queue ``msg`` without blocking; False when there is no live connection (or it is full)."""
        raw, sock = self._raw, self._sock
        if sock is None:
            return False
        if raw is not None:
            return raw.send(self._handle, msg, len(msg), zmq.DONTWAIT) >= 0
        try:
            sock.send(msg, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _drain(self) -> None:
        while (frame := self._recv()) is not None:
            payload = self._auth.open(frame) if self._auth is not None else None
            try:
                if payload is None:
                    raise ValueError("not sealed with the group's key")
                wave, first, admits = decode_decisions(payload)
            except Exception:
                self.dropped_replies += 1
                logger.warning("rank %d: gate reply (%d bytes) dropped", self.rank, len(frame))
                continue
            self._unanswered_since = None
            if self.down:
                self.down = False
                self.last_outage_s = time.monotonic() - self._down_since
                logger.info(
                    "rank %d: balance coordinator answers again after %.2f s", self.rank, self.last_outage_s
                )
            for i, a in enumerate(admits):
                self._decisions[(wave, first + i)] = bool(a)
            while len(self._decisions) > _KEEP:
                del self._decisions[next(iter(self._decisions))]

    # ---- GateClient ------------------------------------------------------------------------------
    def report(self, key: StepKey, running: int, waiting: int, max_num_seqs: int, lead: int) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        now = time.monotonic()
        self._drain()  # first: a reply that came while the engine was idle is not an outage
        self._check(now)
        sock = self._sock
        if sock is not None:
            wave, step = key
            msg = GateReport.encode(
                self.rank, wave, step, running, waiting, max_num_seqs, lead, self.cfg.horizon,
                self.client_s * 1e3, self.calls, self.late,
            )  # fmt: skip
            msg = self._auth.seal(msg) if self._auth is not None else msg
            # Not sent = no live connection (coordinator gone or not up yet): counts as unanswered.
            if self._send(msg) and not self.down:  # while down, decisions are not waited for
                for i in range(self.cfg.horizon):
                    self._asked[(wave, step + lead + i)] = None
                while len(self._asked) > _KEEP:
                    del self._asked[next(iter(self._asked))]
            if self._unanswered_since is None:
                self._unanswered_since = now
        self.calls += 1
        self.client_cpu_s += time.thread_time() - c0
        self.client_s += time.perf_counter() - t0

    def decision(self, key: StepKey, wait_s: float) -> bool | None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self._drain()
            admit = self._decisions.pop(key, None)
            if admit is not None:
                self._asked.pop(key, None)
                return admit
            if key not in self._asked:
                if self.down:
                    self.down_decisions += 1
                return None  # none was asked for this step (wave start, or coordinator down)
            del self._asked[key]
            sock = self._sock
            deadline = t0 + wait_s
            while sock is not None:
                left = deadline - time.perf_counter()
                # poll() takes whole ms: round up so a sub-ms wait still waits.
                if left <= 0 or not sock.poll(max(1, int(left * 1e3 + 0.999))):
                    break
                self._drain()
                admit = self._decisions.pop(key, None)
                if admit is not None:
                    return admit
            self.late += 1
            return None
        finally:
            self.client_cpu_s += time.thread_time() - c0
            self.client_s += time.perf_counter() - t0

    def stats(self) -> dict[str, Any]:
        return {
            "transport": "zmq",
            "client_cpu_ms_total": self.client_cpu_s * 1e3,
            "address": self.address,
            "gil_held_calls": self._raw is not None,
            "down": self.down,
            "outages": self.outages,
            "reconnects": self.reconnects,
            "down_decisions": self.down_decisions,
            "last_outage_s": self.last_outage_s,
            "dropped_replies": self.dropped_replies,
        }

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close(0)
            self._sock, self._handle = None, 0
        self._ctx.term()
