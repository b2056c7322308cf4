"""The scheduler class in force after vllm-ascend's patches, and the check that ours derives from it.

vllm-ascend's balance scheduling is a monkeypatch applied with its platform patches (when its general
plugins load, in every vLLM process): `patch/platform/patch_balance_schedule.py` defines
`BalanceScheduler(Scheduler)` and rebinds `vllm.v1.core.sched.scheduler.Scheduler` to it, and its DP
engine loop calls `scheduler.balance_gather(dp_group)` every step when its balance flag is on. A
subclass of `Scheduler` made before that rebinding (a module imported earlier in the process, or in
a parent it was forked from) derives from vLLM's original class: it loses Ascend's scheduling, and
that loop fails on it.

So the balance scheduler (scheduler.balance_scheduler) is resolved when the engine builds it, from
the classes bound then (`class_in_force`), and checks itself (`check_scheduler_class`): in a process
running vllm-ascend the `Scheduler` in force must be vllm-ascend's (`BALANCE_SCHEDULER`), and the
scheduler's class must derive from it. A mismatch refuses the scheduler with both class names.
"""

from __future__ import annotations

import importlib
from typing import Any

from npu_runtime.ascend_patches import BALANCE_SCHEDULER

VLLM_SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"


class SchedulerMismatch(RuntimeError):
    """The balance scheduler does not derive from the Scheduler vLLM (or vllm-ascend) has bound."""


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def scheduler_in_force() -> type:
    """`vllm.v1.core.sched.scheduler.Scheduler` as bound now (vllm-ascend's once its patches ran)."""
    return importlib.import_module(VLLM_SCHEDULER_MODULE).Scheduler


def expected_in_force(platform: Any = None) -> str | None:
    """The Scheduler this process must have in force: vllm-ascend's BalanceScheduler when vLLM's
    platform is vllm-ascend's (`platform`: vLLM's current_platform by default), else None (vLLM's own,
    not checked by name)."""
    if platform is None:
        from vllm.platforms import current_platform

        platform = current_platform
    return BALANCE_SCHEDULER if type(platform).__module__.startswith("vllm_ascend") else None


def bases_in_force(async_scheduling: bool) -> tuple[type, ...]:
    """What a balance scheduler derives from now: the Scheduler in force, and with async scheduling
    vLLM's AsyncScheduler in front of it (AsyncScheduler itself derives from the class bound when it
    was imported, vLLM's original under vllm-ascend, so the Scheduler in force is added after it)."""
    in_force = scheduler_in_force()
    if not async_scheduling:
        return (in_force,)
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    return (AsyncScheduler,) if issubclass(AsyncScheduler, in_force) else (AsyncScheduler, in_force)


_BUILT: dict[tuple[type, type, tuple[type, ...]], type] = {}


def class_in_force(mixin: type, static_cls: type, async_scheduling: bool) -> type:
    """`static_cls` (mixin + vLLM's class, made at import) when it derives from every base in force,
    else the same mixin over the bases in force, made now (once per set of bases), under the same
    name and module."""
    bases = bases_in_force(async_scheduling)
    if all(issubclass(static_cls, b) for b in bases):
        return static_cls
    key = (mixin, static_cls, bases)
    if key not in _BUILT:
        ns = {"__module__": static_cls.__module__, "__qualname__": static_cls.__qualname__,
              "__doc__": f"{static_cls.__doc__} Over {', '.join(qualified(b) for b in bases)}."}  # fmt: skip
        _BUILT[key] = type(static_cls.__name__, (mixin, *bases), ns)
    return _BUILT[key]


def check_scheduler_class(cls: type, expected: str | None) -> None:
    """Raise SchedulerMismatch unless the Scheduler in force is `expected` (when given) and `cls`
    derives from it."""
    in_force = scheduler_in_force()
    if expected is not None and qualified(in_force) != expected:
        raise SchedulerMismatch(
            f"vLLM's Scheduler is {qualified(in_force)}, expected {expected}: vllm-ascend's platform "
            "patches have not run in this process, or its balance-schedule patch moved"
        )
    if not issubclass(cls, in_force):
        bases = [qualified(b) for b in cls.__mro__[1:]]
        raise SchedulerMismatch(
            f"{qualified(cls)} does not derive from the Scheduler in force, {qualified(in_force)}: it was "
            f"resolved before vllm-ascend's patches rebound it (its bases: {bases}); name "
            "scheduler.balance_scheduler.BalanceAutoScheduler, which resolves at engine start"
        )
