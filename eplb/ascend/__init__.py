"""The Ascend adapter of the online EPLB's rank side (vllm-ascend 0.23.0.post1).

Behind the same interfaces as the CPU/GPU path (eplb.slots.ModelSlots, the recorder's take(), the
exchanger's Posted pieces, the step-sync participant of npu_runtime.eplb_hooks), by concern:

* eplb.ascend.placement: pure tables: the start-up placement, vllm-ascend's expert map file, each
  rank's `log2phy` row, slot loads to logical loads;
* eplb.ascend.startup: the engine arguments that make vllm-ascend allocate those slots at start-up;
* eplb.ascend.dispatch: which token dispatcher vllm-ascend picks, and the refusal of redundant slots
  where it can pick AllGather (whose masking and per-rank replica choice are wrong for replicas);
* eplb.ascend.slots: `AscendModelSlots` over vllm-ascend's MoE layers (weights and `log2phy` updated
  in place) and `SlotLoadRecorder` (load from `FusedExpertsResult.expert_tokens`);
* eplb.ascend.transfer: expert rows between EP ranks as batched p2p ops (HCCL on NPUs);
* eplb.ascend.worker: the hooks on the worker the platform names (`NPUWorker` / `NPUModelRunner`)
  and the worker state built from them.

The vllm-ascend symbols all of this relies on are declared and checked in npu_runtime.ascend_patches.
Nothing here has run on an NPU (see README, "Platforms and versions").
"""
