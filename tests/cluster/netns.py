"""A multi-host Ray cluster on one machine: one Linux network namespace per test host.

Each test host is a network namespace holding a veth end with its own address on a private test subnet
(10.77.0.0/24 by default) plus its own loopback; the other veth ends sit on a bridge in the root
namespace, which gets the subnet's .254 address so a driver in the root namespace (pytest) can reach
the hosts. Ray runs inside the namespaces (`ray start --node-ip-address <host ip>`), so every Ray,
vLLM, gloo and HTTP connection between "hosts" crosses the veth links: a host is cut off by setting
its link down (`link_down`), exactly like a pulled cable.

Why namespaces and not several `ray start` on loopback: on loopback every process shares one
address, so bugs that only show across hosts (a rank advertising 127.0.0.1, gloo picking the wrong
interface, placement not spreading) stay hidden.

Safety on a shared machine: namespaces give each host its own port space, so Ray's default ports do
not collide with other Ray instances on the machine; every host has its own `--temp-dir`. Teardown
never runs `ray stop` (it kills every Ray process on the machine, whoever started it): it kills
exactly the processes inside this cluster's namespaces (`ip netns pids`), then deletes the
namespaces, veths and bridge. Requires root (CAP_NET_ADMIN).

    with NetnsCluster(num_hosts=2, resources={"dpserve_host": 1}) as cluster:
        cluster.start_ray()
        cluster.run_python(0, "import ray; ray.init(); print(ray.nodes())")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("dpserve.netns")

REPO_ROOT = Path(__file__).resolve().parents[2]
# Variables the harness never passes to the hosts: whatever the host's network identity is must be
# derived on the host by the product code (that is what the multi-host test checks).
HOST_NETWORK_VARS = (
    "VLLM_HOST_IP",
    "GLOO_SOCKET_IFNAME",
    "TP_SOCKET_IFNAME",
    "HCCL_IF_IP",
    "HCCL_SOCKET_IFNAME",
    "RAY_ADDRESS",
)
HOST_IFNAME = "dps0"  # the test NIC's name inside every namespace (names are per namespace)
# Custom resources the dpserve tests declare: one HOST_RESOURCE per host (stands in for a node's
# NPUs: rank bundles ask for it), HEAD_RESOURCE on the head only (pins the Serve ingress there).
HOST_RESOURCE = "dpserve_host"
HEAD_RESOURCE = "dpserve_head"
RAY_PORT = 6379  # per-namespace port space: the default cannot collide with root-namespace Ray
# Faster node-death detection than Ray's defaults (~30 s+), so a cut link is noticed in ~6 s.
HEAD_SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 2000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 5,
}


def json_result(stdout: str) -> Any:
    """The last line of a driver's stdout that is a JSON list or object: what the driver printed. Ray
    streams its processes' logs to the driver's stdout, so lines can follow it (e.g. the backtrace a
    raylet prints when it exits after its node was declared dead)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, (list, dict)):
            return value
    raise ValueError(f"no JSON list or object in the driver's output: {stdout[-2000:]!r}")


def _sh(
    args: Sequence[str], check: bool = True, timeout: float = 30.0, **kw: Any
) -> subprocess.CompletedProcess:
    """Run one command (no shell); output captured for error messages."""
    return subprocess.run(list(args), check=check, timeout=timeout, capture_output=True, text=True, **kw)


def tcp_reachable(ip: str, port: int = 9, timeout_s: float = 1.0) -> bool:
    """Whether `ip` answers at all (no `ping` on minimal images): a TCP connect to a closed port is
    refused (reachable) or times out (unreachable)."""
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


