"""The tiny model's tokenizer and checkpoints load with plain transformers, and the warm start learns."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lens.params import load_params
from lens.tiny_model import build_char_tokenizer, build_tiny_model, save_model
from lens.warm_start import warm_start

TEXTS = [
    "Q: 12 + 345 =\nA: \\boxed{357}",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n{nested {braces}} ~`!@#$%^&*()_-=[]|;:'\",.<>/?",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)
    directory = save_model(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")
    return model, directory


def test_tokenizer_is_one_token_per_character_without_bos(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.bos_token_id is None
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 3
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == 3 + 100  # specials + string.printable ("\n" is already in it)


def test_eos_is_one_special_token_that_decoding_can_skip(tokenizer):
    ids = tokenizer("12<|endoftext|>")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12"


def test_saved_tokenizer_reloads_with_auto_tokenizer_and_round_trips(saved, tokenizer):
    _, directory = saved
    reloaded = AutoTokenizer.from_pretrained(directory)
    assert len(reloaded) == len(tokenizer)
    assert reloaded.padding_side == "left"
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    for text in TEXTS:
        ids = reloaded(text)["input_ids"]
        assert ids == tokenizer(text)["input_ids"]
        assert reloaded.decode(ids) == text
    batch = reloaded(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [reloaded.pad_token_id] * 2  # left padding survives the reload


def test_saved_model_is_safetensors_and_reloads_with_identical_logits(saved, tokenizer):
    model, directory = saved
    assert (directory / "model.safetensors").exists()
    assert not (directory / "pytorch_model.bin").exists()
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert reloaded.config.model_type == "qwen2" and reloaded.config.tie_word_embeddings
    assert reloaded.dtype == torch.float32
    generation = GenerationConfig.from_pretrained(directory)
    assert generation.eos_token_id == tokenizer.eos_token_id and generation.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer("Q: 1 + 2 =\nA: ")["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_save_model_replaces_an_existing_directory(tmp_path, tokenizer):
    a = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=1)
    b = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=2)
    save_model(a, tokenizer, tmp_path / "model")
    (tmp_path / "model" / "stale.txt").write_text("x")
    save_model(b, tokenizer, tmp_path / "model")
    assert not (tmp_path / "model" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(reloaded.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_model_init_depends_only_on_the_seed(tokenizer):
    sizes = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    a, b, c = (build_tiny_model(tokenizer, **sizes, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # tied


def test_short_warm_start_reduces_the_loss_and_writes_its_outputs(tmp_path):
    params = load_params(overrides=[
        f"run.output_root={tmp_path}",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64",
        "data.levels=[1,2]", "data.synthetic.train_per_level=200", "data.synthetic.eval_per_level=4",
        "warm_start.steps=30", "warm_start.batch_size=16", "warm_start.lr=3e-3",
        "rollout.max_new_tokens=8",
    ])
    report = warm_start(params, eval_problems_per_level=4, eval_samples=2, progress=False)

    assert report["steps"] == 30 and not report["stopped_by_time_limit"]
    assert report["final_loss"] < 0.8 * report["initial_loss"]
    assert set(report["accuracy_per_level"]) == {"1", "2"}
    assert set(report["eval_problems_per_level"]) == {"1", "2"}
    assert all(1 <= n <= 4 for n in report["eval_problems_per_level"].values())
    assert all(0.0 <= acc <= 1.0 for acc in report["accuracy_per_level"].values())
    assert json.loads((params.warm_start_dir / "warm_start.json").read_text()) == report
    model_dir = params.warm_start_dir / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.hidden_size == 32


def test_warm_start_stops_at_its_time_limit(tmp_path):
    params = load_params(overrides=[
        f"run.output_root={tmp_path}",
        "model.tiny.hidden_size=16", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=32",
        "data.levels=[1]", "data.synthetic.train_per_level=50", "data.synthetic.eval_per_level=2",
        "warm_start.steps=100000", "warm_start.batch_size=8", "warm_start.max_minutes=0.01",
        "rollout.max_new_tokens=4",
    ])
    report = warm_start(params, tmp_path / "ws", eval_problems_per_level=2, eval_samples=1, progress=False)
    assert report["stopped_by_time_limit"] and 0 < report["steps"] < 100000
    assert (tmp_path / "ws" / "warm_start.json").exists() and (tmp_path / "ws" / "model").is_dir()
