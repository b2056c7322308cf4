"""The cluster manifests in ray_configs/: `ray up` YAMLs and the KubeRay RayService.

`ray up` manifests go through Ray's own config pipeline, the one `ray up` runs before it touches a
node (``ray.autoscaler._private.commands._bootstrap_config``: prepare_config -> provider
checks -> validate_config against ray-schema.json), and through dpserve's own rules (NPU resources,
network variables, ASCEND_RT_VISIBLE_DEVICES never set node-wide). The node environment script the
Ascend manifest writes is executed here, on the loopback interface.

The KubeRay manifest's serveConfigV2 is validated with Ray Serve's own schema (ServeDeploySchema).
Every validator also gets a broken manifest to prove that it fails.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import click
import jsonschema
import pydantic
import pytest
import yaml
from ray.autoscaler._private.command_runner import _with_interactive
from ray.autoscaler._private.commands import _bootstrap_config
from ray.serve.schema import ServeDeploySchema

REPO = Path(__file__).resolve().parents[2]
RAY_CONFIGS = REPO / "ray_configs"
CLUSTER_MANIFESTS = sorted(RAY_CONFIGS.glob("cluster-*.yaml"))
ASCEND = RAY_CONFIGS / "cluster-ascend.yaml"
LOCAL = RAY_CONFIGS / "cluster-local.yaml"
KUBERAY = RAY_CONFIGS / "kuberay-rayservice.yaml"

NETWORK_VARS = ("HCCL_IF_IP", "HCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "VLLM_HOST_IP")
ENV_FILE = "dpserve-node-env.sh"
VLLM_RELEASE = "v0.23.0"  # the vLLM that vllm-ascend 0.23.0.post1 runs
APP_IMPORT_PATH = "deployments.app:build_app"
APP_ARGS = {"engine", "balance"}  # the sections of deployments.config.DPServeConfig the manifest sets


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does with a manifest before it contacts any node; returns the resolved config."""
    return _bootstrap_config(copy.deepcopy(config), no_config_cache=True)


def all_commands(config: dict) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [cmd for key in keys for cmd in config.get(key, [])]


def ray_start_args(cmd: str) -> list[str] | None:
    """The arguments of the `ray start` in a start command (None if it has none)."""
    tokens = shlex.split(cmd)
    for i in range(len(tokens) - 1):
        if tokens[i].endswith("ray") and tokens[i + 1] == "start":
            return tokens[i + 2 :]
    return None


