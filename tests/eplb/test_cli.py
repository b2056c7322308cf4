"""`dpserve eplb plan` through the real top-level parser (cluster.cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from eplb.plan import validate_placement
from eplb.policies import default_placement
from eplb.stats import count_moves, imbalance


@pytest.fixture
def loads(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    arr = np.round(rng.pareto(1.2, (4, 16)) * 100 + 1)
    path = tmp_path / "loads.npy"
    np.save(path, arr)
    return path


def plan(*args: str) -> int:
    return main(["eplb", "plan", *args])


@pytest.mark.parametrize("policy", ["deepseek", "deepseek_global", "deepseek_hierarchical", "swift"])
def test_round_trip(loads: Path, tmp_path: Path, policy: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plan.json"
    rc = plan(
        "--loads", str(loads), "--num-ranks", "4", "--num-redundant", "4",
        "--num-nodes", "2", "--num-groups", "4", "--policy", policy, "--out", str(out),
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    table = np.array(doc["phy2log"], dtype=np.int64)
    validate_placement(table, 16, 4)
    load = np.load(loads)
    s = doc["stats"]
    assert (doc["policy"], doc["num_ranks"], doc["num_redundant"]) == (policy, 4, 4)
    assert s["moves"] == count_moves(default_placement(4, 16, 4, 4), table)
    assert s["imbalance_after"] == pytest.approx(imbalance(load, table, 4).mean())
    assert s["imbalance_after"] <= s["imbalance_before"]
    assert len(s["imbalance_after_per_layer"]) == 4 and s["planning_ms"] >= 0
    assert "imbalance" in capsys.readouterr().out


def test_current_feeds_back(loads: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--loads", str(loads), "--num-ranks", "4", "--num-redundant", "4"]
    assert plan(*common, "--out", str(first)) == 0
    # Same loads, movement-aware policy, current = the balanced plan: nothing to gain, nothing moves.
    assert (
        plan(
            *common,
            "--policy",
            "swift",
            "--current",
            str(first),
            "--param",
            "threshold=2",
            "--out",
            str(second),
        )
        == 0
    )
    doc = json.loads(second.read_text())
    assert doc["stats"]["moves"] == 0
    assert doc["stats"]["moves_relative_to"] == "current"
    assert doc["phy2log"] == json.loads(first.read_text())["phy2log"]
    assert doc["params"] == {"threshold": 2}
    # A .npy current works too.
    npy = tmp_path / "cur.npy"
    np.save(npy, np.array(doc["phy2log"]))
    assert plan(*common, "--current", str(npy), "--out", str(second)) == 0


def _write(tmp_path: Path, name: str, content: object) -> str:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


ERRORS = [
    ("missing_loads", lambda t: ["--loads", str(t / "nope.npy")], "not found"),
    ("not_npy", lambda t: ["--loads", _write(t, "x.npy", "garbage")], "cannot read"),
    ("loads_1d", lambda t: ["--loads", _write(t, "x.npy", np.ones(16))], "2-D"),
    ("loads_nan", lambda t: ["--loads", _write(t, "x.npy", np.full((2, 16), np.nan))], "NaN"),
    ("loads_negative", lambda t: ["--loads", _write(t, "x.npy", -np.ones((2, 16)))], "negative"),
    ("ranks_not_dividing", lambda t: ["--num-ranks", "3"], "does not divide"),
    ("ranks_zero", lambda t: ["--num-ranks", "0"], "--num-ranks"),
    ("redundant_negative", lambda t: ["--num-redundant", "-1"], "--num-redundant"),
    ("current_missing", lambda t: ["--current", str(t / "nope.json")], "not found"),
    ("current_bad_json", lambda t: ["--current", _write(t, "c.json", "{oops")], "JSON"),
    ("current_no_key", lambda t: ["--current", _write(t, "c.json", {"x": 1})], "phy2log"),
    ("current_shape", lambda t: ["--current", _write(t, "c.json", {"phy2log": [[0, 1]]})], "shape"),
    (
        "current_ragged",
        lambda t: ["--current", _write(t, "c.json", {"phy2log": [[0, 1], [0]]})],
        "rectangular",
    ),
    (
        "current_missing_expert",
        lambda t: ["--current", _write(t, "c.json", {"phy2log": np.zeros((4, 20), int).tolist()})],
        "no replica",
    ),
    (
        "hierarchical_impossible",
        lambda t: ["--policy", "deepseek_hierarchical", "--num-nodes", "3"],
        "hierarchical",
    ),
    ("bad_param", lambda t: ["--policy", "swift", "--param", "nope=1"], "nope"),
    ("param_syntax", lambda t: ["--policy", "swift", "--param", "threshold"], "KEY=VALUE"),
    ("param_for_deepseek", lambda t: ["--param", "threshold=1"], "bad --param"),
    ("out_unwritable", lambda t: ["--out", str(t / "loads.npy" / "x.json")], "cannot write"),
]


@pytest.mark.parametrize(("name", "extra", "match"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_exit_2_without_traceback(
    loads: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    name: str,
    extra,
    match: str,  # noqa: ANN001
) -> None:
    args = {
        "--loads": str(loads),
        "--num-ranks": "4",
        "--num-redundant": "4",
        "--out": str(tmp_path / "o.json"),
    }
    extra_args = extra(tmp_path)
    for key in list(args):
        if key in extra_args:
            del args[key]
    argv = [x for kv in args.items() for x in kv] + extra_args
    assert plan(*argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err
    assert "Traceback" not in err


def test_argparse_errors_exit_2(loads: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        plan(
            "--loads",
            str(loads),
            "--num-ranks",
            "4",
            "--num-redundant",
            "4",
            "--policy",
            "nope",
            "--out",
            "x",
        )
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        plan("--loads", str(loads))  # missing required arguments
    assert exc.value.code == 2


def test_no_action_prints_usage(capsys: pytest.CaptureFixture) -> None:
    assert main(["eplb"]) == 2
    assert "eplb plan" in capsys.readouterr().err
