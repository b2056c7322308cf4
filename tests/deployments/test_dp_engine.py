"""DP=2 and DP=2+EP of the tiny MoE model, one Ray actor per rank, match DP=1 token for token.

Real vLLM engines in float32 (docs/design.md, "Measured facts": bf16 summation order makes the nearly flat logits of a
random model diverge; float32 does not).
"""

import asyncio

import pytest

from deployments.config import EngineSettings
from deployments.rank_group import start_rank_group, stop_rank_group
from tests.helpers import PROMPTS, generate_on_ranks, greedy

pytestmark = pytest.mark.slow

SAMPLING = greedy(16)


def _run(settings: EngineSettings) -> tuple[list[list[int]], list[dict]]:
    async def go():
        actors, pg, _ = await start_rank_group(settings)
        try:
            # Concurrent requests spread over all ranks (round robin).
            ids = await generate_on_ranks(actors, PROMPTS, SAMPLING)
            stats = await asyncio.gather(*[a.get_stats.remote() for a in actors])
        finally:
            await stop_rank_group(actors, pg)
        return ids, list(stats)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def reference(ray_local, tiny_model_dir):
    ids, _ = _run(
        EngineSettings(model=tiny_model_dir, data_parallel_size=1, max_model_len=256, max_num_seqs=8)
    )
    assert all(len(t) == SAMPLING["max_tokens"] for t in ids)
    return ids


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["dp2", "dp2_ep"])
def test_dp2_matches_dp1(reference, tiny_model_dir, expert_parallel):
    settings = EngineSettings(
        model=tiny_model_dir,
        data_parallel_size=2,
        enable_expert_parallel=expert_parallel,
        max_model_len=256,
        max_num_seqs=8,
    )
    ids, stats = _run(settings)
    assert ids == reference
    # Both ranks stepped (each served half of the prompts).
    assert [s["rank"] for s in stats] == [0, 1]
    assert all(s["step"] > 0 for s in stats)
