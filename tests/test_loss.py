"""The clipped policy-gradient loss: clipping, aggregation, KL, micro-batch normalisation."""

import pytest
import torch

from lens.loss import k3_kl, policy_loss, token_logprobs_and_entropy


def test_on_policy_gradient_is_minus_advantage_times_score():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2))
    out.loss.backward()
    # seq-mean-token-mean: d/dlogp of -A * exp(logp - old) / T at ratio 1 = -A / T
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))
    assert out.clip_frac.item() == 0.0 and out.kl.item() == pytest.approx(0.0)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    old = torch.zeros(1, 3)
    # ratios e^0.5 (above 1.2) for positive advantage: clipped, no gradient; e^-0.5 below 0.8: unclipped.
    logp = torch.tensor([[0.5, -0.5, 0.1]], requires_grad=True)
    out = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), clip_low=0.2, clip_high=0.2)
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() != 0.0 and logp.grad[0, 2].item() != 0.0
    assert out.clip_frac.item() == pytest.approx(1 / 3)


def test_clip_high_is_separate_from_clip_low():
    old = torch.zeros(1, 1)
    logp = torch.tensor([[0.24]], requires_grad=True)  # ratio 1.271
    policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28).loss.backward()
    assert logp.grad.item() != 0.0
    logp.grad = None
    policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.2).loss.backward()
    assert logp.grad.item() == 0.0


def test_aggregations_differ_on_unequal_lengths_and_respect_the_mask():
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    adv = torch.tensor([1.0, 0.0])
    seq = policy_loss(logp, logp, adv, mask, loss_agg="seq-mean-token-mean").loss
    tok = policy_loss(logp, logp, adv, mask, loss_agg="token-mean").loss
    assert seq.item() == pytest.approx(-0.5)     # (-1 + 0) / 2 sequences
    assert tok.item() == pytest.approx(-1 / 5)   # -1 over 5 tokens
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(logp, logp, adv, mask, loss_agg="sum")


def test_micro_batches_with_a_global_normalizer_equal_the_full_batch():
    torch.manual_seed(0)
    logp = torch.randn(6, 5)
    old = logp + 0.1 * torch.randn(6, 5)
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    for agg in ["seq-mean-token-mean", "token-mean"]:
        full = policy_loss(logp, old, adv, mask, loss_agg=agg).loss
        norm = 6 if agg == "seq-mean-token-mean" else mask.sum()
        parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], loss_agg=agg, normalizer=norm).loss
                    for s in [slice(0, 2), slice(2, 6)])
        assert torch.allclose(full, parts, atol=1e-6)


def test_kl_penalty_needs_reference_and_is_k3():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-1.5]])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), kl_beta=0.1)
    out = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), kl_beta=0.1, ref_logprobs=ref)
    expected = torch.exp(torch.tensor(-0.5)) + 0.5 - 1
    assert out.kl.item() == pytest.approx(expected.item())
    assert out.loss.item() == pytest.approx(0.1 * expected.item())
    assert torch.all(k3_kl(torch.randn(10), torch.randn(10)) >= 0)


def test_token_logprobs_apply_temperature_and_entropy_is_correct():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    targets = torch.tensor([[0]])
    lp, ent = token_logprobs_and_entropy(logits, targets, temperature=2.0)
    p = torch.softmax(logits / 2.0, dim=-1)
    assert lp.item() == pytest.approx(torch.log(p[0, 0, 0]).item())
    assert ent.item() == pytest.approx(-(p * p.log()).sum().item())


def test_dual_clip_bounds_the_loss_of_negative_advantages_only():
    old = torch.zeros(2, 1)
    logp = torch.tensor([[3.0], [3.0]], requires_grad=True)  # ratio e^3 ~ 20: far outside the trust region
    adv = torch.tensor([-1.0, 1.0])
    plain = policy_loss(logp, old, adv, torch.ones(2, 1), loss_agg="token-mean", normalizer=1.0)
    dual = policy_loss(logp, old, adv, torch.ones(2, 1), loss_agg="token-mean", normalizer=1.0, dual_clip_c=3.0)
    # A = -1: max(20.1, 1.2) = 20.1 without it, min(20.1, 3) = 3 with it; A = +1: -1.2 either way.
    assert plain.loss.item() == pytest.approx(torch.exp(torch.tensor(3.0)).item() - 1.2, rel=1e-5)
    assert dual.loss.item() == pytest.approx(3.0 - 1.2, rel=1e-5)
    dual.loss.backward()
    assert logp.grad[0, 0].item() == 0.0  # the bounded branch is a constant


def test_importance_weights_scale_each_tokens_loss_without_a_gradient_of_their_own():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    weights = torch.tensor([[2.0, 0.5]], requires_grad=True)
    out = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), is_weights=weights)
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -0.25]]))  # -A * w / T per token
    assert weights.grad is None
