"""Background threads of the EPLB worker: how they yield to the forward pass (OS priority, OpenMP
team size), the persistent preparing thread, and per-thread CPU accounting."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("dpserve.eplb.applier")

_OMP: Any = None


def tune_staging_thread(nice: int, omp_threads: int) -> None:
    """Make the calling (staging) thread yield to the forward pass: lower OS priority, and few
    OpenMP threads for its copies (a second thread's torch ops otherwise start their own OpenMP team,
    which competes with the forward's). Both per thread; best effort."""
    global _OMP
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            logger.debug("EPLB: could not renice the staging thread", exc_info=True)
    if not omp_threads:
        return
    if _OMP is None:
        _OMP = False
        try:
            import ctypes

            with open("/proc/self/maps") as f:
                libs = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
            if libs:
                _OMP = ctypes.CDLL(sorted(libs)[0])
        except Exception:
            logger.debug("EPLB: no OpenMP runtime found", exc_info=True)
    if _OMP:
        _OMP.omp_set_num_threads(omp_threads)  # this thread's ICV only: the forward's keep theirs


class BackgroundQueue:
    """One persistent daemon thread running the callables put on it, in order.

    Persistent because `Thread.start` blocks its caller - here the engine's stepping thread, inside
    `eplb_stage` - until the new thread has run (py-spy: 5-15 ms on 2 busy cores). The thread is
    started on first use and tuned once (`tune_staging_thread`).
    """

    def __init__(self, name: str, nice: int, omp_threads: int) -> None:
        self.name, self.nice, self.omp_threads = name, nice, omp_threads
        self._q: queue.SimpleQueue | None = None

    def start(self) -> None:
        if self._q is not None:
            return
        q = self._q = queue.SimpleQueue()

        def loop() -> None:
            tune_staging_thread(self.nice, self.omp_threads)
            while True:
                fn = q.get()
                try:
                    fn()
                except Exception:  # the callables report their own failures
                    logger.exception("EPLB: %s thread", self.name)

        threading.Thread(target=loop, name=self.name, daemon=True).start()

    def put(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the thread; returns at once."""
        self.start()
        assert self._q is not None
        self._q.put(fn)


def thread_cpu_ms() -> dict[int, dict]:
    """CPU time (user + system, ms) of every thread of this process: {tid: {"name", "cpu_ms"}}."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, dict] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = {"name": name, "cpu_ms": (int(fields[11]) + int(fields[12])) * 1e3 / tick}
    return out
