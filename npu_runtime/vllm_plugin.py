"""dpserve's vLLM general plugin (entry point `vllm.general_plugins: dpserve_platform`).

vLLM loads general plugins in every process it starts (API server, engine cores, workers), before
models are built. The plugin sets the engine core's priority and applies dpserve's vLLM patches
(all of them, with their checks, are in npu_runtime.vllm_patches): the CPU data/expert-parallel
gaps on CPU only, the balance-scheduler hooks everywhere, the EPLB hooks everywhere but on Ascend
(where eplb.ascend hooks vllm-ascend's layers and runner instead).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("dpserve.plugin")

# Niceness for dpserve's engine-core processes (set by the rank actor; unset: inherited). Ray starts
# its workers at nice 15, so engines inherit 15 while Ray's daemons run at 0.
ENGINE_NICE_ENV = "DPSERVE_ENGINE_NICE"


def _set_engine_priority() -> None:
    """Give this engine-core process the niceness asked for in ENGINE_NICE_ENV (only engine cores:
    vLLM names their processes EngineCore*; the frontend in the rank actor keeps Ray's)."""
    nice = os.environ.get(ENGINE_NICE_ENV)
    if not nice:
        return
    import multiprocessing

    if not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, int(nice))
    except (PermissionError, ValueError) as exc:  # lowering niceness needs CAP_SYS_NICE
        logger.warning("dpserve: engine core kept niceness %d (%s=%s: %s)", os.getpriority(os.PRIO_PROCESS, 0),
                       ENGINE_NICE_ENV, nice, exc)  # fmt: skip


def register() -> None:
    """vLLM general-plugin entry point: checks and applies npu_runtime.vllm_patches. A feature whose
    vLLM symbols do not fit is not patched at all; the rank refuses to start it (`require`)."""
    if os.environ.get("DPSERVE_DISABLE_PLUGIN") == "1":
        return
    _set_engine_priority()
    from vllm.platforms import current_platform

    from npu_runtime import vllm_patches

    # EPLB and balance patches are inert until an applier or a balance scheduler uses them, and
    # must be in place before any model is built (a compiled graph traces the patched router).
    # On Ascend the EPLB path runs through vllm-ascend's MoE layers and runner (eplb.ascend), not the
    # vLLM symbols of the eplb feature; the balance scheduler's lockstep hook applies there too.
    features = ["balance"] if current_platform.device_type == "npu" else ["eplb", "balance"]
    if current_platform.is_cpu():
        features[:0] = ["cpu_dp", "cpu_ep"]
    vllm_patches.install(features)
