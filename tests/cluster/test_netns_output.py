"""json_result: the driver's printed JSON is found although Ray's streamed logs follow it."""

import pytest

from tests.cluster.netns import json_result


def test_json_result_skips_log_lines_after_the_printed_value():
    stdout = (
        '["10.0.0.1", "10.0.0.2"]\n'
        "(raylet, ip=10.0.0.2) [2026-12-07 12:59:01,123 C 1234 1234] node_manager.cc:1 Check failed\n"
        "    /x/.venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet(+0x263cb7) [0x562a2f785cb7]\n"
        "7\n"
    )
    assert json_result(stdout) == ["10.0.0.1", "10.0.0.2"]


def test_json_result_takes_the_last_value_and_refuses_output_without_one():
    assert json_result('{"a": 1}\n{"a": 2}\n') == {"a": 2}
    with pytest.raises(ValueError, match="no JSON list or object"):
        json_result("only logs\n42\n")
