"""A rank's process environment: its CPU cores or devices, OpenMP threads, and network identity.

It must be in place before vLLM is imported in the rank's process (the engine core inherits it).
First of all, the rank checks that its node can run the group's platform (`require_platform_here`).
"""

from __future__ import annotations

import logging
import os
import socket

from deployments.config import EngineSettings
from npu_runtime.platform import Platform

logger = logging.getLogger("dpserve.rank")

NETWORK_KEYS = ("VLLM_HOST_IP", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_IF_IP", "HCCL_SOCKET_IFNAME")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray: tests, the CLI)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def actor_name() -> str | None:
    """This actor's name (None for an unnamed actor, or outside Ray)."""
    import ray

    return ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None


def node_ip() -> str:
    """Address other ranks use to reach this process (rank 0 hosts the DP handshake)."""
    ip = os.environ.get("VLLM_HOST_IP")
    if ip:
        return ip
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


def this_node_resources() -> dict[str, float] | None:
    """The Ray resources this process's node advertises (None outside Ray)."""
    import ray

    node_id = ray_node_id()
    if node_id is None:
        return None
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return dict(node.get("Resources") or {})
    return {}


def this_node_name() -> str:
    """This node for people: its Ray address (else VLLM_HOST_IP or loopback) and host name."""
    ip = None
    if ray_node_id() is not None:
        import ray

        ip = ray.util.get_node_ip_address()
    return f"{ip or node_ip()} ({socket.gethostname()})"


def require_platform_here(platform: Platform, rank: int | None = None) -> str:
    """Refuse (PlatformUnavailable, naming this node's address and the platform) unless this node
    can run `platform`: a device this process sees, or with DPSERVE_DEVICE_FROM_RAY_RESOURCE=1 in
    the node's environment, the node's Ray resource for it (npu_runtime.platform.check_node_runs).
    Returns how it can. cpu runs anywhere (no Ray call)."""
    from npu_runtime.platform import check_node_runs

    if platform.name == "cpu":
        return "cpu"
    node = this_node_name()
    how = check_node_runs(platform, node, this_node_resources())
    logger.info("rank %s: node %s runs platform %s (%s)", rank, node, platform.name, how)
    return how


class RankEnvironment:
    """Sets rank `rank`'s environment in this process when constructed.

    `cpu_cores`: the cores this rank's engine may use on CPU (None: no binding), or else
    `host_slot` = (this rank's index among the ranks on its host, how many there are), from which
    the rank picks its cores on its own host (`cpu_binding`)."""

    def __init__(
        self,
        settings: EngineSettings,
        rank: int,
        platform: Platform,
        cpu_cores: list[int] | None = None,
        host_slot: tuple[int, int] | None = None,
    ) -> None:
        self.settings = settings
        self.rank = rank
        self.platform = platform
        # Before anything: a rank on a node that cannot run the group's platform must not start.
        require_platform_here(platform, rank)
        # Ranks sharing this host (all of them when the caller gave no slot: one host).
        self.ranks_on_host = host_slot[1] if host_slot else settings.data_parallel_size
        if cpu_cores is None and host_slot is not None and platform.name == "cpu":
            from deployments.placement import cpu_cores_for_rank

            cpu_cores = cpu_cores_for_rank(*host_slot, binding=settings.cpu_binding)
        self.cpu_cores = cpu_cores
        self._apply_placement_env()
        self.network_env = self._resolve_network_env()

    def _apply_placement_env(self) -> None:
        # The rank's own placement (cores, devices) always wins; user-set defaults are kept.
        placement_keys = {"VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", self.platform.visible_devices_env}
        rank_env = self.platform.rank_env(
            self.rank, self.device_ids(), self.cpu_cores, self.omp_threads(self.cpu_cores)
        )
        for key, value in rank_env.items():
            if key in placement_keys:
                os.environ[key] = value
            else:
                os.environ.setdefault(key, value)
        if self.settings.engine_nice is not None:  # read by npu_runtime.vllm_plugin in the engine core
            from npu_runtime.vllm_plugin import ENGINE_NICE_ENV

            os.environ.setdefault(ENGINE_NICE_ENV, str(self.settings.engine_nice))

    def _resolve_network_env(self) -> dict[str, str]:
        """Point vLLM (VLLM_HOST_IP) and gloo/tensorpipe/HCCL (*_SOCKET_IFNAME, HCCL_IF_IP) at this
        Ray node's own address and the NIC holding it; returns what is in effect.

        Only inside Ray (outside, the platform's loopback defaults stay). An operator's value is kept
        unless it points at loopback while the node does not (the CPU platform default, or a node
        env copied from a one-host setup): advertised across hosts, loopback makes the DP handshake
        or the first gloo collective hang."""
        from npu_runtime.platform import host_network_env, is_loopback_value

        try:
            import ray

            if not ray.is_initialized():
                return {}
            ip = ray.util.get_node_ip_address()
        except Exception:
            return {}
        node_is_loopback = is_loopback_value("VLLM_HOST_IP", ip)
        for key, value in host_network_env(self.platform, ip).items():
            current = os.environ.get(key)
            if current is None or (is_loopback_value(key, current) and not node_is_loopback):
                if current is not None and current != value:
                    logger.warning("rank %d: %s=%s is loopback on node %s; using %s", self.rank, key,
                                   current, ip, value)  # fmt: skip
                os.environ[key] = value
        return {k: os.environ[k] for k in NETWORK_KEYS if k in os.environ}

    def omp_threads(self, cpu_cores: list[int] | None) -> int | None:
        """OpenMP threads for this rank's model on CPU with `shared` binding: its share of the cores
        the ranks on its host share (more threads than cores make OpenMP's barriers spin against
        each other). None otherwise: `rank_env`'s default, one thread per core the rank owns."""
        if not cpu_cores or self.settings.cpu_binding != "shared":
            return None
        return max(1, len(cpu_cores) // max(1, self.ranks_on_host))

    def device_ids(self) -> list[int] | None:
        if not self.platform.visible_devices_env:
            return None
        try:
            import ray

            ids = ray.get_runtime_context().get_accelerator_ids().get(self.platform.ray_resource, [])
            return [int(i) for i in ids] or None
        except Exception:
            return None
