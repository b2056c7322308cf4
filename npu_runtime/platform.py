"""Platform detection: the one place that knows whether we run on Ascend NPU, NVIDIA GPU or CPU.

Everything platform-specific (device type, Ray resource, collective backend, visible-device variable,
vLLM environment defaults) is answered here, so the rest of the code base never branches on the
platform by itself. Order everywhere is npu -> cuda -> cpu.

Two questions, answered in two places:

- Which platform a DP group runs on is decided where the group is started, from the whole cluster
  (`choose_platform`: the config's `engine.platform`, else `DPSERVE_PLATFORM`, else the cluster's
  Ray resources, `platform_for_cluster`), not from the devices of the process deciding it: the
  ingress may sit on a head node without accelerators.
- Whether a node can run it is checked by each rank on its own node (`check_node_runs`): local
  devices, or with `DPSERVE_DEVICE_FROM_RAY_RESOURCE=1` in the node's environment, the node's Ray
  resource for the platform (`NPU`, `GPU`) counts as the device without torch-npu / CUDA (test hosts).

`detect()` is this process's own platform (local devices), for what runs in one process.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
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


PLATFORM_ENV = "DPSERVE_PLATFORM"
# In a node's environment (`ray start`'s, so every rank there has it): that node's Ray resource for
# the platform (e.g. a custom `NPU` resource) counts as the device, without torch-npu or CUDA.
DEVICE_FROM_RAY_RESOURCE_ENV = "DPSERVE_DEVICE_FROM_RAY_RESOURCE"
_TRUE = ("1", "true", "yes", "on")


class PlatformUnavailable(RuntimeError):
    """A rank landed on a node that cannot run the group's platform."""


def platform_override(env: Mapping[str, str] | None = None) -> Platform | None:
    """The platform `DPSERVE_PLATFORM=npu|cuda|cpu` forces (None when unset)."""
    forced = (os.environ if env is None else env).get(PLATFORM_ENV)
    if not forced:
        return None
    if forced not in _BY_NAME:
        raise ValueError(f"{PLATFORM_ENV}={forced!r}: expected one of {sorted(_BY_NAME)}")
    return _BY_NAME[forced]


@lru_cache(maxsize=1)
def detect() -> Platform:
    """Return the platform of this process: npu if torch_npu sees a device, else cuda, else cpu.

    `DPSERVE_PLATFORM=npu|cuda|cpu` overrides detection (for tests and heterogeneous clusters).
    Where a DP group's platform is decided, `choose_platform` is used instead (the cluster's resources).
    """
    forced = platform_override()
    if forced:
        return forced
    if _npu_available():
        return NPU
    if _cuda_available():
        return CUDA
    return CPU


def platform_for_cluster(resources: Mapping[str, float]) -> Platform:
    """The platform a cluster with Ray resources `resources` (`ray.cluster_resources()`) serves on:
    npu if any node advertises `NPU`, else cuda if any advertises `GPU`, else cpu."""
    for platform in (NPU, CUDA):
        if resources.get(platform.ray_resource, 0) > 0:
            return platform
    return CPU


def choose_platform(
    configured: str | None,
    cluster_resources: Callable[[], Mapping[str, float]],
    env: Mapping[str, str] | None = None,
) -> tuple[Platform, str]:
    """A DP group's platform and where the choice came from: `configured` (the config's
    `engine.platform`) when set, else `DPSERVE_PLATFORM` in `env` (this process's environment by
    default), else the cluster's resources (`cluster_resources()`, asked only then)."""
    if configured:
        return by_name(configured), "engine.platform"
    forced = platform_override(env)
    if forced:
        return forced, PLATFORM_ENV
    resources = cluster_resources()
    shown = {k: resources[k] for k in (NPU.ray_resource, CUDA.ray_resource) if resources.get(k, 0) > 0}
    return platform_for_cluster(resources), f"cluster resources {shown or 'without NPU or GPU'}"


def device_from_ray_resource(env: Mapping[str, str] | None = None) -> bool:
    """Whether `DPSERVE_DEVICE_FROM_RAY_RESOURCE` is on (1/true/yes/on)."""
    return (os.environ if env is None else env).get(DEVICE_FROM_RAY_RESOURCE_ENV, "").strip().lower() in _TRUE


def local_devices(platform: Platform) -> bool:
    """Whether this process sees a device of `platform` (always true for cpu)."""
    if platform.name == "npu":
        return _npu_available()
    if platform.name == "cuda":
        return _cuda_available()
    return True


def check_node_runs(
    platform: Platform,
    node: str,
    node_resources: Mapping[str, float] | None = None,
    env: Mapping[str, str] | None = None,
    has_devices: Callable[[Platform], bool] = local_devices,
) -> str:
    """Check that this node (named `node` in the error: its address) can run `platform`; returns
    how (for the log). Raises PlatformUnavailable naming the node and the platform otherwise.

    cpu runs anywhere. An accelerator platform needs a device this process sees (`has_devices`),
    or, with DPSERVE_DEVICE_FROM_RAY_RESOURCE on in `env`, the platform's Ray resource among the
    node's `node_resources` (checked first: no torch import)."""
    if platform.name == "cpu":
        return "cpu"
    resources = node_resources or {}
    amount = resources.get(platform.ray_resource, 0)
    from_resource = device_from_ray_resource(env)
    if from_resource and amount > 0:
        return f"Ray resource {platform.ray_resource}={amount:g} ({DEVICE_FROM_RAY_RESOURCE_ENV})"
    if has_devices(platform):
        return f"{platform.device_type} devices"
    library = "torch_npu" if platform.name == "npu" else "torch.cuda"
    if amount > 0:  # the switch is off: with it on, the resource would have been enough
        why = (f"its Ray resource {platform.ray_resource}={amount:g} counts as the device only with "
               f"{DEVICE_FROM_RAY_RESOURCE_ENV}=1 in the node's environment")  # fmt: skip
    else:
        why = f"and it advertises no Ray resource {platform.ray_resource}"
    raise PlatformUnavailable(
        f"node {node} cannot run platform {platform.name!r}: {library} sees no {platform.device_type} "
        f"device there, {why} (the group's platform comes from engine.platform, {PLATFORM_ENV} or "
        "the cluster's resources)"
    )


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
