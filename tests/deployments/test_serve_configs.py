"""Every serve-*.yaml passes Ray Serve's own schema and builds an application through our builder."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import DPServeConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "ray_configs").glob("serve-*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"serve-local.yaml", "serve-gpu.yaml", "serve-ascend.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_valid(path):
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else (
        ServeDeploySchema.parse_obj(raw))  # fmt: skip
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    config = DPServeConfig.from_args(app.args)  # our own validation of the args
    assert config.engine.data_parallel_size >= 2


def test_local_config_is_the_embedded_default():
    raw = yaml.safe_load((CONFIGS[0].parent / "serve-local.yaml").read_text())
    assert raw["http_options"] == {"host": "127.0.0.1", "port": 8000}
    args = raw["applications"][0]["args"]
    assert args["engine"].get("model") is None and args["engine"]["data_parallel_size"] == 2


def test_local_config_starts_serve_with_dpserves_serve_options():
    """Plain `serve run ray_configs/serve-local.yaml` gets what `dpserve serve` sets (SERVE_ENV)."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.serve_env import SERVE_ENV

    raw = yaml.safe_load((CONFIGS[0].parent / "serve-local.yaml").read_text())
    assert raw["controller_options"]["runtime_env"]["env_vars"] == SERVE_ENV
    ServeDeploySchema.model_validate(raw)  # Serve accepts the block as it is


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="unknown key 'engine.data_parallel_sise'"):
        DPServeConfig.from_args({"engine": {"data_parallel_sise": 2}})
    with pytest.raises(ValueError, match="engine.data_parallel_size"):
        DPServeConfig.from_args({"engine": {"data_parallel_size": 0}})
    with pytest.raises(ValueError, match="engine_nice"):
        DPServeConfig.from_args({"engine": {"engine_nice": 25}})
    assert DPServeConfig.from_args({"engine": {"engine_nice": None}}).engine.engine_nice is None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shutdown_timeouts_are_set(path):
    """Every config states its drain budget, and Serve's own drain outlasts the ingress's."""
    (app,) = yaml.safe_load(path.read_text())["applications"]
    (ingress,) = [d for d in app["deployments"] if d["name"] == "DPServer"]
    drain = DPServeConfig.from_args(app["args"]).serving.drain_timeout_s
    assert "drain_timeout_s" in app["args"]["serving"] and ingress["graceful_shutdown_wait_loop_s"] <= 2
    assert ingress["graceful_shutdown_timeout_s"] >= drain


def commented_block(text: str, key: str) -> dict:
    """The YAML mapping commented out under a `# key:` line (its lines: the same `#` column, indented
    further after it), parsed."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"# {key}:")
    prefix = lines[start][: lines[start].index("#") + 2]
    block = [lines[start][len(prefix) :]]
    for line in lines[start + 1 :]:
        if not line.startswith(prefix + " "):
            break
        block.append(line[len(prefix) :])
    return yaml.safe_load("\n".join(block))


@pytest.mark.parametrize("name", ["serve-gpu.yaml", "serve-ascend.yaml"])
def test_recommended_eplb_block_is_the_studys_paced_cell(name):
    """The commented EPLB block of the GPU/Ascend configs validates, takes one redundant slot per rank,
    and states the settings the simulator's paced cell ran (benchmarks/results/sim_eplb_scaling.md)."""
    from benchmarks.sim_eplb_scaling import PACED_FIRST_PLAN_STEPS
    from cluster.sim.config import TransferConfig
    from eplb.messages import transfer_options

    text = (CONFIGS[0].parent / name).read_text()
    raw = yaml.safe_load(text)
    eplb = commented_block(text, "eplb")["eplb"]
    args = {**raw["applications"][0]["args"], "eplb": eplb}
    config = DPServeConfig.from_args(args)
    assert config.eplb.policy == "swift"
    assert config.eplb.num_redundant == config.engine.data_parallel_size
    assert config.eplb.window_steps == 25
    assert config.eplb.first_window_steps == PACED_FIRST_PLAN_STEPS
    staging = transfer_options(config.eplb.transfer)
    assert staging["fit_step"] and staging["slots_per_step"] == 0
    sim = TransferConfig()
    assert staging["link_gb_per_s"] * 1e9 == sim.inter_node_bw_Bps
    assert staging["piece_latency_ms"] == pytest.approx(sim.p2p_op_latency_s * 1e3)
