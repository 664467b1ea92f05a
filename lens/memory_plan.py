"""Per-GPU memory plan of a training run, from the params and the model's shapes alone (nothing is loaded).

Two phases share each GPU: rollout (the engine generates) and update (forward/backward/AdamW). Each phase's
items are summed at their worst case (longest prompts and completions); the peak phase must fit the GPU.
`lens train --dry-run` prints the plan and refuses, naming the keys to change, a plan that does not fit.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS workspaces and allocator slack: a rough allowance
FSDP_CONFIG = "the FSDP config (accelerate launch --config_file infra/accelerate/fsdp_8gpu.yaml)"
MORE_PROCESSES = "more processes (accelerate launch --num_processes N)"


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool
    source: str = ""

    @classmethod
    def from_config(cls, config, source: str) -> ModelShape:
        c = config.get_text_config()
        heads = c.num_attention_heads
        return cls(c.hidden_size, c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", None) or heads,
                   getattr(c, "head_dim", None) or c.hidden_size // heads, c.intermediate_size, c.vocab_size,
                   bool(getattr(c, "tie_word_embeddings", False)),
                   bool(getattr(c, "attention_bias", False)) or c.model_type == "qwen2", source)

    @property
    def layer_parameters(self) -> int:
        """One Llama/Qwen2 decoder layer: attention (q, k, v, o; Qwen2's q/k/v biases), SwiGLU MLP, 2 RMSNorms."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def root_parameters(self) -> int:
        """Outside the decoder layers: embeddings, the LM head unless tied, the final norm (FSDP's root unit)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.root_parameters


# Shapes of the profiles' models, for a dry run on a machine that has not downloaded them. From each model's
# config.json on the Hugging Face hub (https://huggingface.co/<id>/blob/main/config.json): Qwen/Qwen2.5-3B,
# Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.1-8B-Instruct, HuggingFaceTB/SmolLM2-135M-Instruct; an -Instruct
# model has its base's shapes. Keyed by the id's last part, lower case, without "-instruct".
KNOWN_SHAPES = {
    "qwen2.5-3b": ModelShape(2048, 36, 16, 2, 128, 11008, 151936, True, True),
    "qwen2.5-0.5b": ModelShape(896, 24, 14, 2, 64, 4864, 151936, True, True),
    "llama-3.1-8b": ModelShape(4096, 32, 32, 8, 128, 14336, 128256, False, False),
    "smollm2-135m": ModelShape(576, 30, 9, 3, 64, 1536, 49152, True, False),
}


def _from_config_dir(path: Path, trust_remote_code: bool) -> ModelShape | None:
    if not (path / "config.json").is_file():
        return None
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code),
                                  f"{path / 'config.json'}")


def _known(name: str) -> ModelShape | None:
    key = name.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-instruct")
    shape = KNOWN_SHAPES.get(key)
    return None if shape is None else ModelShape(**asdict(shape) | {
        "source": f"known shapes of {key} (lens.memory_plan.KNOWN_SHAPES, from its hub config.json)"})


def model_shape(params) -> ModelShape | None:
    """The policy's shapes from its config.json when on disk (a local directory or the hub cache), else from
    KNOWN_SHAPES; None when neither knows the model. Reads no weights and never reaches the network."""
    m = params.model
    if m.source == "hub":
        local = params.resolve_path(m.name_or_path)
        if local.is_dir():
            return _from_config_dir(local, m.trust_remote_code) or _known(m.name_or_path)
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(m.name_or_path, "config.json")
        except ValueError:  # not a valid repo id: nothing cached under it
            cached = None
        if isinstance(cached, str):
            return _from_config_dir(Path(cached).parent, m.trust_remote_code)
        return _known(m.name_or_path)
    if m.source == "smollm2":
        from lens.smollm2 import default_cache_dir

        base = params.resolve_path(m.cache_dir) if m.cache_dir else default_cache_dir()
        return _from_config_dir(base / "SmolLM2-135M-Instruct", False) or _known("SmolLM2-135M")
    if m.source == "warm_start":
        shape = _from_config_dir(params.warm_start_dir / "model", False)
        if shape is None:  # not warm-started yet: the shapes it will have (lens.tiny_model)
            from lens.tiny_model import build_char_tokenizer

            t = m.tiny
            shape = ModelShape(t.hidden_size, t.num_layers, t.num_heads, t.num_heads, t.hidden_size // t.num_heads,
                               t.intermediate_size, len(build_char_tokenizer()), True, True, "model.tiny")
        return shape
    return None


def micro_batch_tokens(params) -> tuple[int, int, str]:
    """(tokens of one micro-batch, of the longest sequence, how they were counted)."""
    # The prompt room vLLM's derived max_model_len leaves: the engine's own assumption when prompts are unbounded.
    from lens.rollout.vllm import PROMPT_BUDGET

    tp, new = params.train, params.rollout.max_new_tokens
    if params.data.max_prompt_tokens:
        prompt, why = params.data.max_prompt_tokens, f"data.max_prompt_tokens {params.data.max_prompt_tokens}"
    else:
        prompt, why = PROMPT_BUDGET, f"{PROMPT_BUDGET} prompt tokens assumed (data.max_prompt_tokens unset)"
    longest = prompt + new
    budget = tp.micro_batch_tokens
    if budget:  # a sequence longer than the budget still makes a micro-batch of its own
        return max(budget, longest), longest, f"train.micro_batch_tokens {budget} (the longest sequence: {longest})"
    return (tp.micro_batch_size * longest, longest,
            f"train.micro_batch_size {tp.micro_batch_size} x ({why} + rollout.max_new_tokens {new})")


def _activation_bytes_per_token(shape: ModelShape, compute: int, residual: int) -> int:
    """Saved for backward by one decoder layer (SDPA/flash attention: no seq x seq term): the residual stream's
    norms in and out, then q, k, v, the attention output, o_proj's input and SwiGLU's five I-wide tensors."""
    kv = shape.kv_heads * shape.head_dim
    return 4 * residual * shape.hidden + compute * (4 * shape.hidden + 2 * kv + 5 * shape.intermediate)


def memory_plan(params, world_size: int = 1, fsdp: bool = False, gpu_memory_gb: float | None = None) -> dict:
    """Itemised GiB per GPU of the update and rollout phases, the peak, and whether it fits `gpu_memory_gb`
    (GiB; None: unknown, nothing checked). FSDP shards the fp32 masters, gradients and AdamW states over
    `world_size`; DDP replicates them and adds its gradient buckets."""
    base = {"world_size": world_size, "fsdp": fsdp, "gpu_memory_gb": gpu_memory_gb, "unit": "GiB per GPU",
            "assumes": "every sequence at its longest, a phase's items all held at once (an upper bound)"}
    shape = model_shape(params)
    if shape is None:
        return base | {"fits": None, "note": f"shapes of model {params.model.name_or_path or params.model.source!r} "
                                             "unknown (no config.json on disk, not in KNOWN_SHAPES): no estimate"}
    m, rp = params.model, params.rollout
    dtype, compute = DTYPE_BYTES[m.dtype], DTYPE_BYTES[m.compute_dtype]
    n, shard = shape.parameters, world_size if fsdp else 1
    tokens, longest, basis = micro_batch_tokens(params)
    # FSDP2's MixedPrecisionPolicy computes in bf16, the residual stream included; under autocast the
    # fp32 embeddings keep the residual stream (and so the checkpointed layer inputs) fp32.
    residual = compute if fsdp else dtype
    per_layer = _activation_bytes_per_token(shape, compute, residual) * tokens
    if fsdp:  # the root unit stays gathered from forward to backward; 2 layers: the running one and the prefetched
        compute_weights = (shape.root_parameters + 2 * shape.layer_parameters) * compute
    else:  # autocast caches a compute-dtype copy of every weight for the forward (and for all of generate)
        compute_weights = n * compute if compute != dtype else 0
    persistent = {
        "master_weights": n * dtype / shard,
        "adamw_states": 2 * n * 4 / shard,
        "ddp_gradient_buckets": n * dtype if not fsdp and world_size > 1 else 0,
        "reference_model": n * dtype if params.train.kl_beta > 0 else 0,
        "cuda_context": CUDA_CONTEXT_GIB * GIB,
    }
    vllm = rp.vllm.gpu_memory_utilization * gpu_memory_gb * GIB if rp.engine == "vllm" and gpu_memory_gb else 0
    update = persistent | {
        "gradients": n * dtype / shard,
        "compute_weights": compute_weights,
        "activations": (shape.layers * tokens * shape.hidden * residual + per_layer if m.gradient_checkpointing
                        else shape.layers * per_layer),
        # Per position: the compute-dtype logit, its fp32 copy kept for the backward, two fp32 temporaries;
        # train.logprob_chunk_tokens: one chunk's positions at a time (recomputed in the backward).
        "logits": min(tokens, params.train.logprob_chunk_tokens or tokens) * shape.vocab * (compute + 12),
        "vllm_reserved": 0 if rp.vllm.sleep_between_steps else vllm,
    }
    rollout = persistent | {"vllm_reserved": vllm}
    if rp.engine == "hf":
        group = rp.group_size
        new = max(rp.max_new_tokens, params.eval.max_new_tokens if params.eval.every_steps else 0)
        sequences = max(1, rp.batch_size // group) * group
        rollout |= {"compute_weights": compute_weights,
                    "hf_kv_cache": 2 * shape.layers * shape.kv_heads * shape.head_dim * compute * sequences
                    * (longest - rp.max_new_tokens + new)}
    phases = {"update": _gib(update), "rollout": _gib(rollout)}
    peak = max(phases, key=lambda p: phases[p]["total"])
    notes = []
    if rp.engine == "vllm" and not gpu_memory_gb:
        notes.append(f"vLLM's share (rollout.vllm.gpu_memory_utilization={rp.vllm.gpu_memory_utilization} of the "
                     "GPU) is not counted: the GPU's memory is unknown")
    if rp.engine not in ("hf", "vllm"):
        notes.append(f"rollout.engine={rp.engine}: its memory is not estimated")
    if gpu_memory_gb is None:
        notes.append("no GPU memory given (run.gpu_memory_gb) or detected: nothing checked")
    return base | {
        "model": {"parameters": n, "source": shape.source},
        "micro_batch_tokens": tokens, "tokens_basis": basis,
        "phases": phases, "peak_phase": peak, "peak_gib": phases[peak]["total"],
        "fits": None if gpu_memory_gb is None else phases[peak]["total"] <= gpu_memory_gb,
        "notes": notes,
    }


def _gib(items: dict[str, float]) -> dict[str, float]:
    kept = {k: v / GIB for k, v in items.items() if v}
    return {k: round(v, 2) for k, v in sorted(kept.items(), key=lambda kv: -kv[1])} | {
        "total": round(sum(kept.values()), 2)}


def _keys_to_change(item: str, params, fsdp: bool, phase: str) -> list[str]:
    batch = ["train.micro_batch_tokens" if params.train.micro_batch_tokens else "train.micro_batch_size"]
    return {
        "master_weights": [MORE_PROCESSES if fsdp else FSDP_CONFIG],
        "adamw_states": [MORE_PROCESSES if fsdp else FSDP_CONFIG],
        "gradients": [MORE_PROCESSES if fsdp else FSDP_CONFIG],
        "ddp_gradient_buckets": [FSDP_CONFIG],
        "compute_weights": [MORE_PROCESSES if fsdp else FSDP_CONFIG],
        "reference_model": ["train.kl_beta=0"],
        "activations": batch + ([] if params.model.gradient_checkpointing else ["model.gradient_checkpointing=true"]),
        "logits": batch + ([] if params.train.logprob_chunk_tokens else ["train.logprob_chunk_tokens"]),
        "vllm_reserved": ["rollout.vllm.gpu_memory_utilization"] + (
            ["rollout.vllm.sleep_between_steps=true"] if phase == "update" else []),
        "hf_kv_cache": ["rollout.batch_size", "rollout.max_new_tokens", "data.max_prompt_tokens"],
    }.get(item, [])


def memory_refusal(plan: dict, params, gpu_memory_source: str = "run.gpu_memory_gb") -> str | None:
    """Why the plan cannot run on the GPU (its largest items and the keys that shrink them), or None."""
    if plan.get("fits") is not False:
        return None
    phase = plan["peak_phase"]
    items = {k: v for k, v in plan["phases"][phase].items() if k != "total"}
    largest = list(items)[:3]
    changes = dict.fromkeys(key for item in largest for key in _keys_to_change(item, params, plan["fsdp"], phase))
    return (f"memory plan: the {phase} phase needs ~{plan['peak_gib']:.1f} GiB per GPU "
            f"({plan['world_size']} process(es), {'FSDP' if plan['fsdp'] else 'DDP'}), more than the GPU's "
            f"{plan['gpu_memory_gb']:.1f} GiB ({gpu_memory_source}); largest: "
            + ", ".join(f"{k} {items[k]:.1f}" for k in largest)
            + f". Change: {', '.join(changes)} (the plan above itemises every GiB).")


def launch_topology(env: dict[str, str] | None = None) -> tuple[int, bool]:
    """(processes, fsdp) as `accelerate launch` sets them (WORLD_SIZE, ACCELERATE_USE_FSDP); (1, False) outside it."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1")), env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def gpu_memory(params) -> tuple[float | None, str]:
    """(GiB, where it came from): run.gpu_memory_gb, else this process's CUDA device, else (None, why)."""
    if params.run.gpu_memory_gb is not None:
        return params.run.gpu_memory_gb, "run.gpu_memory_gb"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        return props.total_memory / GIB, f"detected: {props.name}"
    return None, "no CUDA device and run.gpu_memory_gb unset"

