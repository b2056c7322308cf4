"""`dpserve sim`: a discrete-event simulator of N data-parallel MoE ranks stepping in lockstep.

It runs the real gate policies (`scheduler.policy`) and, when configured, the real EPLB placement
policies (`eplb.policies`) against a faithful model of vLLM's per-rank scheduler (token budget,
max_num_seqs, chunked prefill) and a documented cost model (`cluster.sim.costs`), so that gate and EPLB
choices can be compared at scales (16-128 ranks, DeepSeek-V3) no development machine has.

Modules: `config` (YAML schema), `workload` (requests, client, router), `costs` (step-time model),
`experts` (routing skew, drift, placement, EPLB), `engine` (the lockstep loop), `report` (tables,
JSON, plots), `cli` (the `dpserve sim` subcommand).
"""

from cluster.sim.config import SimConfig, load_config
from cluster.sim.engine import SimResult, simulate

__all__ = ["SimConfig", "SimResult", "load_config", "simulate"]
