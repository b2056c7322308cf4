"""The balance scheduler's base class after vllm-ascend's patches (npu_runtime.ascend_scheduler).

vllm-ascend 0.23.0.post1's `patch/platform/patch_balance_schedule.py` is loaded from its sdist by
import, as its platform patches load it: it defines its BalanceScheduler over vLLM's Scheduler and
rebinds `vllm.v1.core.sched.scheduler.Scheduler` to it. Its one vllm-ascend import,
`vllm_ascend.utils.vllm_version_is` (whose module needs torch_npu), is a stand-in; everything else
it imports is vLLM's. The rebinding is undone after each test.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import vllm.v1.core.sched.scheduler as vllm_scheduler
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.engine.core import EngineCoreProc

from npu_runtime import ascend_scheduler as asch
from npu_runtime.ascend_patches import BALANCE_MODULE, BALANCE_SCHEDULER
from scheduler.balance_scheduler import BalanceAsyncScheduler, BalanceScheduler, BalanceSchedulerMixin

ORIGINAL = vllm_scheduler.Scheduler


@pytest.fixture
def ascend_patched(vllm_ascend_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """vllm-ascend's balance-schedule patch applied in this process; undone afterwards."""
    monkeypatch.setattr(vllm_scheduler, "Scheduler", ORIGINAL)  # restored on teardown
    monkeypatch.setattr(EngineCoreProc, "run_engine_core", EngineCoreProc.run_engine_core)
    utils = types.ModuleType("vllm_ascend.utils")
    utils.vllm_version_is = lambda version: version == "0.23.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm_ascend.utils", utils)
    path = vllm_ascend_root / "vllm_ascend" / "patch" / "platform" / "patch_balance_schedule.py"
    spec = importlib.util.spec_from_file_location(BALANCE_MODULE, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, BALANCE_MODULE, module)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    yield module
    asch._BUILT.clear()


def test_vllm_ascend_rebinds_vllms_scheduler(ascend_patched: types.ModuleType) -> None:
    in_force = asch.scheduler_in_force()
    assert in_force is ascend_patched.BalanceScheduler and asch.qualified(in_force) == BALANCE_SCHEDULER
    assert in_force.__mro__[1] is ORIGINAL and callable(in_force.balance_gather)


def test_balance_scheduler_resolved_after_the_patch_derives_from_it(ascend_patched: types.ModuleType) -> None:
    built = asch.class_in_force(BalanceSchedulerMixin, BalanceScheduler, async_scheduling=False)
    assert built is not BalanceScheduler and built.__name__ == "BalanceScheduler"
    assert built.__mro__[1:3] == (BalanceSchedulerMixin, ascend_patched.BalanceScheduler)
    asch.check_scheduler_class(built, BALANCE_SCHEDULER)
    assert asch.class_in_force(BalanceSchedulerMixin, BalanceScheduler, False) is built  # made once


def test_async_balance_scheduler_keeps_vllm_ascends_scheduler(ascend_patched: types.ModuleType) -> None:
    built = asch.class_in_force(BalanceSchedulerMixin, BalanceAsyncScheduler, async_scheduling=True)
    mro = built.__mro__
    # AsyncScheduler's placeholders first, then vllm-ascend's balance_gather, then vLLM's Scheduler.
    assert mro.index(AsyncScheduler) < mro.index(ascend_patched.BalanceScheduler) < mro.index(ORIGINAL)
    asch.check_scheduler_class(built, BALANCE_SCHEDULER)


def test_a_class_resolved_before_the_patch_is_refused(ascend_patched: types.ModuleType) -> None:
    # scheduler.balance_scheduler was imported before the patch ran: its static classes derive
    # from vLLM's original Scheduler.
    with pytest.raises(asch.SchedulerMismatch, match="resolved before vllm-ascend's patches"):
        asch.check_scheduler_class(BalanceScheduler, BALANCE_SCHEDULER)


def test_without_the_patch_an_ascend_process_is_refused() -> None:
    assert asch.scheduler_in_force() is ORIGINAL
    with pytest.raises(asch.SchedulerMismatch, match="platform patches have not run"):
        asch.check_scheduler_class(BalanceScheduler, BALANCE_SCHEDULER)
    asch.check_scheduler_class(BalanceScheduler, None)  # CPU / GPU: vLLM's own Scheduler
    assert asch.class_in_force(BalanceSchedulerMixin, BalanceScheduler, False) is BalanceScheduler
    assert asch.class_in_force(BalanceSchedulerMixin, BalanceAsyncScheduler, True) is BalanceAsyncScheduler


def test_expected_scheduler_follows_vllms_platform() -> None:
    ascend_platform = type("NPUPlatform", (), {"__module__": "vllm_ascend.platform"})()
    cpu_platform = type("CpuPlatform", (), {"__module__": "vllm.platforms.cpu"})()
    assert asch.expected_in_force(ascend_platform) == BALANCE_SCHEDULER
    assert asch.expected_in_force(cpu_platform) is None
    assert asch.expected_in_force() is None  # this process: vLLM's CPU platform


def test_on_ascend_the_balance_scheduler_refuses_before_building_anything(
    ascend_patched: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from npu_runtime import ascend_patches

    monkeypatch.setattr(asch, "expected_in_force", lambda platform=None: BALANCE_SCHEDULER)
    # vllm-ascend's symbols are checked first: not installed in this environment, so refused.
    monkeypatch.setattr(ascend_patches, "_STATE", ascend_patches._State())
    monkeypatch.setattr(ascend_patches, "source_root", lambda: None)
    with pytest.raises(ascend_patches.AscendPatchError, match="balance scheduler on Ascend"):
        BalanceScheduler(vllm_config=None)
    # With them fitting, a class resolved before vllm-ascend's patch is refused by its base.
    monkeypatch.setattr(ascend_patches, "require", lambda *features, root=None: None)
    with pytest.raises(asch.SchedulerMismatch, match="resolved before"):
        BalanceScheduler(vllm_config=None)
