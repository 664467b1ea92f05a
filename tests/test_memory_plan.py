"""The dry run's per-GPU memory plan: hand-checked arithmetic, the paper's two models at their scale, the refusal."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from lens.memory_plan import (
    KNOWN_SHAPES,
    launch_topology,
    memory_plan,
    memory_refusal,
    model_shape,
)
from lens.params import ParamsError, load_params
from tests.conftest import PROJECT_ROOT

GIB = 2**30


def small_llama_dir(tmp_path):
    """A config.json and nothing else: the plan must need no weights."""
    LlamaConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=4096, vocab_size=32768, tie_word_embeddings=True).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def small_params(tmp_path, *extra):
    return load_params("tiny", [f"run.output_root={tmp_path}", "model.source=hub",
                                f"model.name_or_path={small_llama_dir(tmp_path)}", "model.compute_dtype=bfloat16",
                                "model.gradient_checkpointing=true", "data.max_prompt_tokens=512",
                                "rollout.max_new_tokens=512", "train.micro_batch_size=4", "rollout.batch_size=64",
                                "rollout.group_size=8", *extra])


def test_the_plan_of_a_small_config_matches_the_arithmetic_by_hand(tmp_path):
    plan = memory_plan(small_params(tmp_path), world_size=1, fsdp=False, gpu_memory_gb=8.0)
    # Parameters: per layer q 1024x1024, k and v 1024x256 each (2 kv heads x 128), o 1024x1024, MLP 3 x 1024 x
    # 4096, two norms 1024 each = 15,206,400; x 4 layers, + tied embeddings 32768 x 1024 + final norm 1024.
    n = 4 * 15_206_400 + 32768 * 1024 + 1024
    assert plan["model"]["parameters"] == n == 94_381_056
    tokens = 4 * (512 + 512)  # micro_batch_size x (data.max_prompt_tokens + rollout.max_new_tokens)
    assert plan["micro_batch_tokens"] == tokens
    update, rollout = plan["phases"]["update"], plan["phases"]["rollout"]
    expected_update = {
        "master_weights": n * 4 / GIB, "gradients": n * 4 / GIB, "adamw_states": n * 8 / GIB,
        "compute_weights": n * 2 / GIB,  # autocast's bf16 copy
        # checkpointed fp32 layer inputs (4 x tokens x 1024 x 4 B) + one layer recomputed: per token
        # 4 x 4 B x 1024 (norms in/out) + 2 B x (4 x 1024 + 2 x 256 + 5 x 4096)
        "activations": (4 * tokens * 1024 * 4 + tokens * (16 * 1024 + 2 * (4096 + 512 + 5 * 4096))) / GIB,
        "logits": tokens * 32768 * (2 + 12) / GIB,  # = 1.75: bf16 logits + fp32 copy + two fp32 temporaries
        "cuda_context": 1.0,
    }
    assert {k: v for k, v in update.items() if k != "total"} == pytest.approx(expected_update, abs=0.005)
    assert update["total"] == pytest.approx(sum(expected_update.values()), abs=0.005)
    # HF engine: 64 sequences (8 prompts x G=8) x 1024 tokens x 2 (k, v) x 4 layers x 2 kv heads x 128 x 2 B.
    kv_cache = 64 * 1024 * 2 * 4 * 2 * 128 * 2 / GIB
    assert rollout["hf_kv_cache"] == pytest.approx(kv_cache, abs=0.005) and kv_cache == 0.25
    assert "gradients" not in rollout  # zero_grad(set_to_none) frees them before the next rollout
    assert plan["peak_phase"] == "update" and plan["fits"] is True  # 1.76 + 0.32 + 1.75 + 1 = 4.83 GiB <= 8


def test_a_bigger_micro_batch_does_not_fit_and_the_refusal_names_the_keys(tmp_path):
    params = small_params(tmp_path, "train.micro_batch_size=16")
    plan = memory_plan(params, 1, False, 8.0)
    assert plan["phases"]["update"]["logits"] == pytest.approx(7.0, abs=0.005) and plan["fits"] is False
    refusal = memory_refusal(plan, params)
    assert "update phase" in refusal and "logits 7.0" in refusal
    assert "train.micro_batch_size" in refusal and "train.logprob_chunk_tokens" in refusal
    # Chunked log-probs keep one chunk's logits: the same batch then fits.
    params = small_params(tmp_path, "train.micro_batch_size=16", "train.logprob_chunk_tokens=1024")
    plan = memory_plan(params, 1, False, 8.0)
    assert plan["phases"]["update"]["logits"] == pytest.approx(1024 * 32768 * 14 / GIB, abs=0.005)
    assert plan["fits"] is True and memory_refusal(plan, params) is None


@pytest.mark.parametrize("config_cls, kwargs", [
    (Qwen2Config, {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "intermediate_size": 96, "vocab_size": 300, "tie_word_embeddings": False}),
    (LlamaConfig, {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4,
                       "intermediate_size": 80, "vocab_size": 500, "tie_word_embeddings": True}),
])
def test_the_parameter_count_is_the_one_transformers_builds(tmp_path, config_cls, kwargs):
    config_cls(**kwargs).save_pretrained(tmp_path)
    params = load_params("tiny", ["model.source=hub", f"model.name_or_path={tmp_path}"])
    shape = model_shape(params)
    with torch.device("meta"):  # shapes only: nothing allocated
        model = AutoModelForCausalLM.from_config(config_cls(**kwargs))
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.source.endswith("config.json")


@pytest.mark.parametrize("key, config_cls, published", [
    ("qwen2.5-3b", Qwen2Config, 3.09e9), ("qwen2.5-0.5b", Qwen2Config, 0.49e9),
    ("llama-3.1-8b", LlamaConfig, 8.03e9), ("smollm2-135m", LlamaConfig, 0.135e9)])
def test_known_shapes_build_the_published_parameter_counts(key, config_cls, published):
    s = KNOWN_SHAPES[key]
    config = config_cls(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                        num_key_value_heads=s.kv_heads, head_dim=s.head_dim, intermediate_size=s.intermediate,
                        vocab_size=s.vocab, tie_word_embeddings=s.tied_embeddings)
    with torch.device("meta"):
        counted = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert s.parameters == counted
    assert counted == pytest.approx(published, rel=0.01)  # the model cards' 3.09B, 0.49B, 8.03B, 135M


def test_the_paper_profile_fits_one_80_gib_gpu_only_with_its_token_budget():
    params = load_params("paper")
    plan = memory_plan(params, world_size=1, fsdp=False, gpu_memory_gb=80.0)
    update, rollout = plan["phases"]["update"], plan["phases"]["rollout"]
    assert plan["model"]["parameters"] == 3_085_938_688
    assert (update["master_weights"], update["adamw_states"], update["gradients"]) == (11.5, 22.99, 11.5)
    # vLLM sleeps while training: its half of the GPU counts in the rollout phase only, which is the peak.
    assert "vllm_reserved" not in update and rollout["vllm_reserved"] == 40.0
    assert plan["peak_phase"] == "rollout" and plan["peak_gib"] == pytest.approx(75.49, abs=0.01)
    assert plan["fits"] is True
    # Without the token budget and chunked log-probs: 8 x 5,120 tokens of full [B, T, V] logits, ~81 GiB alone.
    unchunked = load_params("paper", ["train.micro_batch_tokens=null", "train.logprob_chunk_tokens=null"])
    plan = memory_plan(unchunked, 1, False, 80.0)
    assert plan["phases"]["update"]["logits"] > 80 and plan["fits"] is False
    refusal = memory_refusal(plan, unchunked)
    assert "train.micro_batch_size" in refusal and "train.logprob_chunk_tokens" in refusal
    # vLLM awake during the update: its share adds to the update phase.
    awake = load_params("paper", ["rollout.vllm.sleep_between_steps=false"])
    plan = memory_plan(awake, 1, False, 80.0)
    assert plan["fits"] is False and "rollout.vllm.sleep_between_steps=true" in memory_refusal(plan, awake)


def test_llama_8b_on_8_gpus_fits_under_fsdp_and_not_under_ddp():
    as_shipped = memory_plan(load_params("paper_llama"), world_size=8, fsdp=True, gpu_memory_gb=80.0)
    # vLLM engines (half of each GPU, asleep during the update) beside the sharded trainer
    assert as_shipped["fits"] is True and as_shipped["peak_phase"] == "rollout" and as_shipped["peak_gib"] == 52.22
    params = load_params("paper_llama", ["rollout.engine=hf", "rollout.batch_size=64"])
    fsdp = memory_plan(params, world_size=8, fsdp=True, gpu_memory_gb=80.0)
    ddp = memory_plan(params, world_size=8, fsdp=False, gpu_memory_gb=80.0)
    assert fsdp["model"]["parameters"] == 8_030_261_248
    assert fsdp["phases"]["update"]["adamw_states"] == 7.48 and ddp["phases"]["update"]["adamw_states"] == 59.83
    assert fsdp["fits"] is True and fsdp["peak_gib"] < 80
    # Replicated fp32 masters + AdamW alone: 8.03e9 x 12 B = 89.8 GiB, before gradients and DDP's buckets.
    assert ddp["fits"] is False and ddp["phases"]["update"]["total"] > 160
    assert "infra/accelerate/fsdp_8gpu.yaml" in memory_refusal(ddp, params)
    # 256 sequences of up to 6,144 tokens at once would need a 192 GiB KV cache.
    as_configured = load_params("paper_llama", ["rollout.engine=hf", "rollout.batch_size=256"])
    plan = memory_plan(as_configured, 8, True, 80.0)
    assert plan["phases"]["rollout"]["hf_kv_cache"] == 192.0 and plan["fits"] is False
    assert "rollout.batch_size" in memory_refusal(plan, as_configured)


def test_an_unknown_model_or_gpu_gives_no_verdict(tmp_path):
    unknown = load_params("paper", ["model.name_or_path=lens-tests/not-downloaded"])
    plan = memory_plan(unknown, 1, False, 80.0)
    assert plan["fits"] is None and "unknown" in plan["note"] and memory_refusal(plan, unknown) is None
    plan = memory_plan(load_params("paper"), 1, False, None)
    assert plan["fits"] is None and any("nothing checked" in note for note in plan["notes"])
    with pytest.raises(ParamsError, match="run.gpu_memory_gb"):
        load_params("paper", ["run.gpu_memory_gb=0"])


@pytest.mark.parametrize("config, fsdp", [("fsdp_8gpu", True), ("ddp_8gpu", False)])
def test_the_topology_is_read_from_what_accelerate_launch_sets(config, fsdp):
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(PROJECT_ROOT / "infra" / "accelerate" / f"{config}.yaml"), "x.py"])
    args = _validate_launch_command(args)[0]
    env = prepare_multi_gpu_env(args)
    # WORLD_SIZE is set by torchrun, which accelerate launch starts with --nproc_per_node = num_processes.
    assert launch_topology(env | {"WORLD_SIZE": str(args.num_processes)}) == (8, fsdp)
    assert launch_topology({}) == (1, False)


def lens_dry_run(*args):
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "TMPDIR", "PATH")}
    return subprocess.run([sys.executable, "-m", "lens.cli", "train", "--dry-run", *args], check=False,
                          cwd=PROJECT_ROOT,
                          env=env | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)},
                          capture_output=True, text=True, timeout=120)


def test_the_dry_run_prints_the_plan_from_a_config_alone_and_refuses_what_cannot_fit(tmp_path):
    model_dir = small_llama_dir(tmp_path)  # config.json only: loading the model would fail
    common = [f"run.output_root={tmp_path / 'runs'}", "model.source=hub", f"model.name_or_path={model_dir}",
              "model.compute_dtype=bfloat16", "model.gradient_checkpointing=true", "data.max_prompt_tokens=512",
              "rollout.max_new_tokens=512", "rollout.batch_size=64", "rollout.group_size=8"]
    proc = lens_dry_run(*common, "train.micro_batch_size=4", "run.gpu_memory_gb=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    memory = json.loads(proc.stdout)["memory"]
    assert memory["fits"] is True and memory["gpu_memory_source"] == "run.gpu_memory_gb"
    assert memory["model"]["source"] == str(model_dir / "config.json")
    assert not (tmp_path / "runs").exists()  # wrote nothing

    proc = lens_dry_run(*common, "train.micro_batch_size=16", "run.gpu_memory_gb=8", "--world-size", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    printed = json.loads(proc.stdout)["memory"]  # the plan is printed before the refusal
    assert printed["fits"] is False and printed["world_size"] == 2
    assert "ddp_gradient_buckets" in printed["phases"]["update"]
    assert "train.micro_batch_size" in proc.stderr and "more than the GPU's 8.0 GiB" in proc.stderr
