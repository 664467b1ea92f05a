"""GRPO and LENS advantages (lens.estimators): the worked example of LENS.md and properties that must always
hold; the registry every list of algorithms derives from."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens import estimators
from lens.estimators import compute_advantages
from lens.estimators.groups import group_stats
from lens.estimators.grpo import grpo_advantages
from lens.estimators.lens import calibrated_rewards, lens_advantages
from lens.params import TrainParams


def worked_example():
    pbar = torch.tensor([0.9, 0.8, 0.6] + [0.7] * 13, dtype=torch.float64)
    return torch.zeros(1, 16), pbar.log().unsqueeze(0)


def test_lens_worked_example_from_the_paper_notes():
    correct, mean_logprob = worked_example()
    r_tilde = calibrated_rewards(correct, mean_logprob)[0]
    expected_r = [-0.0625, -0.05, -0.03125] + [-0.7 / 16 / (1.8 - 0.7)] * 13
    assert torch.allclose(r_tilde, torch.tensor(expected_r, dtype=torch.float64), atol=1e-12)
    assert r_tilde[3].item() == pytest.approx(-0.03977, abs=1e-5)

    adv = lens_advantages(correct, mean_logprob, alpha=0.25)[0]
    assert adv[0].item() == pytest.approx(-0.00530, abs=1e-5)
    assert adv[1].item() == pytest.approx(-0.00218, abs=1e-5)
    assert adv[2].item() == pytest.approx(+0.00251, abs=1e-5)
    assert torch.allclose(adv[3:], torch.full((13,), 0.00038), atol=1e-5)
    # Centred: the negative group's advantages sum to zero.
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-7)


def test_grpo_is_zero_on_the_worked_example_and_lens_alpha_scales_linearly():
    correct, mean_logprob = worked_example()
    assert torch.all(grpo_advantages(correct) == 0)
    a1 = lens_advantages(correct, mean_logprob, alpha=0.25)
    a2 = lens_advantages(correct, mean_logprob, alpha=0.5)
    assert torch.allclose(a2, 2 * a1)


def test_grpo_mixed_group_uses_unbiased_std():
    correct = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    adv = grpo_advantages(correct, eps=0.0)[0]
    r = correct[0]
    expected = (r - r.mean()) / r.std(unbiased=True)
    assert torch.allclose(adv, expected)
    assert adv[0].item() == pytest.approx(0.75 / math.sqrt(0.25), rel=1e-6)


def test_dr_grpo_centring_only():
    correct = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(grpo_advantages(correct, scale_std=False)[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_mixed_group_difficulty_uses_importance_estimate_when_larger():
    # One correct answer of confidence 0.05 in a group of 4: D_imp = 4 * 0.05 = 0.2 > 2 * max pbar = 0.16.
    pbar = torch.tensor([[0.05, 0.08, 0.06, 0.07]], dtype=torch.float64)
    correct = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    d_imp = 1.0 / ((1.0 / 4) * (1.0 / 0.05))
    assert d_imp > 2 * 0.08
    r_tilde = calibrated_rewards(correct, pbar.log())[0]
    expected_wrong = -(1 / 4) * pbar[0, 1:] / (d_imp - pbar[0, 1:])
    assert torch.allclose(r_tilde[1:], expected_wrong)
    assert r_tilde[0].item() == 1.0


def test_ablation_switches_fall_back_to_grpo():
    correct = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mean_logprob = torch.log(torch.tensor([[0.5, 0.9, 0.2, 0.4], [0.3, 0.6, 0.1, 0.2], [0.5, 0.5, 0.5, 0.5]]))
    grpo = grpo_advantages(correct)
    only_neg = lens_advantages(correct, mean_logprob, mixed_groups=False)
    only_mixed = lens_advantages(correct, mean_logprob, negative_groups=False)
    neither = lens_advantages(correct, mean_logprob, mixed_groups=False, negative_groups=False)
    assert torch.allclose(neither, grpo)
    assert torch.allclose(only_neg[0], grpo[0]) and not torch.allclose(only_neg[1], grpo[1])
    assert torch.allclose(only_mixed[1], grpo[1]) and not torch.allclose(only_mixed[0], grpo[0])


def test_group_stats_and_dispatch():
    correct = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    stats = group_stats(correct)
    assert (stats.frac_all_correct, stats.frac_all_wrong, stats.frac_mixed) == (0.25, 0.5, 0.25)
    lp = torch.full((4, 2), -1.0)
    assert torch.equal(compute_advantages(TrainParams(algo="grpo"), correct, lp), grpo_advantages(correct))
    lens = compute_advantages(TrainParams(algo="lens", lens={"alpha": 0.5}), correct, lp)
    assert torch.equal(lens, lens_advantages(correct, lp, alpha=0.5))
    assert torch.equal(compute_advantages(TrainParams(algo="grpo", grpo={"scale_std": False}), correct, lp),
                       grpo_advantages(correct, scale_std=False))
    with pytest.raises(ValueError, match="train.algo"):
        estimators.get("ppo")


def test_registry_lists_the_estimators_and_a_registered_one_is_usable_by_name():
    assert estimators.names()[:2] == ("grpo", "lens")

    @estimators.register("test-ones", summary="every sample gets advantage 1")
    def ones(correct, mean_logprob, section, eps):
        return torch.ones_like(correct)

    try:
        assert "test-ones" in estimators.names()
        params = TrainParams(algo="test-ones")
        assert torch.equal(compute_advantages(params, torch.zeros(2, 3), torch.zeros(2, 3)), torch.ones(2, 3))
        with pytest.raises(ValueError, match="already registered"):
            estimators.register("test-ones")(lambda *a: None)
    finally:
        estimators.unregister("test-ones")
    with pytest.raises(ValueError, match="unknown estimator"):
        TrainParams(algo="test-ones")


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="binary"):
        grpo_advantages(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        lens_advantages(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="G = 2"):
        grpo_advantages(torch.zeros(3, 1))


def test_extremely_unlikely_responses_stay_finite():
    correct = torch.zeros(1, 4)
    adv = lens_advantages(correct, torch.full((1, 4), -5000.0))
    assert torch.all(torch.isfinite(adv))


# ---- properties -------------------------------------------------------------------------------------
G_SIZES = st.integers(min_value=2, max_value=16)


@st.composite
def groups(draw, kind="any"):
    g = draw(G_SIZES)
    if kind == "negative":
        r = [0.0] * g
    elif kind == "positive":
        r = [1.0] * g
    elif kind == "mixed":
        k = draw(st.integers(1, g - 1))
        r = [1.0] * k + [0.0] * (g - k)
    else:
        r = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=g, max_size=g))
    pbar = draw(st.lists(st.floats(0.01, 0.99), min_size=g, max_size=g))
    return torch.tensor([r]), torch.tensor([pbar], dtype=torch.float64).log()


@settings(max_examples=200, deadline=None)
@given(groups(kind="negative"))
def test_property_grpo_zero_on_negative_groups(group):
    correct, _ = group
    assert torch.all(grpo_advantages(correct) == 0)


@settings(max_examples=200, deadline=None)
@given(groups(kind="positive"))
def test_property_all_correct_groups_get_zero(group):
    correct, lp = group
    assert torch.all(grpo_advantages(correct) == 0)
    assert torch.all(lens_advantages(correct, lp) == 0)


@settings(max_examples=300, deadline=None)
@given(groups(kind="mixed"))
def test_property_lens_every_wrong_below_every_right_in_mixed_groups(group):
    correct, lp = group
    adv = lens_advantages(correct, lp)[0]
    right, wrong = adv[correct[0] == 1], adv[correct[0] == 0]
    assert wrong.max() < right.min()
    assert torch.all(right > 0) and torch.all(wrong < 0)


@settings(max_examples=300, deadline=None)
@given(groups(kind="any"))
def test_property_more_confident_wrong_answers_get_more_negative_advantage(group):
    correct, lp = group
    adv = lens_advantages(correct, lp)[0]
    r_tilde = calibrated_rewards(correct, lp)[0]
    assert torch.all(r_tilde <= 1) and torch.all(r_tilde >= -1.0 / correct.shape[1] - 1e-12)
    wrong = (correct[0] == 0).nonzero().flatten().tolist()
    for i in wrong:
        for j in wrong:
            if lp[0, i] > lp[0, j] + 1e-9:
                assert adv[i] <= adv[j] + 1e-7
                assert r_tilde[i] < r_tilde[j]


def test_lens_scale_std_false_centres_mixed_groups_without_dividing():
    correct = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    lp = torch.log(torch.tensor([[0.5, 0.4, 0.2, 0.1], [0.9, 0.8, 0.6, 0.7]], dtype=torch.float64))
    r_tilde = calibrated_rewards(correct, lp)
    centred = (r_tilde - r_tilde.mean(dim=1, keepdim=True)).to(torch.float32)
    adv = lens_advantages(correct, lp, scale_std=False)
    assert torch.allclose(adv[0], centred[0], atol=1e-7)                      # mixed: centring only
    assert torch.allclose(adv[1], 0.25 * centred[1], atol=1e-7)               # negative: unchanged
    assert not torch.allclose(lens_advantages(correct, lp)[0], adv[0])         # the default divides
    fallback = lens_advantages(correct, lp, mixed_groups=False, scale_std=False)[0]
    assert torch.allclose(fallback, grpo_advantages(correct, scale_std=False)[0])
    via_params = compute_advantages(TrainParams(algo="lens", lens={"scale_std": False}), correct, lp)
    assert torch.equal(via_params, adv)
