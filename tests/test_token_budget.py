"""Training on long completions without the memory blow-up: micro-batches by a token budget
(`train.micro_batch_tokens`) and log-probs of completion positions only, the lm_head applied in chunks
(`train.logprob_chunk_tokens`). Both change how the update is computed, never what: the loss and gradients of
a mini-batch equal the default path's (float32 on the CPU; they differ by summation order only:
GRAD_RTOL of the largest gradient entry), whatever the split."""

from __future__ import annotations

import pytest
import torch

from lens.collate import token_budget_split
from lens.logprobs import chunked_logprobs, completion_logprobs
from lens.loss import token_logprobs_and_entropy
from lens.tiny_model import build_char_tokenizer, build_tiny_model
from lens.train import Trainer
from tests.helpers import random_policy, small_params, synthetic_data

GRAD_RTOL = 1e-5   # measured: < 4e-7 of the largest entry (float32 sums in another order)
LOGP_ATOL = 1e-6


def _model():
    return build_tiny_model(build_char_tokenizer(), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _batch():
    """Three rows of unequal prompts and completions, one right-padded, one completion a single token."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 24), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 15:] = 0
    mask = torch.zeros(3, 23)
    mask[0, 5:23], mask[1, 3:14], mask[2, 10:11] = 1, 1, 1
    return ids, attention, mask


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_grads_close(a: dict, b: dict):
    scale = max(g.abs().max().item() for g in a.values())
    assert scale > 0
    for name, grad in a.items():
        assert (grad - b[name]).abs().max().item() <= GRAD_RTOL * scale, name


@pytest.mark.parametrize("chunk, temperature", [(1, 1.0), (7, 0.6), (4096, 1.3)])
def test_chunked_completion_logprobs_equal_the_full_logits_values_and_gradients(chunk, temperature):
    model = _model()
    ids, attention, mask = _batch()
    full_lp, full_ent = token_logprobs_and_entropy(
        model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:], temperature)
    weights = torch.linspace(-1, 1, mask.numel()).view_as(mask)  # a loss that weighs every token differently
    (full_lp * mask * weights).sum().backward()
    expected = _grads(model)

    lp, ent = completion_logprobs(model, ids, attention, mask, temperature, chunk, with_entropy=True)
    assert lp.shape == ent.shape == mask.shape
    assert torch.allclose(lp, full_lp * mask, atol=LOGP_ATOL, rtol=0) and (lp[mask == 0] == 0).all()
    assert torch.allclose(ent, full_ent * mask, atol=LOGP_ATOL, rtol=0)
    (lp * mask * weights).sum().backward()
    _assert_grads_close(expected, _grads(model))


def test_entropy_is_a_diagnostic_without_gradient_and_the_head_never_sees_all_positions():
    model = _model()
    ids, attention, mask = _batch()
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    lp, ent = completion_logprobs(model, ids, attention, mask, 1.0, 4, with_entropy=True)
    assert lp.requires_grad and not ent.requires_grad and ent.grad_fn is None
    assert seen == [(3, 0, 32)]  # the model's own head call ran on zero positions: no [B, T, V] logits
    hidden = torch.randn(10, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True)
    _, ent = chunked_logprobs(hidden, weight, None, torch.randint(0, 100, (10,)), 1.0, 3, with_entropy=True)
    assert not ent.requires_grad


def test_no_completion_token_still_runs_a_backward_pass():
    """A micro-batch without completion tokens must still reach the weights (DDP expects every backward)."""
    model = _model()
    ids, attention, mask = _batch()
    lp, _ = completion_logprobs(model, ids, attention, torch.zeros_like(mask), 1.0, 4)
    assert (lp == 0).all() and lp.requires_grad
    (lp * 0).sum().backward()
    assert all(g.abs().max() == 0 for g in _grads(model).values() if g is not None)


def test_models_that_post_process_logits_are_refused_naming_the_key():
    model = _model()
    model.config.final_logit_softcapping = 30.0
    ids, attention, mask = _batch()
    with pytest.raises(ValueError, match=r"train\.logprob_chunk_tokens.*final_logit_softcapping"):
        completion_logprobs(model, ids, attention, mask, 1.0, 4)


@pytest.mark.parametrize("budget", [1, 50, 100, 240, 10_000])
def test_token_budget_micro_batches_stay_under_the_budget_and_cover_each_sequence_once(budget):
    lengths = dict(zip(range(20), torch.randint(5, 120, (20,), generator=torch.Generator().manual_seed(1)).tolist()))
    for min_count in (1, 7, 20, 30):
        micro = token_budget_split(lengths, budget, min_count)
        assert sorted(i for m in micro for i in m) == list(range(20))
        assert len(micro) >= min(min_count, 20)
        for m in micro:  # padded size: rows x longest row; only a sequence alone may exceed the budget
            assert len(m) * max(lengths[i] for i in m) <= budget or len(m) == 1
        assert micro == token_budget_split(dict(reversed(lengths.items())), budget, min_count)  # order-free
    if budget >= 10_000:
        assert token_budget_split(lengths, budget) == [sorted(lengths, key=lambda i: (-lengths[i], i))]


def _trainer(tmp_path, *extra) -> Trainer:
    params = small_params(tmp_path, "train.algo=lens", "train.mini_batch_size=16", "train.micro_batch_size=16",
                          "rollout.max_new_tokens=24", *extra)
    random_policy(params)
    synthetic_data(params)
    return Trainer(params)


def _one_update(trainer, scored, micro_batch_tokens, chunk):
    """(metrics, gradients, micro-batches) of one update from the trainer's weights, which are then restored."""
    trainer.params.train.micro_batch_tokens = micro_batch_tokens
    trainer.params.train.logprob_chunk_tokens = chunk
    model = trainer.unwrapped_model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    hook = trainer.optimizer.optimizer.register_step_pre_hook(
        lambda *_: grads.append({n: p.grad.clone() for n, p in model.named_parameters()}))
    splits = []
    real_split = trainer._micro_batches
    trainer._micro_batches = lambda rollouts, idx: splits.append(real_split(rollouts, idx)) or splits[-1]
    try:
        metrics = trainer.update(scored)
    finally:
        hook.remove()
        del trainer._micro_batches
        model.load_state_dict(start)
    assert len(grads) == 1 and len(splits) == 1
    return metrics, grads[0], splits[0]


@pytest.mark.parametrize("extra", [
    [],                                                                   # seq-mean-token-mean, the paper's
    ["train.loss_agg=token-mean", "train.kl_beta=0.01"],                  # the reference model's path too
    ["train.recompute_old_logprobs=true", "train.rollout_correction=tis", "train.lens.penalty=token"],
])
def test_a_token_budgeted_chunked_update_equals_the_default_update_however_it_is_split(tmp_path, extra):
    trainer = _trainer(tmp_path, *extra)
    try:
        scored = trainer.score(trainer.rollout(0))
        rollouts = scored.batch.rollouts
        lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
        assert len(set(lengths)) > 3 and (scored.advantages != 0).any()
        reference, expected, split = _one_update(trainer, scored, None, None)
        assert len(split) == 1 and len(split[0]) == 16  # micro_batch_size 16: the whole mini-batch at once
        for budget, chunk in [(2 * max(lengths), 16), (4 * max(lengths), 5), (max(lengths) - 1, 1000)]:
            metrics, grads, split = _one_update(trainer, scored, budget, chunk)
            assert len(split) > 1  # the normaliser really spans several micro-batches
            assert all(len(m) * max(lengths[i] for i in m) <= budget or len(m) == 1 for m in split)
            _assert_grads_close(expected, grads)
            for key in ("train/loss", "train/entropy", "train/kl", "train/clip_frac", "train/grad_norm"):
                assert metrics[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key
    finally:
        trainer.close()


def test_recomputed_old_logprobs_come_back_in_rollout_order_under_a_token_budget(tmp_path):
    trainer = _trainer(tmp_path)
    try:
        rollouts = trainer.rollout(0).rollouts
        expected = trainer.recompute_old_logprobs(rollouts)
        trainer.params.train.micro_batch_tokens = 3 * max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
        trainer.params.train.logprob_chunk_tokens = 8
        got = trainer.recompute_old_logprobs(rollouts)
        assert [g.shape for g in got] == [e.shape for e in expected] == [(len(r.completion_ids),) for r in rollouts]
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, atol=LOGP_ATOL, rtol=0)
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_two_processes_under_a_token_budget_match_one_process_on_the_default_path(backend, tmp_path):
    """Ranks split their halves of a mini-batch into different numbers of micro-batches by the budget, then
    agree on one count: a rank running fewer forward passes would leave FSDP's all-gathers (and DDP's buffer
    syncs) waiting. The run must finish and train as one process with micro_batch_size does."""
    from lens import cli
    from tests.test_multiprocess import (ATOL_LOGPROB, EQUIVALENCE_ARGS, RTOL_TRAIN, _setup, accelerate_launch,
                                         install_group_seeded_engine, metrics_rows, probe_logprobs)

    args = [*EQUIVALENCE_ARGS, "train.steps=2"]
    # At 70 tokens the ranks' first halves split into 3 and 4 micro-batches (measured; without agreeing on a
    # count, FSDP hangs); chunks of 3 positions.
    budget = ["train.micro_batch_tokens=70", "train.logprob_chunk_tokens=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    _setup(one)
    with pytest.MonkeyPatch.context() as mp:
        install_group_seeded_engine(mp.setattr)
        assert cli.main([*args, f"run.output_root={one}"]) == 0
    _setup(two)
    seam = ["--fsdp-on-cpu"] if backend == "fsdp" else []
    accelerate_launch("tests.test_multiprocess", [*seam, *args, *budget, f"run.output_root={two}"])
    out1, out2 = one / "tiny" / "lens", two / "tiny" / "lens"
    rows1, rows2 = metrics_rows(out1), metrics_rows(out2)
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2]
    for r1, r2 in zip(rows1, rows2):
        for key in ("train/loss", "train/entropy", "train/grad_norm"):
            assert r1[key] == pytest.approx(r2[key], rel=RTOL_TRAIN, abs=1e-9), (key, r1[key], r2[key])
    probe = [f"Q: {i}+{j}=?\nA: \\boxed{{{i + j}}}" for i, j in [(1, 2), (3, 4), (12, 30)]]
    diff = (probe_logprobs(out1 / "final", probe) - probe_logprobs(out2 / "final", probe)).abs().max().item()
    assert diff <= ATOL_LOGPROB, diff
