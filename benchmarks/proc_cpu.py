"""Where the CPU goes during a benchmark: CPU seconds per process role, read from /proc.

On a 2-core box every serving process competes with the engines for the same cores, so a serving
benchmark that only reports throughput cannot say why one server is slower. `snapshot()` before and
after a workload and `by_role()` of the difference give CPU seconds per role (engine cores, rank
actors, ingress, Ray's own daemons, the benchmark client...). Linux only; elsewhere it is empty.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# (substring of the command line, role); first match wins, so specific patterns come first.
ROLES: list[tuple[str, str]] = [
    ("EngineCore", "vllm engine core"),
    ("VLLM::Worker", "vllm model worker"),
    # vLLM's CPU model workers are multiprocessing children that keep the spawn command line.
    ("multiprocessing.spawn", "vllm model worker"),
    ("ray::DPRank", "dpserve rank actor (vLLM frontend)"),
    ("ServeReplica", "serve replica (dpserve ingress)"),
    ("ServeController", "serve controller"),
    ("ProxyActor", "serve HTTP proxy"),
    ("BalanceCoordinator", "balance coordinator"),
    ("vllm.entrypoints.openai.api_server", "vllm API server"),
    ("APIServer", "vllm API server"),
    ("DPCoordinator", "vllm DP coordinator"),
    ("raylet", "ray daemons"),
    ("gcs_server", "ray daemons"),
    ("dashboard", "ray daemons"),
    ("log_monitor", "ray daemons"),
    ("monitor.py", "ray daemons"),
    ("ray::IDLE", "ray idle workers"),
    ("default_worker.py", "ray idle workers"),
]


def _cmdline(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (command line, CPU seconds used so far)} for every process readable now."""
    out: dict[int, tuple[str, float]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: utime and stime are fields 14 and 15.
        fields = stat[stat.rfind(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS
        out[int(entry.name)] = (_cmdline(entry.name), cpu)
    return out


def role_of(cmdline: str, client_pid: int | None = None, pid: int | None = None) -> str:
    if client_pid is not None and pid == client_pid:
        return "benchmark client"
    for pattern, role in ROLES:
        if pattern in cmdline:
            return role
    return "other"


def by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
            client_pid: int | None = None) -> dict[str, float]:  # fmt: skip
    """CPU seconds used between two snapshots, summed per role (a process that started in between
    counts from zero; one that ended in between is lost). Roles with no CPU are left out."""
    totals: dict[str, float] = {}
    for pid, (cmd, cpu) in after.items():
        # The command line is re-read because Ray workers rename themselves once they host an actor.
        prev = before.get(pid)
        used = cpu - (prev[1] if prev else 0.0)
        if used <= 0:
            continue
        role = role_of(cmd or (prev[0] if prev else ""), client_pid, pid)
        totals[role] = totals.get(role, 0.0) + used
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
