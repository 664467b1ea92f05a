"""Rollout engines: the registry that `rollout.engine` names, and the HF engine's grouping, EOS handling,
and log-probs that agree with the trainer's forward."""

import subprocess
import sys

import pytest
import torch

import lens.rollout.base
from lens.loss import token_logprobs_and_entropy
from lens.models import load_policy
from lens.params import PROJECT_ROOT, ParamsError
from lens.rollout import (HFEngine, Rollout, SamplingConfig, cut_at_eos, engine_names, make_engine,
                          register_engine)
from tests.helpers import random_policy, small_params


class FixedEngine:
    """A toy engine: every sample is the same one-token completion."""

    def __init__(self, params, model, tokenizer, synced_gpus=False):
        self.params, self.model = params, model

    def generate(self, prompts, n, sampling):
        return [Rollout(prompt_index=i, prompt_ids=[], completion_ids=[7], text="42", logprobs=[0.0],
                        truncated=False) for i in range(len(prompts)) for _ in range(n)]

    def sync_weights(self, model):
        self.model = model

    def close(self):
        pass


@pytest.fixture
def fresh_registry(monkeypatch):
    """Engines registered by a test disappear after it."""
    monkeypatch.setattr(lens.rollout.base, "_ENGINES", dict(lens.rollout.base._ENGINES))


def test_a_registered_engine_is_selected_by_rollout_engine(tmp_path, fresh_registry):
    register_engine("fixed", FixedEngine)
    assert engine_names() == ("hf", "vllm", "fixed")
    params = small_params(tmp_path, "rollout.engine=fixed")
    engine = make_engine(params, "the model", "the tokenizer")
    assert isinstance(engine, FixedEngine) and engine.model == "the model"
    assert [r.prompt_index for r in engine.generate(["a", "b"], 3, SamplingConfig())] == [0, 0, 0, 1, 1, 1]


def test_an_unknown_engine_fails_naming_the_key_and_the_registered_engines(tmp_path):
    with pytest.raises(ParamsError) as err:
        small_params(tmp_path, "rollout.engine=foo")
    assert "rollout.engine: " in str(err.value)
    assert "unknown rollout engine 'foo'; registered engines: hf, vllm" in str(err.value)


def test_the_default_engine_is_hf_built_from_the_rollout_params(tmp_path):
    params = small_params(tmp_path, "rollout.batch_size=6")
    random_policy(params)
    model, tok = load_policy(params)
    engine = make_engine(params, model, tok, synced_gpus=True)
    assert params.rollout.engine == "hf"
    assert isinstance(engine, HFEngine) and engine.batch_size == 6 and engine.synced_gpus


def test_validating_the_engine_name_imports_no_engine():
    """params validation lists the engines: that must not cost a transformers or vllm import."""
    code = ("import sys, lens.params; from lens.rollout import engine_names; print(*engine_names()); "
            "print(*[m for m in ('transformers', 'vllm', 'lens.rollout.hf', 'lens.rollout.vllm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["hf vllm", ""]


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 9], [0.1, 0.2, 0.3, 0.4], {2}) == ([5, 6, 2], [0.1, 0.2, 0.3], False)
    assert cut_at_eos([5, 6], [0.1, 0.2], {2}) == ([5, 6], [0.1, 0.2], True)


def _engine(tmp_path, batch_size=256):
    params = small_params(tmp_path)
    random_policy(params)
    model, tok = load_policy(params)
    return params, model, tok, HFEngine(model, tok, batch_size=batch_size)


def test_generate_groups_samples_and_reports_per_token_logprobs(tmp_path):
    params, model, tok, engine = _engine(tmp_path, batch_size=6)  # forces several chunks
    prompts = ["Q: 1+2\nA: ", "Q: 35+17\nA: ", "Q: 9*9\nA: "]
    out = engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=0))
    assert [r.prompt_index for r in out] == [0] * 4 + [1] * 4 + [2] * 4
    for r in out:
        assert tok.decode(r.prompt_ids) == prompts[r.prompt_index]
        assert len(r.logprobs) == len(r.completion_ids) >= 1
        assert all(lp <= 0 for lp in r.logprobs)
        assert r.truncated == (tok.eos_token_id not in r.completion_ids)
        assert r.truncated or r.completion_ids[-1] == tok.eos_token_id
        assert len(r.completion_ids) <= 8
    # A random policy rarely emits EOS within 8 tokens, so most completions are truncated.
    assert any(r.truncated for r in out)


def test_same_seed_same_samples_different_seed_differs(tmp_path):
    _, _, _, engine = _engine(tmp_path)
    cfg = SamplingConfig(max_new_tokens=8, seed=123)
    a = engine.generate(["Q: 1+1\nA: "], 4, cfg)
    b = engine.generate(["Q: 1+1\nA: "], 4, cfg)
    c = engine.generate(["Q: 1+1\nA: "], 4, SamplingConfig(max_new_tokens=8, seed=124))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


def test_rollout_logprobs_agree_with_the_trainer_forward_pass(tmp_path):
    """Otherwise the PPO ratio is not 1 on-policy and the clipped loss is wrong from the first update."""
    _, model, tok, engine = _engine(tmp_path)
    prompts = ["Q: 1+2\nA: ", "Q: 35+17-4\nA: "]  # different lengths: left padding in generate
    # top_p < 1 samples from the truncated distribution but reports the tempered full one (module docstring):
    # this also checks that the log-probs are recorded before transformers' warpers touch the scores.
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.5)):
        out = engine.generate(prompts, 3, SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=8,
                                                         seed=1))
        for r in out:
            seq = torch.tensor([r.prompt_ids + r.completion_ids])
            with torch.no_grad():
                logits = model(input_ids=seq).logits[:, :-1]
            lp, _ = token_logprobs_and_entropy(logits, seq[:, 1:], temperature)
            trainer_lp = lp[0, len(r.prompt_ids) - 1:]
            assert torch.allclose(trainer_lp, torch.tensor(r.logprobs), atol=1e-4), (trainer_lp, r.logprobs)


def test_with_a_chat_template_the_engine_also_stops_at_the_end_of_turn_token():
    """Qwen2.5 base lists only <|endoftext|> as EOS; its ChatML turns end with <|im_end|>, where a completion
    must end too (otherwise the model writes the next turn and the verifier reads its numbers)."""
    from lens.data import Problem, render_prompt
    from lens.params import PromptParams
    from lens.tiny_model import build_tiny_model
    from tests.test_prompt import chatml_tokenizer

    tok = chatml_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    # A policy that always ends its turn at once: logits are a bias on <|im_end|>.
    model.lm_head = torch.nn.Linear(32, len(tok), bias=True)
    torch.nn.init.zeros_(model.lm_head.weight)
    with torch.no_grad():
        model.lm_head.bias.zero_()[im_end] = 50.0
    engine = HFEngine(model, tok)
    assert engine.eos_ids == {tok.eos_token_id, im_end}
    prompt = render_prompt(Problem("p", "1+2", "3", 1, "arithmetic"), tok, PromptParams(template="chat"))
    out = engine.generate([prompt], 2, SamplingConfig(max_new_tokens=8, seed=0))
    assert [(r.completion_ids, r.truncated, r.text) for r in out] == [([im_end], False, "")] * 2
