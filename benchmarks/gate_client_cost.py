"""What the gate client costs the engine-core thread per step, and what sharing the cores adds to it.

The balance cluster runs (``benchmarks/balance.py --cluster``) measure the ZMQ gate client at about
0.2 ms of the engine-core thread's CPU per lockstep step but 0.8-0.9 ms of wall time. This benchmark
isolates the two outside vLLM: a real :class:`~scheduler.gate_transport.GateServer` in its own
process, a real :class:`~scheduler.gate_transport.ZmqGateClient` in this one, and a step that works
for ``--step-ms`` through a 16 MB array between the client's ``report`` and ``decision`` (so the
client runs with cold caches, as after a forward pass). Beside it run 0, 1 or 2 *hog* processes,
each spinning on one core at the same priority: with 2 cores, 1 hog leaves no idle core and 2 hogs
oversubscribe them as the 2-rank cluster does (two engines, Ray, the coordinator). A second transport,
``udp``, is a floor to compare with, not a product path: the same step, one sealed 65-byte report sent
and any sealed reply read per step over a plain UDP socket (no I/O thread between the caller and the
kernel) to a server process that seals and returns one decision per report. Variants run in
interleaved rounds; the table gives medians over rounds of each run's mean per step.

Priority variants (``--server-nice``, ``--io-nice``) ask whether the wall time is the wake-ups on the
step path preempting the caller: the server process raised by that many nice levels, or the client's
own ZMQ threads (``ZMQbg/*``, the I/O thread its send wakes) set to that niceness. Left out, a variant
runs at the priorities the processes start with, as in the default table.

    python benchmarks/gate_client_cost.py [--rounds 3] [--steps 300] [--out gate_client_cost]
    python benchmarks/gate_client_cost.py --transports zmq --hogs 2 --server-nice 0 19 --io-nice 19 \
        --out gate_client_cost_priority
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
KEY = b"gate-client-cost-benchmark-key!!"


def _serve(queue: Any, nice: int = 0) -> None:
    from scheduler.gate_transport import GateServer

    os.nice(nice)
    server = GateServer(lambda report: [True] * report.horizon, "127.0.0.1", KEY)
    queue.put(server.address)
    while True:
        time.sleep(3600)


def _serve_udp(queue: Any, nice: int = 0) -> None:
    import socket

    from scheduler.frame_auth import FrameAuth

    os.nice(nice)
    auth = FrameAuth(KEY)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    queue.put(sock.getsockname())
    reply = b"D" + bytes(16) + b"\x01"
    while True:
        frame, peer = sock.recvfrom(4096)
        if auth.open(frame) is not None:
            sock.sendto(auth.seal(reply), peer)


def _hog() -> None:
    work = np.random.rand(2_000_000)
    while True:
        work.sum()


def _renice_zmq_threads(nice: int) -> int:
    """Set this process's ZMQ background threads (libzmq names them ``ZMQbg/...``) to ``nice``; how
    many there were."""
    tids = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        if comm.read_text().startswith("ZMQbg"):
            tids.append(int(comm.parent.name))
    for tid in tids:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    return len(tids)


def _step(work: np.ndarray, step_ms: float) -> None:
    """The engine's forward stand-in: ``step_ms`` of work through ``work``, evicting the client's code
    and data from the caches."""
    end = time.perf_counter() + step_ms / 1e3
    while time.perf_counter() < end:
        work.sum()


def _zmq_client(
    address: Any, steps: int, step_ms: float, work: np.ndarray, io_nice: int | None = None
) -> tuple[float, float, int]:
    """Wall and CPU seconds the product's client spends in ``report`` + ``decision`` over ``steps``
    steps, and its late decisions; ``io_nice``: the niceness of its ZMQ threads (None: unchanged)."""
    from scheduler.gate_report import BalanceConfig
    from scheduler.gate_transport import ZmqGateClient

    client = ZmqGateClient(BalanceConfig(), 0, resolve=lambda: (address, KEY))
    try:
        if not client.connect():
            raise RuntimeError("the gate client could not reach the benchmark's server")
        if io_nice is not None and _renice_zmq_threads(io_nice) == 0:
            raise RuntimeError("no ZMQ background thread to renice")
        time.sleep(1.0)  # the hogs are spinning
        for step in range(1, steps + 1):
            client.report((0, step), running=3, waiting=1, max_num_seqs=4, lead=1)
            _step(work, step_ms)
            client.decision((0, step), wait_s=0.005)
        return client.client_s, client.client_cpu_s, client.late
    finally:
        client.close()


def _udp_floor(
    address: Any, steps: int, step_ms: float, work: np.ndarray, io_nice: int | None = None
) -> tuple[float, float, int]:
    """Wall and CPU seconds of the UDP floor's per-step send + receive over ``steps`` steps (no
    decisions, so none is late; no I/O thread, so ``io_nice`` does not apply)."""
    import socket

    from scheduler.frame_auth import FrameAuth
    from scheduler.gate_report import GateReport

    auth = FrameAuth(KEY)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(address)
    sock.setblocking(False)
    wall = cpu = 0.0
    try:
        time.sleep(1.0)  # the hogs are spinning
        for step in range(1, steps + 1):
            t0, c0 = time.perf_counter(), time.thread_time()
            while True:
                try:
                    auth.open(sock.recv(4096))
                except BlockingIOError:
                    break
            sock.send(auth.seal(GateReport.encode(0, 0, step, 3, 1, 4, 1, 1, 0.0, step, 0)))
            cpu += time.thread_time() - c0
            wall += time.perf_counter() - t0
            _step(work, step_ms)
    finally:
        sock.close()
    return wall, cpu, 0


def run(
    hogs: int,
    steps: int,
    step_ms: float,
    transport: str = "zmq",
    server_nice: int = 0,
    io_nice: int | None = None,
) -> dict[str, float]:
    """One run: ``steps`` lockstep-like steps with ``hogs`` spinning processes beside it."""
    serve, measure = (_serve, _zmq_client) if transport == "zmq" else (_serve_udp, _udp_floor)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=serve, args=(queue, server_nice), daemon=True)
    server.start()
    address = queue.get(timeout=60)
    spinners = [ctx.Process(target=_hog, daemon=True) for _ in range(hogs)]
    for p in spinners:
        p.start()
    try:
        wall, cpu, late = measure(address, steps, step_ms, np.random.rand(2_000_000), io_nice)  # 16 MB
        return {
            "wall_ms_per_step": wall * 1e3 / steps,
            "cpu_ms_per_step": cpu * 1e3 / steps,
            "late": float(late),
            "loadavg_1m": os.getloadavg()[0],
        }
    finally:
        for p in [*spinners, server]:
            p.kill()
            p.join(5)


def render(result: dict[str, Any]) -> str:
    args = result["args"]
    lines = [
        "# Gate client cost per step: its own CPU time and what shared cores add",
        "",
        f"Generated by `benchmarks/gate_client_cost.py`: a real `GateServer` process and `ZmqGateClient`, "
        f"one report and one decision per step, a {args['step_ms']:g} ms step through a 16 MB array between "
        f"them (cold caches, as after a forward pass), {args['steps']} steps per run, {args['rounds']} "
        f"interleaved rounds, {os.cpu_count()} cores. Hogs: processes spinning at the same priority beside "
        "it. Medians over rounds of each run's mean per step (each round in brackets).",
        "",
    ]
    # A variant is "transport:hogs", or "transport:hogs:server_nice:io_nice" in priority runs.
    priority = any(v.count(":") == 3 for v in result["runs"])
    head = "| transport | hogs |" + (" server nice + | ZMQ threads nice |" if priority else "")
    lines += [
        f"{head} wall ms/step | CPU ms/step | wall / CPU | late decisions |",
        "| --- | ---: |" + (" ---: | ---: |" if priority else "") + " ---: | ---: | ---: | ---: |",
    ]
    for variant, runs in result["runs"].items():
        transport, hogs, *nice = variant.split(":")
        cells = f"{transport} | {hogs}"
        if priority:
            server_nice, io_nice = nice or ["0", "-"]
            cells += f" | {server_nice} | {'as started' if io_nice in ('-', 'None') else io_nice}"
        wall = [r["wall_ms_per_step"] for r in runs]
        cpu = [r["cpu_ms_per_step"] for r in runs]
        ratio = [w / c for w, c in zip(wall, cpu, strict=True)]
        lines.append(
            f"| {cells} | {statistics.median(wall):.3f} ({', '.join(f'{x:.3f}' for x in wall)}) | "
            f"{statistics.median(cpu):.3f} ({', '.join(f'{x:.3f}' for x in cpu)}) | "
            f"{statistics.median(ratio):.2f} | {sum(int(r['late']) for r in runs)} |"
        )
    lines += [
        "",
        "wall: time the calling thread spends in `report` + `decision` (udp: the send and the reads); CPU: that thread's own CPU time "
        "in them (`time.thread_time`). The difference is waiting: the thread is preempted while "
        "other threads and processes (the ZMQ I/O thread its send wakes, the server, the hogs) run on its core.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--step-ms", type=float, default=30.0)
    ap.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--transports", nargs="+", default=["zmq", "udp"], choices=["zmq", "udp"])
    ap.add_argument(
        "--server-nice", type=int, nargs="+", default=None, help="nice levels added to the server"
    )
    ap.add_argument(
        "--io-nice", type=int, nargs="+", default=None, help="niceness of the client's ZMQ threads (zmq only)"
    )
    ap.add_argument("--out", default="gate_client_cost")
    args = ap.parse_args()
    priority = args.server_nice is not None or args.io_nice is not None
    server_nices = args.server_nice or [0]
    # Each priority run includes the threads as started (None) beside the nice levels asked for.
    io_nices: list[int | None] = [None, *(args.io_nice or [])]
    variants = [
        (t, h, s, io)
        for t in args.transports
        for h in args.hogs
        for s in server_nices
        for io in (io_nices if t == "zmq" else [None])
    ]

    def key(t: str, h: int, s: int, io: int | None) -> str:
        return f"{t}:{h}:{s}:{io}" if priority else f"{t}:{h}"

    runs: dict[str, list[dict[str, float]]] = {key(*v): [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            res = run(v[1], args.steps, args.step_ms, v[0], v[2], v[3])
            runs[key(*v)].append(res)
            print(f"round {r} {key(*v)}: {res}", flush=True)
    result = {"args": vars(args), "runs": runs}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    (OUT / f"{args.out}.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