@dataclass
class NetnsHost:
    """One test host: a network namespace with one veth NIC on the test subnet."""

    index: int
    netns: str  # namespace name
    ip: str  # the host's address on the test subnet
    veth_root: str  # root-namespace end of the host's link (on the bridge)
    temp_dir: str  # this host's Ray --temp-dir
    ray_started: bool = False

    def cmd(self, args: Sequence[str]) -> list[str]:
        """`args` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *args]

    def pids(self) -> list[int]:
        """Processes inside this namespace (all of them were started by this harness)."""
        out = _sh(["ip", "netns", "pids", self.netns], check=False).stdout
        return [int(p) for p in out.split() if p.strip().isdigit()]


@dataclass
class NetnsCluster:
    """N test hosts on a bridged private subnet, optionally running a Ray cluster (host 0 = head).

    `resources`: custom Ray resources every host declares (its share of the platform resource; on
    CPU a custom resource such as {"dpserve_host": 1} stands in for NPUs). `head_resources` are
    declared by the head only (e.g. to pin the Serve ingress there), `worker_resources` by every
    host but the head (e.g. {"NPU": 1}: accelerator hosts behind a head without any). `env`: extra
    environment for every host's Ray processes (and so every worker and actor there).
    """

    num_hosts: int = 2
    subnet: str = "10.77.0"  # /24; host i gets .(i+1), the root-namespace bridge .254
    resources: dict[str, float] = field(default_factory=dict)
    head_resources: dict[str, float] = field(default_factory=dict)
    worker_resources: dict[str, float] = field(default_factory=dict)
    num_cpus: int = 4  # logical CPUs per host (actors mostly wait; the machine's cores are shared)
    object_store_bytes: int = 150 * 1024**2
    env: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])  # keeps names unique per harness
    keep_logs: bool = False
    hosts: list[NetnsHost] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.num_hosts <= 8:
            raise ValueError("num_hosts must be in 1..8")
        self.bridge = f"dpsbr{self.tag}"  # <= 15 characters (IFNAMSIZ)
        self.root_dir = tempfile.mkdtemp(prefix=f"dpsn{self.tag}_", dir="/tmp")  # short: Ray socket paths
        self.hosts = [
            NetnsHost(
                i,
                f"dpsn{self.tag}h{i}",
                f"{self.subnet}.{i + 1}",
                f"dpsv{self.tag}h{i}",
                os.path.join(self.root_dir, f"h{i}"),
            )  # fmt: skip
            for i in range(self.num_hosts)
        ]
        self._created: list[tuple[str, str]] = []  # ("netns"|"link", name) for teardown

    # ---- addresses -------------------------------------------------------------------------------
    @property
    def head(self) -> NetnsHost:
        return self.hosts[0]

    @property
    def ray_address(self) -> str:
        return f"{self.head.ip}:{RAY_PORT}"

    @property
    def root_ip(self) -> str:
        """The root namespace's (driver's) address on the test subnet."""
        return f"{self.subnet}.254"

    # ---- network ---------------------------------------------------------------------------------
    def create_network(self) -> None:
        """Bridge + one namespace and veth pair per host; every link up, loopback up in each host."""
        _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._created.append(("link", self.bridge))
        _sh(["ip", "addr", "add", f"{self.root_ip}/24", "dev", self.bridge])
        _sh(["ip", "link", "set", self.bridge, "up"])
        for h in self.hosts:
            _sh(["ip", "netns", "add", h.netns])
            self._created.append(("netns", h.netns))
            peer = f"dpsp{self.tag}h{h.index}"
            _sh(["ip", "link", "add", h.veth_root, "type", "veth", "peer", "name", peer])
            self._created.append(("link", h.veth_root))
            _sh(["ip", "link", "set", peer, "netns", h.netns])
            _sh(h.cmd(["ip", "link", "set", peer, "name", HOST_IFNAME]))
            _sh(h.cmd(["ip", "addr", "add", f"{h.ip}/24", "dev", HOST_IFNAME]))
            _sh(h.cmd(["ip", "link", "set", HOST_IFNAME, "up"]))
            _sh(h.cmd(["ip", "link", "set", "lo", "up"]))
            _sh(["ip", "link", "set", h.veth_root, "master", self.bridge])
            _sh(["ip", "link", "set", h.veth_root, "up"])
        for h in self.hosts:  # the subnet works before anything relies on it
            self.wait_reachable(h, timeout_s=10)

    def wait_reachable(self, host: NetnsHost, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if tcp_reachable(host.ip):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"test host {host.netns} ({host.ip}) is not reachable")
            time.sleep(0.2)

    def link_down(self, index: int) -> None:
        """Cut host `index` off the subnet (its cable pulled); its processes keep running."""
        _sh(["ip", "link", "set", self.hosts[index].veth_root, "down"])

    def link_up(self, index: int) -> None:
        _sh(["ip", "link", "set", self.hosts[index].veth_root, "up"])
        self.wait_reachable(self.hosts[index], timeout_s=15)

    # ---- Ray -------------------------------------------------------------------------------------
    def host_env(self, host: NetnsHost) -> dict[str, str]:
        """Environment of a host's Ray processes: ours minus any network identity (see HOST_NETWORK_VARS)."""
        env = {k: v for k, v in os.environ.items() if k not in HOST_NETWORK_VARS}
        env.update(self.env)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # `ray start` turns token auth on by itself when ~/.ray/auth_token exists (someone else's
        # local Ray may have made one), while drivers do not: explicit on every process. The test
        # subnet is private to this machine's namespaces.
        env.setdefault("RAY_AUTH_MODE", "disabled")
        # The repository on the path even if the package is not installed in this interpreter.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def _ray_bin(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    def start_ray_on(self, index: int, timeout_s: float = 120.0) -> None:
        """`ray start` inside host `index` (the head for 0, a worker joining the head otherwise)."""
        h = self.hosts[index]
        os.makedirs(h.temp_dir, exist_ok=True)
        resources = dict(self.resources)
        resources.update(self.head_resources if index == 0 else self.worker_resources)
        args = [self._ray_bin(), "start", f"--node-ip-address={h.ip}", f"--num-cpus={self.num_cpus}",
                f"--resources={json.dumps(resources)}", f"--temp-dir={h.temp_dir}",
                f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats"]  # fmt: skip
        if index == 0:
            args += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false",
                     f"--system-config={json.dumps(HEAD_SYSTEM_CONFIG)}"]  # fmt: skip
        else:
            args += [f"--address={self.ray_address}"]
        res = _sh(h.cmd(args), check=False, timeout=timeout_s, env=self.host_env(h), cwd=str(REPO_ROOT))
        h.ray_started = True  # even on failure: some daemons may be up and must be torn down
        if res.returncode != 0:
            raise RuntimeError(f"ray start on {h.netns} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")

    def start_ray(self, timeout_s: float = 180.0) -> None:
        """Head on host 0, then every other host as a worker; returns once all nodes are alive."""
        for i in range(self.num_hosts):
            self.start_ray_on(i)
        self.wait_nodes(self.num_hosts, timeout_s)

    def wait_nodes(self, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Wait until `count` Ray nodes are alive; returns their (ip, resources)."""
        code = "import json, ray; ray.init(); print(json.dumps([{'ip': n['NodeManagerAddress'], " \
               "'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"  # fmt: skip
        deadline = time.monotonic() + timeout_s
        nodes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            res = self.run_python(0, code, timeout_s=60, check=False)
            if res.returncode == 0:
                nodes = json_result(res.stdout)
                if len(nodes) >= count:
                    return nodes
            time.sleep(1)
        raise TimeoutError(f"{len(nodes)} of {count} Ray nodes alive after {timeout_s:.0f} s: {nodes}")

    def stop_ray_on(self, index: int, grace_s: float = 8.0) -> None:
        """Kill every process inside host `index` (see `stop_hosts`)."""
        self.stop_hosts([index], grace_s)

    def stop_hosts(self, indices: Sequence[int], grace_s: float = 8.0) -> None:
        """Kill every process inside the given hosts, all hosts at once: SIGTERM, then SIGKILL after
        `grace_s`; bounded by about grace_s + 5 s whatever the processes do.

        Not `ray stop`: that matches Ray processes by name machine-wide, other people's included."""
        hosts = [self.hosts[i] for i in indices]
        pids = {h.netns: h.pids() for h in hosts}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in (p for ps in pids.values() for p in ps):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
            while any(pids.values()) and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = {h.netns: h.pids() for h in hosts}
            if not any(pids.values()):
                break
        for netns, left in pids.items():
            if left:
                logger.error("processes %s in %s survived SIGKILL", left, netns)
        for h in hosts:
            h.ray_started = False

    # ---- running things on a host ---------------------------------------------------------------
    def run_python(self, index: int, code: str, timeout_s: float = 600.0, check: bool = True,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """Run a Python snippet inside host `index` (a Ray driver there: `ray.init()` finds the node)."""
        h = self.hosts[index]
        full_env = self.host_env(h) | {"RAY_ADDRESS": self.ray_address} | (env or {})
        res = _sh(h.cmd([sys.executable, "-c", code]), check=False, timeout=timeout_s, env=full_env,
                  cwd=str(REPO_ROOT))  # fmt: skip
        if check and res.returncode != 0:
            raise RuntimeError(f"python on {h.netns} failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                               f"{res.stderr[-5000:]}")  # fmt: skip
        return res

    # ---- lifecycle -------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Bounded (~15 s worst case) and safe to call more than once, after any failure."""
        try:
            self.stop_hosts([h.index for h in self.hosts if h.pids()])
        except Exception:
            logger.exception("stopping the test hosts' processes failed")
        for kind, name in reversed(self._created):
            try:
                if kind == "netns":
                    _sh(["ip", "netns", "delete", name], check=False)
                else:
                    _sh(["ip", "link", "delete", name], check=False)
            except Exception:
                logger.exception("deleting %s %s failed", kind, name)
        self._created.clear()
        if not self.keep_logs:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    def __enter__(self) -> NetnsCluster:
        try:
            self.create_network()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def netns_supported() -> str | None:
    """None when this machine can run the harness, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"dpsprobe{uuid.uuid4().hex[:6]}"
    res = _sh(["ip", "netns", "add", probe], check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    _sh(["ip", "netns", "delete", probe], check=False)
    return None


@contextmanager
def netns_cluster(num_hosts: int = 2, start_ray: bool = True, **kwargs: Any) -> Iterator[NetnsCluster]:
    """A NetnsCluster with Ray running on every host; everything removed on exit."""
    with NetnsCluster(num_hosts=num_hosts, **kwargs) as cluster:
        if start_ray:
            cluster.start_ray()
        yield cluster


def cleanup_stale(prefix: str = "dpsn") -> list[str]:
    """Remove namespaces/links a killed harness left behind (names start with `prefix`/dpsbr/dpsv)."""
    removed = []
    for name in _sh(["ip", "netns", "list"], check=False).stdout.split():
        if name.startswith(prefix):
            for pid in _sh(["ip", "netns", "pids", name], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _sh(["ip", "netns", "delete", name], check=False)
            removed.append(name)
    return removed
