"""The typed app config (deployments/config.py): sections, unknown keys, the engine_kwargs guard,
the shipped configs and `dpserve config check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from deployments.config import GROUP_OWNED_ENGINE_ARGS, ConfigError, DPServeConfig, EngineSettings
from npu_runtime.platform import by_name

RAY_CONFIGS = Path(__file__).resolve().parents[2] / "ray_configs"
SERVE_CONFIGS = sorted(RAY_CONFIGS.glob("serve-*.yaml"))


def _kuberay_args() -> dict:
    manifest = yaml.safe_load((RAY_CONFIGS / "kuberay-rayservice.yaml").read_text())
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"engine": {"data_parallel_sise": 2}}, "engine.data_parallel_sise"),
        ({"balance": {"polcy": "any_at_cap"}}, "balance.polcy"),
        ({"eplb": {"num_redundnat": 4}}, "eplb.num_redundnat"),
        ({"serving": {"stream_interval": 0}}, "serving.stream_interval"),
        ({"data_parallel_size": 2}, "data_parallel_size"),  # the flat shape: not a section
    ],
)
def test_unknown_keys_are_errors_naming_the_key(args: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        DPServeConfig.from_args(args)


@pytest.mark.parametrize("key", sorted(GROUP_OWNED_ENGINE_ARGS))
def test_engine_kwargs_cannot_override_what_the_group_owns(key: str) -> None:
    with pytest.raises(ConfigError, match=f"engine_kwargs may not set \\['{key}'\\]"):
        DPServeConfig.from_args({"engine": {"engine_kwargs": {key: 1}}})
    with pytest.raises(ValueError, match="engine_kwargs may not set"):
        EngineSettings(engine_kwargs={key: 1})


def test_other_engine_kwargs_reach_the_engine(tiny_model_dir: str) -> None:
    config = DPServeConfig.from_args(
        {"engine": {"model": tiny_model_dir, "engine_kwargs": {"max_num_batched_tokens": 512}}}
    )
    args = config.rank_settings.engine_args(1, "10.0.0.1", 1234)
    assert args["max_num_batched_tokens"] == 512
    assert (args["data_parallel_rank"], args["data_parallel_address"]) == (1, "10.0.0.1")


def test_invalid_values_and_policies_name_their_key() -> None:
    with pytest.raises(ConfigError, match="serving.output_transport"):
        DPServeConfig.from_args({"serving": {"output_transport": "carrier-pigeon"}})
    with pytest.raises(ConfigError, match="balance.policy.*unknown gate policy 'fastest'"):
        DPServeConfig.from_args({"balance": {"policy": "fastest"}})
    with pytest.raises(ConfigError, match="eplb.policy.*unknown EPLB policy"):
        DPServeConfig.from_args({"eplb": {"policy": "random"}})
    with pytest.raises(ConfigError, match="eplb.transfer.*unknown transfer options.*fit_steps"):
        DPServeConfig.from_args({"eplb": {"transfer": {"fit_steps": True}}})
    with pytest.raises(ConfigError, match="eplb.transfer.*link_gb_per_s must be > 0"):
        DPServeConfig.from_args({"eplb": {"transfer": {"fit_step": True, "link_gb_per_s": 0}}})
    with pytest.raises(ConfigError, match="eplb.first_window_steps"):
        DPServeConfig.from_args({"eplb": {"first_window_steps": 0}})
    paced = DPServeConfig.from_args({"eplb": {"first_window_steps": 2, "transfer": {"fit_step": True}}})
    assert paced.eplb.first_window_steps == 2 and paced.eplb.transfer == {"fit_step": True}


@pytest.mark.parametrize(
    ("balance", "match"),
    [
        ({"policy": "bounded_hold", "params": {"max_hold": 4}}, "unknown parameter.*max_hold; accepted"),
        (
            {"params": {"max_hold_steps": 4}},
            "'any_at_cap' got unknown parameter.*max_hold_steps",
        ),  # the default policy
        ({"policy": "off", "params": {"interval": 2}}, "'off' got unknown parameter.*interval"),
        (
            {"policy": "bounded_hold", "params": {"max_hold_steps": 0}},
            "max_hold_steps must be an integer >= 1",
        ),
        ({"policy": "cadence", "params": {"interval": "4"}}, "interval must be an integer >= 1"),
    ],
)
def test_gate_params_are_checked_against_the_policy(balance: dict, match: str) -> None:
    """A gate parameter the policy does not take (or an invalid value) fails the config check, naming
    it, instead of the coordinator when the group starts."""
    with pytest.raises(ConfigError, match=f"balance.params.*{match}"):
        DPServeConfig.from_args({"balance": balance})


def test_valid_gate_params_pass() -> None:
    config = DPServeConfig.from_args(
        {"balance": {"policy": "bounded_hold", "params": {"max_hold_steps": 16, "min_occupancy": 0.0}}}
    )
    assert config.balance is not None and config.balance.params == {
        "max_hold_steps": 16,
        "min_occupancy": 0.0,
    }
    assert DPServeConfig.from_args({"balance": {"policy": "cadence", "params": {"interval": 4}}}).balance


def test_sections_reach_the_ranks_and_the_ingress() -> None:
    config = DPServeConfig.from_args(
        {
            "engine": {"data_parallel_size": 4, "max_num_seqs": 8},
            "balance": {"policy": "any_at_cap", "lead": 2},
            "eplb": {"num_redundant": 4},
            "serving": {"stream_interval_ms": 25},
        }
    )
    settings = config.rank_settings
    assert settings.data_parallel_size == 4 and settings.eplb_enabled
    assert settings.balance.scheduler_config() == {"lead": 2}  # only what the scheduler reads, when set
    assert config.queue_bound == 32 and config.serving.stream_interval_ms == 25
    assert DPServeConfig.from_args(None).balance is None and not DPServeConfig().rank_settings.eplb_enabled
    # What a rank actor receives round-trips.
    assert EngineSettings.model_validate(settings.model_dump()) == settings


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_each_shipped_serve_config_validates(path: Path) -> None:
    (app,) = yaml.safe_load(path.read_text())["applications"]
    DPServeConfig.from_args(app["args"])


def test_the_kuberay_app_args_validate() -> None:
    config = DPServeConfig.from_args(_kuberay_args())
    assert config.balance is not None and config.eplb is None  # EPLB off, as in serve-ascend.yaml


def test_config_check_prints_the_effective_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(RAY_CONFIGS / "serve-local.yaml")]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)["args"]
    assert printed["engine"]["data_parallel_size"] == 2
    assert printed["serving"]["stream_interval_ms"] == 0.0  # a default, filled in
    assert printed["balance"]["policy"] == "bounded_hold" and printed["eplb"] is None


def test_config_check_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load((RAY_CONFIGS / "serve-local.yaml").read_text())
    raw["applications"][0]["args"]["engine"]["max_num_seq"] = 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["config", "check", str(bad)]) == 1
    assert "unknown key 'engine.max_num_seq'" in capsys.readouterr().err


# ---- engine.platform --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["npu", "cuda", "cpu", None])
def test_engine_platform_is_a_known_platform_or_unset(name) -> None:
    config = DPServeConfig.from_args({"engine": {"platform": name}} if name else {})
    assert config.engine.platform == name == config.rank_settings.platform
    # What a rank actor receives round-trips with it.
    assert EngineSettings.model_validate(config.rank_settings.model_dump()).platform == name


@pytest.mark.parametrize("value", ["tpu", "NPU", "gpu", 1])
def test_engine_platform_refuses_others_naming_the_key(value) -> None:
    with pytest.raises(ConfigError, match="engine.platform: Input should be 'npu', 'cuda' or 'cpu'"):
        DPServeConfig.from_args({"engine": {"platform": value}})


@pytest.mark.parametrize(
    ("name", "defaults"),
    [
        # The platform's engine defaults and executor follow engine.platform, not this CPU machine.
        ("cpu", {"enforce_eager": True, "dtype": "float32",
                 "distributed_executor_backend": "vllm.v1.executor.uniproc_executor.UniProcExecutor"}),
        ("npu", {"distributed_executor_backend": "uni"}),
        ("cuda", {"distributed_executor_backend": "uni"}),
    ],
)  # fmt: skip
def test_engine_args_use_the_configured_platform(name: str, defaults: dict) -> None:
    settings = DPServeConfig.from_args({"engine": {"model": "/models/m", "platform": name}}).rank_settings
    args = settings.engine_args(0, "10.0.0.1", 1234)
    assert {k: args.get(k) for k in defaults} == defaults
    if name != "cpu":
        assert "enforce_eager" not in args and "dtype" not in args
    assert settings.resolved_platform().name == name
    # An explicit platform argument (what a rank passes) wins.
    assert settings.engine_args(0, "10.0.0.1", 1234, by_name("cpu"))["dtype"] == "float32"
