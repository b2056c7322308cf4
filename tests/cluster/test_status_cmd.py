"""`dpserve status`'s table: the ranks' vLLM patch state is shown once, or per rank where they differ."""

from __future__ import annotations

from cluster.status_cmd import format_status


def _status(*patches: str) -> dict:
    ranks = [{"rank": i, "live": True, "vllm_patches": p} for i, p in enumerate(patches)]
    return {
        "model": "m",
        "data_parallel_size": len(ranks),
        "live_ranks": list(range(len(ranks))),
        "ranks": ranks,
    }


def test_one_line_when_every_rank_agrees() -> None:
    out = format_status(_status("vLLM 0.32.0: all 26 patches fit", "vLLM 0.32.0: all 26 patches fit"))
    assert out.count("vllm patches:") == 1
    assert "vllm patches: vLLM 0.32.0: all 26 patches fit" in out


def test_per_rank_lines_when_ranks_differ() -> None:
    out = format_status(_status("vLLM 0.32.0: all 26 patches fit", "vLLM 0.23.0: refused cpu_ep, eplb"))
    assert "vllm patches: rank 1: vLLM 0.23.0: refused cpu_ep, eplb" in out
    assert "vllm patches: rank 0: vLLM 0.32.0: all 26 patches fit" in out


def test_no_line_from_ranks_that_do_not_report_it() -> None:
    assert "vllm patches" not in format_status(_status("", ""))


def test_liveness_line_sums_what_the_sockets_dropped() -> None:
    from cluster.status_cmd import liveness_line

    status = {"recoveries": 2, "hung_ranks_detected": 1,
              "output_channel": {"timed_out_requests": 3, "ranks": {
                  "0": {"dropped": {"unauthenticated": 4, "replayed": 1}, "lost": 2},
                  "1": {"dropped": {}, "lost": 0}}},
              "balance": {"zmq_dropped": {"unauthenticated": 3, "malformed": 1}}}  # fmt: skip
    assert liveness_line(status) == (
        "liveness: recoveries 2  hung ranks 1  timed-out requests 3  internal frames dropped: output 5, "
        "gate 4; output frames lost 2"
    )
    assert "output 0, gate 0; output frames lost 0" in liveness_line({"balance": None})
