"""The Ray Serve environment dpserve starts Serve with (no Ray needed)."""

from deployments.serve_env import SERVE_ENV, apply_serve_env, direct_ingress_url


def test_defaults_fill_in_and_operator_values_win():
    env = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"}
    effective = apply_serve_env(env)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == SERVE_ENV["RAY_SERVE_ENABLE_DIRECT_INGRESS"]
    assert effective["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"


def test_direct_ingress_url(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    assert direct_ingress_url() is None
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", raising=False)
    assert direct_ingress_url() == "http://127.0.0.1:30000"
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "31000")
    assert direct_ingress_url("10.0.0.1") == "http://10.0.0.1:31000"
    # An explicit environment (e.g. the one handed to Serve's controller) instead of os.environ.
    env = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "32000"}
    apply_serve_env(env)
    assert direct_ingress_url(env=env) == "http://127.0.0.1:32000"
    assert direct_ingress_url(env={"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}) is None
