"""CPU accounting per process role (benchmarks' "where the CPU went" table)."""

from __future__ import annotations

import os
import time

from benchmarks import proc_cpu


def test_roles_from_command_lines() -> None:
    assert proc_cpu.role_of("VLLM::EngineCore_DP1") == "vllm engine core"
    assert proc_cpu.role_of("ray::DPRank.output_stream") == "dpserve rank actor (vLLM frontend)"
    assert proc_cpu.role_of("ray::ServeReplica:dpserve:DPServer") == "serve replica (dpserve ingress)"
    assert proc_cpu.role_of("python -c from multiprocessing.spawn import spawn_main") == "vllm model worker"
    assert proc_cpu.role_of("/usr/bin/something-else") == "other"
    assert proc_cpu.role_of("python bench.py", client_pid=7, pid=7) == "benchmark client"


def test_by_role_sums_differences_and_counts_new_processes_from_zero() -> None:
    before = {1: ("VLLM::EngineCore_DP0", 10.0), 2: ("VLLM::EngineCore_DP1", 4.0), 3: ("raylet", 1.0)}
    after = {
        1: ("VLLM::EngineCore_DP0", 12.5),
        2: ("VLLM::EngineCore_DP1", 5.0),
        3: ("raylet", 1.0),  # no CPU used: left out
        4: ("ray::ServeReplica:dpserve:DPServer", 0.5),  # started in between
    }
    assert proc_cpu.by_role(before, after) == {
        "vllm engine core": 3.5,
        "serve replica (dpserve ingress)": 0.5,
    }


def test_snapshot_sees_this_process_burn_cpu() -> None:
    before = proc_cpu.snapshot()
    assert os.getpid() in before
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    used = proc_cpu.by_role(before, proc_cpu.snapshot(), client_pid=os.getpid())
    assert used.get("benchmark client", 0.0) >= 0.1
