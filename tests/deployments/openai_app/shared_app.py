"""The app this folder's modules share (see conftest.py) and the bounds their tests rely on."""

from __future__ import annotations

from typing import Any

from tests.helpers import tiny_app_args

MAX_MODEL_LEN = 512
QUEUE_BOUND = 16  # admitted requests per rank before the ingress answers 429


def shared_app_args(tiny_model_dir: str) -> dict[str, Any]:
    """EP on, balance on, a small admission bound; engine_nice 0 for the niceness check."""
    return tiny_app_args(tiny_model_dir, engine={"enable_expert_parallel": True, "max_model_len": MAX_MODEL_LEN,
                                                 "engine_nice": 0},
                         balance={"policy": "any_at_cap"}, serving={"max_queued_per_rank": QUEUE_BOUND})  # fmt: skip