def option(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------- ray up manifests


def test_there_are_cluster_manifests():
    assert ASCEND in CLUSTER_MANIFESTS and LOCAL in CLUSTER_MANIFESTS


@pytest.mark.parametrize("path", CLUSTER_MANIFESTS, ids=lambda p: p.name)
def test_ray_up_accepts_manifest(path):
    config = load(path)
    resolved = ray_up_validate(config)
    assert resolved["provider"]["type"] == "local"
    # The local provider folds head + workers into its one internal node type.
    assert set(resolved["available_node_types"]) == {"local.cluster.node"}
    assert resolved["max_workers"] == len(config["provider"]["worker_ips"])


@pytest.mark.parametrize("path", CLUSTER_MANIFESTS, ids=lambda p: p.name)
def test_every_command_is_valid_bash_as_ray_runs_it(path):
    # Ray runs each command as `bash --login -c -i 'source ~/.bashrc; ... && (<cmd>)'` over SSH.
    for cmd in all_commands(load(path)):
        wrapped = " ".join(_with_interactive(cmd))
        result = subprocess.run(["bash", "-n", "-c", wrapped], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r}: {result.stderr}"


@pytest.mark.parametrize("path", CLUSTER_MANIFESTS, ids=lambda p: p.name)
def test_head_starts_ray_with_the_bootstrap_config(path):
    config = load(path)
    starts = [args for cmd in config["head_start_ray_commands"] if (args := ray_start_args(cmd)) is not None]
    assert len(starts) == 1
    assert "--head" in starts[0]
    # `ray up` uploads the resolved manifest there; without it the head runs no autoscaler monitor.
    assert option(starts[0], "--autoscaling-config") == "~/ray_bootstrap_config.yaml"


def test_broken_manifest_missing_head_ip_is_rejected():
    config = load(ASCEND)
    del config["provider"]["head_ip"]
    with pytest.raises(click.ClickException):
        ray_up_validate(config)


def test_broken_manifest_unknown_key_is_rejected():
    config = load(ASCEND)
    config["setup_command"] = config.pop("setup_commands")  # typo: Ray would silently skip the installs
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        ray_up_validate(config)


def test_broken_manifest_wrong_type_is_rejected():
    config = load(ASCEND)
    config["head_start_ray_commands"] = "ray start --head"  # a string, not a list of commands
    with pytest.raises(jsonschema.ValidationError):
        ray_up_validate(config)


def test_node_types_are_rejected_by_the_local_provider():
    """Why NPUs are declared with `ray start --resources` and not with available_node_types."""
    config = load(ASCEND)
    config["available_node_types"] = {"ascend": {"node_config": {}, "resources": {"NPU": 8}}}
    config["head_node_type"] = "ascend"
    with pytest.raises(click.ClickException):
        ray_up_validate(config)


# ----------------------------------------------------------------------------- Ascend specifics


def test_ascend_nodes_declare_the_same_npu_count():
    config = load(ASCEND)
    counts = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [args for cmd in config[key] if (args := ray_start_args(cmd)) is not None]
        assert len(starts) == 1, key
        resources = json.loads(option(starts[0], "--resources"))
        assert isinstance(resources.get("NPU"), int) and resources["NPU"] > 0, resources
        counts.append(resources["NPU"])
    assert len(set(counts)) == 1


def test_ascend_ray_starts_inside_the_node_environment():
    config = load(ASCEND)
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        # Every start-phase command runs `ray` from the venv the env file activates.
        assert cmd.startswith(f"source ~/{ENV_FILE} &&"), cmd
        args = ray_start_args(cmd)
        if args is not None:
            # Ray binds to the same address HCCL/Gloo/vLLM use.
            assert option(args, "--node-ip-address") == "$DPSERVE_NODE_IP"


def test_ascend_setup_installs_the_targeted_releases():
    commands = "\n".join(load(ASCEND)["setup_commands"])
    assert (
        "dpserve[ascend]" in commands
    )  # vllm-ascend, torch and torch-npu (tests/ray_configs/test_ascend_extra.py)
    repo = "vllm-project/vllm.git"
    assert re.search(rf"--branch {re.escape(VLLM_RELEASE)} \S*{re.escape(repo)}", commands), repo
    assert "vllm-ascend.git" not in commands
    assert "VLLM_TARGET_DEVICE=empty" in commands


@pytest.mark.parametrize("path", [*CLUSTER_MANIFESTS, KUBERAY], ids=lambda p: p.name)
def test_ascend_visible_devices_never_set_node_wide(path):
    text = "\n".join(all_commands(load(path))) if path != KUBERAY else KUBERAY.read_text()
    assert not re.search(r"ASCEND_RT_VISIBLE_DEVICES\s*=", text)
    assert not re.search(r"name:\s*ASCEND_RT_VISIBLE_DEVICES", text)


def _write_node_env(home: Path) -> Path:
    """Run the setup command that writes the node env file, the way Ray runs it, with HOME=home."""
    writers = [cmd for cmd in load(ASCEND)["setup_commands"] if f"> ~/{ENV_FILE}" in cmd]
    assert len(writers) == 1
    subprocess.run(
        " ".join(_with_interactive(writers[0])),
        shell=True,
        check=True,
        env={"HOME": str(home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return home / ENV_FILE


def _source_node_env(home: Path, ifname: str) -> subprocess.CompletedProcess:
    env = {
        "HOME": str(home),
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DPSERVE_IFNAME": ifname,
        # Both must be gone after sourcing: Ray has to assign NPUs per actor.
        "ASCEND_RT_VISIBLE_DEVICES": "0,1",
        "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "1",
    }
    return subprocess.run(
        ["bash", "-c", f"source ~/{ENV_FILE} && env -0"], env=env, capture_output=True, text=True
    )


def test_node_env_derives_the_network_variables_from_the_interface(tmp_path):
    _write_node_env(tmp_path)
    result = _source_node_env(tmp_path, "lo")
    assert result.returncode == 0, result.stderr
    env = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    assert env["DPSERVE_NODE_IP"] == "127.0.0.1"
    assert env["HCCL_IF_IP"] == env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["HCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == env["TP_SOCKET_IFNAME"] == "lo"
    assert "ASCEND_RT_VISIBLE_DEVICES" not in env
    assert "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES" not in env


def test_node_env_fails_loudly_on_a_wrong_interface(tmp_path):
    _write_node_env(tmp_path)
    result = _source_node_env(tmp_path, "nosuchnic0")
    assert result.returncode != 0
    assert "no IPv4 address on interface 'nosuchnic0'" in result.stderr


# ----------------------------------------------------------------------------- local trial


def test_local_trial_is_one_loopback_node_with_spare_logical_cpus():
    config = load(LOCAL)
    assert config["provider"]["head_ip"] == "127.0.0.1"
    assert config["provider"]["worker_ips"] == []
    (args,) = [a for cmd in config["head_start_ray_commands"] if (a := ray_start_args(cmd)) is not None]
    assert option(args, "--node-ip-address") == "127.0.0.1"
    assert option(args, "--dashboard-host") == "127.0.0.1"
    # The logical-CPU trap: 2 logical CPUs starve the Serve ingress next to the engine replicas.
    assert int(option(args, "--num-cpus")) > 2


# ----------------------------------------------------------------------------- KubeRay RayService


def serve_config(manifest: dict) -> dict:
    raw = manifest["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 is a YAML string in the RayService CRD"
    return yaml.safe_load(raw)


def npu_resources(group: dict) -> dict:
    """rayStartParams.resources: a JSON object inside a quoted string, as KubeRay passes it to ray start."""
    raw = group["rayStartParams"]["resources"]
    return json.loads(json.loads(raw))


def test_kuberay_manifest_kind():
    manifest = load(KUBERAY)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"]
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"]


def test_kuberay_serve_config_passes_ray_serve_schema():
    config = ServeDeploySchema.model_validate(serve_config(load(KUBERAY)))
    (app,) = config.applications
    assert app.import_path == APP_IMPORT_PATH
    assert set(app.args) == APP_ARGS


def test_kuberay_app_args_match_the_code():
    from scheduler.policy import POLICIES as GATE_POLICIES

    config = serve_config(load(KUBERAY))
    args = config["applications"][0]["args"]
    assert args["balance"] == {"policy": "bounded_hold"} and args["balance"]["policy"] in GATE_POLICIES
    assert "eplb" not in args  # off until the applier has run on NPUs, as in serve-ascend.yaml
    assert args["engine"]["enable_expert_parallel"] is True


def test_kuberay_npu_workers_are_consistent():
    manifest = load(KUBERAY)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert "resources" not in cluster["headGroupSpec"]["rayStartParams"]  # no ranks on the head
    total_npus = 0
    for group in cluster["workerGroupSpecs"]:
        npus = npu_resources(group)["NPU"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        (chip_key,) = [k for k in limits if k.startswith("huawei.com/Ascend")]
        assert limits[chip_key] == npus, "Ray's NPU count must equal the chips the pod gets"
        env = {e["name"]: e for e in container["env"]}
        for var in NETWORK_VARS:
            assert var in env, var
        assert env["HCCL_IF_IP"]["value"] == env["VLLM_HOST_IP"]["value"] == "$(POD_IP)"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        total_npus += group["replicas"] * npus
    args = serve_config(manifest)["applications"][0]["args"]
    assert args["engine"]["data_parallel_size"] == total_npus, "one DP rank per NPU"


def test_broken_serve_config_missing_import_path_is_rejected():
    config = serve_config(load(KUBERAY))
    del config["applications"][0]["import_path"]
    with pytest.raises(pydantic.ValidationError, match="import_path"):
        ServeDeploySchema.model_validate(config)


def test_broken_serve_config_bad_import_path_is_rejected():
    config = serve_config(load(KUBERAY))
    config["applications"][0]["import_path"] = "deployments.app:build_app:extra"
    with pytest.raises(pydantic.ValidationError, match="at most one colon"):
        ServeDeploySchema.model_validate(config)


def test_broken_serve_config_duplicate_apps_are_rejected():
    config = serve_config(load(KUBERAY))
    config["applications"].append(copy.deepcopy(config["applications"][0]))
    with pytest.raises(pydantic.ValidationError):
        ServeDeploySchema.model_validate(config)


def test_broken_ray_start_resources_quoting_is_detected():
    manifest = load(KUBERAY)
    group = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParams"]["resources"] = '{"NPU": 8}'  # unquoted: KubeRay mangles it on the command line
    with pytest.raises((json.JSONDecodeError, TypeError)):
        npu_resources(group)
