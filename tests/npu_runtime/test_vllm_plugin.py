"""The plugin's engine priority: only processes vLLM names EngineCore* take DPSERVE_ENGINE_NICE."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from npu_runtime.vllm_plugin import ENGINE_NICE_ENV, _set_engine_priority


def _report(queue) -> None:
    _set_engine_priority()
    queue.put(os.getpriority(os.PRIO_PROCESS, 0))


def _niceness_in(name: str, nice: str) -> int:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    os.environ[ENGINE_NICE_ENV] = nice
    try:
        proc = ctx.Process(target=_report, args=(queue,), name=name)
        proc.start()
        value = queue.get(timeout=60)
        proc.join(30)
    finally:
        del os.environ[ENGINE_NICE_ENV]
    return value


def test_engine_core_takes_the_niceness_and_others_keep_theirs() -> None:
    # Raising niceness needs no privilege, so the test holds for any user.
    base = os.getpriority(os.PRIO_PROCESS, 0)
    wanted = min(19, base + 3)
    assert _niceness_in("EngineCore_DP0", str(wanted)) == wanted
    assert _niceness_in("SomeOtherProcess", str(wanted)) == base


@pytest.mark.skipif(os.geteuid() == 0, reason="root may lower niceness")
def test_without_privilege_the_engine_keeps_its_niceness() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert _niceness_in("EngineCore_DP0", "-10") == base
