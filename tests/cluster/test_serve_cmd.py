"""`dpserve serve`'s metrics port: fixed by default for the Ray it starts, skipped when taken."""

from __future__ import annotations

import argparse
import socket

from cluster.serve_cmd import DEFAULT_METRICS_PORT, add_arguments, port_is_free


def test_metrics_port_defaults_to_the_fixed_port() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).metrics_port == DEFAULT_METRICS_PORT == 8080
    assert parser.parse_args(["--metrics-port", "9100"]).metrics_port == 9100


def test_a_taken_port_is_seen_as_taken() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not port_is_free(port)
    assert port_is_free(port)
