"""Platform detection: the one place that knows whether we run on Ascend NPU, NVIDIA GPU or CPU.

Everything platform-specific (device type, Ray resource, collective backend, visible-device variable,
vLLM environment defaults) is answered here, so the rest of the code base never branches on the
platform by itself. Detection order is npu -> cuda -> cpu.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from functools import lru_cache

# Environment variables the platform layer may force on every rank.
CPU_KVCACHE_GIB_DEFAULT = "1"


@dataclass(frozen=True)
class Platform:
    """What the rest of dpserve needs to know about the accelerator."""

    name: str  # "npu" | "cuda" | "cpu"
    device_type: str  # torch device type
    ray_resource: str  # resource a DP-rank bundle asks for ("NPU", "GPU" or "CPU")
    dist_backend: str  # torch.distributed backend for device tensors
    visible_devices_env: str | None  # per-rank visible-device variable (None on CPU)
    has_streams: bool  # whether side streams exist for overlap
    async_scheduling: bool  # whether vLLM's async scheduler is used by default
    vllm_env: dict[str, str] = field(default_factory=dict)  # defaults for vLLM processes
    engine_defaults: dict[str, object] = field(default_factory=dict)  # vLLM engine-arg defaults

    def rank_env(
        self,
        rank: int,
        device_ids: list[int] | None = None,
        cpu_cores: list[int] | None = None,
        omp_threads: int | None = None,
    ) -> dict[str, str]:
        """Environment for one DP rank: vLLM defaults plus the rank's devices (or CPU cores and
        OpenMP thread count: default one per core in `cpu_cores`)."""
        env = dict(self.vllm_env)
        if self.visible_devices_env and device_ids is not None:
            env[self.visible_devices_env] = ",".join(str(d) for d in device_ids)
        if self.name == "cpu" and cpu_cores:
            # Pin each rank's OpenMP threads to its own cores: two engines sharing cores thrash.
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpu_cores)
            # The rank's model runs in its engine-core process (uniprocess executor), which takes
            # its OpenMP team size from here; Ray would otherwise have set 1 for a fractional-CPU
            # actor without saying so.
            env["OMP_NUM_THREADS"] = str(omp_threads or len(cpu_cores))
        return env


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available() and torch.npu.device_count() > 0)  # type: ignore[attr-defined]
    except Exception:
        return False


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:
        return False


NPU = Platform(
    name="npu",
    device_type="npu",
    ray_resource="NPU",
    dist_backend="hccl",
    visible_devices_env="ASCEND_RT_VISIBLE_DEVICES",
    has_streams=True,
    async_scheduling=True,
    vllm_env={},
)

CUDA = Platform(
    name="cuda",
    device_type="cuda",
    ray_resource="GPU",
    dist_backend="nccl",
    visible_devices_env="CUDA_VISIBLE_DEVICES",
    has_streams=True,
    async_scheduling=True,
    vllm_env={},
)

CPU = Platform(
    name="cpu",
    device_type="cpu",
    ray_resource="CPU",
    dist_backend="gloo",
    visible_devices_env=None,
    has_streams=False,
    async_scheduling=False,
    vllm_env={
        # Without a KV-cache size vLLM's CPU start-up fails its memory check.
        "VLLM_CPU_KVCACHE_SPACE": CPU_KVCACHE_GIB_DEFAULT,
        # Ranks share a machine: do not reserve a core per engine.
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # Keep all traffic on loopback on a one-machine setup. A rank in a Ray cluster replaces it
        # with its node's address (deployments.rank: host_network_env) when the node is not loopback.
        "VLLM_HOST_IP": "127.0.0.1",
    },
    # Eager mode starts in ~6 s instead of ~50 s (no torch.compile warm-up) with identical outputs.
    engine_defaults={"enforce_eager": True, "dtype": "float32"},
)

_BY_NAME = {p.name: p for p in (NPU, CUDA, CPU)}


@lru_cache(maxsize=1)
def detect() -> Platform:
    """Return the platform of this process: npu if torch_npu sees a device, else cuda, else cpu.

    `DPSERVE_PLATFORM=npu|cuda|cpu` overrides detection (for tests and heterogeneous clusters).
    """
    forced = os.environ.get("DPSERVE_PLATFORM")
    if forced:
        if forced not in _BY_NAME:
            raise ValueError(f"DPSERVE_PLATFORM={forced!r}: expected one of {sorted(_BY_NAME)}")
        return _BY_NAME[forced]
    if _npu_available():
        return NPU
    if _cuda_available():
        return CUDA
    return CPU


def by_name(name: str) -> Platform:
    """Look a platform up by name ("npu", "cuda", "cpu")."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown platform {name!r}: expected one of {sorted(_BY_NAME)}") from None


def interface_for_ip(ip: str) -> str | None:
    """Name of the network interface holding IPv4 address `ip` on this host (None if none does).

    Gloo, tensorpipe and HCCL pick their NIC by name (`*_SOCKET_IFNAME`); left unset, gloo resolves
    the hostname, which on a multi-homed node (or inside a network namespace) can give an address
    other ranks cannot reach, or loopback.
    """
    if ipaddress.ip_address(ip).is_loopback:
        return "lo"
    import psutil  # a Ray dependency: present wherever ranks run

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def host_network_env(platform: Platform, node_ip: str) -> dict[str, str]:
    """What a rank on the node with address `node_ip` advertises to other ranks, and on which NIC:
    the same variables ray_configs/cluster-ascend.yaml exports per node, derived instead of typed."""
    env = {"VLLM_HOST_IP": node_ip}
    ifname = interface_for_ip(node_ip)
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = ifname
        env["TP_SOCKET_IFNAME"] = ifname
    if platform.name == "npu":
        env["HCCL_IF_IP"] = node_ip
        if ifname:
            env["HCCL_SOCKET_IFNAME"] = ifname
    return env


def is_loopback_value(key: str, value: str) -> bool:
    """Whether an inherited network variable points at loopback (only valid on a one-host setup)."""
    if key.endswith("_IFNAME"):
        return value == "lo"
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


def apply_vllm_env(platform: Platform | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the platform's vLLM defaults in `env` (os.environ by default) without overriding user values."""
    platform = platform or detect()
    target = os.environ if env is None else env
    applied = {}
    for key, value in platform.vllm_env.items():
        if key not in target:
            target[key] = value
            applied[key] = value
    return applied
