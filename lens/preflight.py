"""What the trainer refuses before it loads anything: set-ups it does not implement or that would train wrong."""

from __future__ import annotations

from lens.params import ParamsError


def check_fsdp_support(params, fsdp: bool, fsdp2: bool) -> None:
    """Refuse, before loading anything, the FSDP set-ups the trainer does not implement."""
    if not fsdp:
        return
    if not fsdp2:
        raise ValueError("FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config")
    if params.train.kl_beta > 0:
        raise ValueError("train.kl_beta > 0 is not supported under FSDP: the frozen reference policy would be "
                         "a full, unsharded copy on every GPU (the paper's setting is kl_beta=0)")
    if params.rollout.engine not in ("hf", "vllm"):
        raise ValueError(f"rollout.engine={params.rollout.engine} is not supported under FSDP: only hf (synced "
                         "decode steps over the shards) and vllm (each rank's engine gets the gathered weights)")
    if params.eval.every_steps and params.rollout.engine == "hf":
        raise ValueError("eval.every_steps is not supported under FSDP with rollout.engine=hf: the evaluation "
                         "runs on one rank, and every forward pass of a sharded model is a collective; use "
                         "rollout.engine=vllm (its own copy of the weights) or evaluate checkpoints instead")


def check_master_weights(params) -> None:
    """Refuse to train weights AdamW would update in place in half precision (updates round away)."""
    if params.model.dtype != "float32":
        raise ParamsError(
            f"model.dtype={params.model.dtype}: the trainer would update {params.model.dtype} weights in place, and "
            f"AdamW steps below a weight's spacing round away at RL learning rates; train with fp32 master "
            f"weights and {params.model.dtype} compute: model.dtype=float32 model.compute_dtype={params.model.dtype}")
