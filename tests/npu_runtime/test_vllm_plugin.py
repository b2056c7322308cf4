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


@pytest.mark.parametrize(
    ("device_type", "is_cpu", "features"),
    [("cpu", True, ["cpu_dp", "cpu_ep", "eplb", "balance"]), ("cuda", False, ["eplb", "balance"]),
     ("npu", False, ["balance"])],  # Ascend: EPLB goes through vllm-ascend's layers (eplb.ascend)
)  # fmt: skip
def test_plugin_installs_the_platforms_features(monkeypatch: pytest.MonkeyPatch, device_type: str, is_cpu: bool,
                                                features: list[str]) -> None:  # fmt: skip
    import vllm.platforms

    from npu_runtime import vllm_patches
    from npu_runtime.vllm_plugin import register

    platform = type("StandInPlatform", (), {"device_type": device_type, "is_cpu": lambda self: is_cpu})()
    monkeypatch.setattr(vllm.platforms, "current_platform", platform, raising=False)
    installed: list[list[str]] = []
    monkeypatch.setattr(vllm_patches, "install", lambda f: installed.append(list(f)) or [])
    monkeypatch.delenv("DPSERVE_DISABLE_PLUGIN", raising=False)
    register()
    assert installed == [features]
