"""The other ways of learning from all-wrong groups (Dr.GRPO, NSR, W-REINFORCE, NGRPO, unlikeliness reward)
and the LENS variants (D(q) on negative groups, per-token penalty): each on an example worked by hand in
the comments, then properties every estimator of the registry must keep."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens import estimators
from lens.estimators import compute_advantages
from lens.estimators.grpo import grpo_advantages
from lens.estimators.lens import lens_advantages
from lens.estimators.lens_token import token_advantages, token_advantages_for_rollouts
from lens.estimators.negative_reinforcement import weighted_reinforce_advantages
from lens.estimators.unlikeliness import likelihood_ranks
from lens.loss import policy_loss
from lens.params import ParamsError, TrainParams, load_params

NEW = ("drgrpo", "nsr", "w_reinforce", "ngrpo", "unlikeliness")


def adv(algo, correct, mean_logprob=None, **sections):
    correct = torch.as_tensor(correct, dtype=torch.float32)
    lp = torch.full(correct.shape, -1.0, dtype=torch.float64) if mean_logprob is None else mean_logprob
    return compute_advantages(TrainParams(algo=algo, **sections), correct, lp)


def test_the_new_estimators_are_registered_after_grpo_and_lens_with_their_sections():
    assert estimators.names()[:2] == ("grpo", "lens")
    assert set(NEW) <= set(estimators.names())
    sections = {name: estimators.get(name).section for name in NEW}
    assert sections == {"drgrpo": None, "nsr": None, "w_reinforce": "w_reinforce", "ngrpo": "ngrpo",
                        "unlikeliness": "unlikeliness"}
    assert all(estimators.get(name).summary for name in NEW)


# ---- Dr.GRPO -----------------------------------------------------------------------------------------
def test_drgrpo_centres_without_dividing_and_the_grpo_switch_still_does_the_same():
    # r = [1, 0, 0, 0]: mean 0.25, so A = r - 0.25 = [0.75, -0.25, -0.25, -0.25]; GRPO would divide by
    # std = 0.5 (unbiased) and give [1.5, -0.5, -0.5, -0.5]. All-wrong and all-correct groups: 0.
    correct = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0] * 4, [0.0] * 4])
    assert torch.equal(adv("drgrpo", correct), expected)
    assert torch.equal(adv("grpo", correct, grpo={"scale_std": False}), expected)
    assert torch.allclose(adv("grpo", correct)[0], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)


# ---- NSR and W-REINFORCE ------------------------------------------------------------------------------
def test_nsr_trains_only_on_wrong_answers_with_minus_one():
    # No baseline: a wrong answer gets -1 wherever it is; a correct one 0 (its PSR term is dropped).
    correct = [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(adv("nsr", correct), torch.tensor([[0.0, -1, 0, -1], [-1.0] * 4, [0.0] * 4]))


def test_w_reinforce_weights_correct_answers_by_lambda():
    # lambda = 0.1 (the paper's): +0.1 for a correct answer, -1 for a wrong one, even in an all-correct group.
    correct = [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    expected = torch.tensor([[0.1, -1, 0.1, -1], [-1.0] * 4, [0.1] * 4])
    assert torch.allclose(adv("w_reinforce", correct), expected)
    half = adv("w_reinforce", correct, w_reinforce={"positive_weight": 0.5})
    assert torch.allclose(half[0], torch.tensor([0.5, -1, 0.5, -1]))
    # lambda = 0 is NSR; lambda = 1 is plain REINFORCE on rewards +1 / -1.
    assert torch.equal(adv("w_reinforce", correct, w_reinforce={"positive_weight": 0.0}), adv("nsr", correct))
    assert torch.equal(weighted_reinforce_advantages(torch.tensor(correct), 1.0), 2 * torch.tensor(correct) - 1.0)


# ---- NGRPO --------------------------------------------------------------------------------------------
def test_ngrpo_adds_a_virtual_correct_sample_to_each_groups_statistics():
    # All wrong, G = 4: the statistics are over [0, 0, 0, 0, 1]: mean 0.2, unbiased variance
    # (4 * 0.04 + 0.64) / 4 = 0.2, std 0.44721, so A = -0.2 / 0.44721 = -0.44721 (= -1/sqrt(G + 1)).
    # Mixed [1, 0, 0, 0]: over [1, 0, 0, 0, 1], mean 0.4, variance (2 * 0.36 + 3 * 0.16) / 4 = 0.3, std 0.54772:
    # correct 0.6 / 0.54772 = 1.09545, wrong -0.4 / 0.54772 = -0.73030. All correct: [1 x 5], std 0 -> 0.
    a = adv("ngrpo", [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(a[0], torch.full((4,), -0.44721), atol=1e-5)
    assert a[0, 0].item() == pytest.approx(-1 / math.sqrt(5), abs=1e-5)
    assert torch.allclose(a[1], torch.tensor([1.09545, -0.73030, -0.73030, -0.73030]), atol=1e-5)
    assert torch.equal(a[2], torch.zeros(4))
    # Two virtual samples, all wrong: over [0, 0, 0, 0, 1, 1], mean 1/3, variance (4/9 + 8/9) / 5 = 4/15,
    # std 0.51640, A = -(1/3) / 0.51640 = -0.64550.
    two = adv("ngrpo", [[0, 0, 0, 0]], ngrpo={"virtual_samples": 2})
    assert torch.allclose(two, torch.full((1, 4), -0.64550), atol=1e-5)


def test_asymmetric_clipping_by_advantage_sign_is_clip_low_and_clip_high():
    # NGRPO clips positive-advantage tokens to [1 - eps_pos, 1 + eps_pos] and negative ones to
    # [1 - eps_neg, 1 + eps_neg]; computed here sign by sign, independently of lens.loss. Ratios
    # e^0.22 = 1.2461 and e^-0.18 = 0.8353, eps_pos = 0.24, eps_neg = 0.16: a positive-advantage token at
    # 1.2461 > 1.24 is clipped (no gradient), a negative-advantage one at 0.8353 < 0.84 too; a token moving
    # against its advantage's push (A > 0 down, A < 0 up) is never clipped.
    eps_pos, eps_neg = 0.24, 0.16
    old = torch.zeros(4, 1)
    logp = torch.tensor([[0.22], [-0.18], [-0.18], [0.22]], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = policy_loss(logp, old, advantages, torch.ones(4, 1), clip_low=eps_neg, clip_high=eps_pos)
    out.loss.backward()

    ratio = logp.detach().exp().squeeze(1)
    eps = torch.where(advantages > 0, eps_pos, eps_neg)
    by_sign = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)).mean()
    assert out.loss.item() == pytest.approx(by_sign.item(), abs=1e-7)
    assert logp.grad[0].item() == 0.0 and logp.grad[2].item() == 0.0        # clipped: A > 0 up, A < 0 down
    assert logp.grad[1].item() != 0.0 and logp.grad[3].item() != 0.0
    # The default, 0.2 both ways, lets the negative-advantage token at 0.8353 > 0.8 keep its gradient:
    # the asymmetric setting is stricter on negative advantages.
    logp.grad = None
    policy_loss(logp, old, advantages, torch.ones(4, 1)).loss.backward()
    assert logp.grad[2].item() != 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-1.0, 1.0), st.floats(-3.0, 3.0)), min_size=1, max_size=20),
       st.floats(0.01, 0.5), st.floats(0.01, 0.9))
def test_property_clipping_by_advantage_sign_equals_clip_low_and_clip_high(tokens, eps_pos, eps_neg):
    log_ratio = torch.tensor([[lr for lr, _ in tokens]], dtype=torch.float64)
    a = torch.tensor([[a for _, a in tokens]], dtype=torch.float64)
    ratio = log_ratio.exp()
    eps = torch.where(a > 0, torch.tensor(eps_pos, dtype=torch.float64), torch.tensor(eps_neg, dtype=torch.float64))
    by_sign = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps)).mean()
    out = policy_loss(log_ratio, torch.zeros_like(log_ratio), a, torch.ones_like(a), clip_low=eps_neg, clip_high=eps_pos)
    assert out.loss.item() == pytest.approx(by_sign.item(), abs=1e-12)


# ---- unlikeliness reward ------------------------------------------------------------------------------
def test_unlikeliness_reward_pays_an_unlikely_correct_answer_more():
    # G = 4, beta = 0.25, r = [1, 1, 0, 0], mean log-probs [-0.5, -2.0, -1.0, -3.0]. Ranks, 0 = least likely:
    # [3, 1, 2, 0]. Rewards r (1 - beta rank / G): 1 - 0.25 * 3/4 = 0.8125 and 1 - 0.25 * 1/4 = 0.9375, then 0, 0.
    # Mean 0.4375; deviations [0.375, 0.5, -0.4375, -0.4375]; unbiased variance 0.7734375 / 3 = 0.2578125,
    # std 0.50775: A = [0.73855, 0.98473, -0.86164, -0.86164].
    lp = torch.tensor([[-0.5, -2.0, -1.0, -3.0]], dtype=torch.float64)
    assert torch.equal(likelihood_ranks(lp), torch.tensor([[3.0, 1.0, 2.0, 0.0]], dtype=torch.float64))
    a = adv("unlikeliness", [[1, 1, 0, 0]], lp)
    assert torch.allclose(a, torch.tensor([[0.73855, 0.98473, -0.86164, -0.86164]]), atol=1e-5)
    # beta = 0 is GRPO; all-wrong and all-correct groups carry no signal.
    assert torch.equal(adv("unlikeliness", [[1, 1, 0, 0]], lp, unlikeliness={"rank_penalty": 0.0}),
                       grpo_advantages(torch.tensor([[1.0, 1, 0, 0]])))
    assert torch.equal(adv("unlikeliness", [[0, 0, 0, 0], [1, 1, 1, 1]], lp.repeat(2, 1)), torch.zeros(2, 4))


def test_tied_likelihoods_share_their_mean_rank():
    # [-1, -1, -2]: the -2 is rank 0; the two -1s would be ranks 1 and 2, so each gets 1.5.
    assert torch.equal(likelihood_ranks(torch.tensor([[-1.0, -1.0, -2.0]])),
                       torch.tensor([[1.5, 1.5, 0.0]], dtype=torch.float64))


# ---- LENS: D(q) on negative groups --------------------------------------------------------------------
NEG_PBAR = torch.tensor([[0.8, 0.4, 0.4, 0.4]], dtype=torch.float64)


@pytest.mark.parametrize("lens_params, expected", [
    # twice_max_confidence (the paper): D = 1.6; penalties (1/4) p / (D - p) = 0.25 and 1/12; r~ = [-0.25,
    # -1/12 x 3], mean -0.125, centred [-0.125, 0.041667 x 3], times alpha 0.25: [-0.03125, 0.0104167 x 3].
    ({}, [-0.03125, 0.0104167]),
    # max_confidence_multiple, m = 3: D = 2.4; penalties (1/4) 0.8/1.6 = 0.125 and (1/4) 0.4/2.0 = 0.05;
    # mean -0.06875, centred [-0.05625, 0.01875], times 0.25: [-0.0140625, 0.0046875].
    ({"negative_difficulty": "max_confidence_multiple", "difficulty_multiple": 3.0}, [-0.0140625, 0.0046875]),
    # most_confident_as_correct: D = G max pbar = 3.2; penalties (1/4) 0.8/2.4 = 1/12 and (1/4) 0.4/2.8 = 1/28;
    # mean -1/21, centred [-3/84, 1/84], times 0.25: [-0.00892857, 0.00297619].
    ({"negative_difficulty": "most_confident_as_correct"}, [-0.00892857, 0.00297619]),
])
def test_lens_negative_group_difficulty_rules(lens_params, expected):
    a = adv("lens", [[0, 0, 0, 0]], NEG_PBAR.log(), lens=lens_params)[0]
    assert torch.allclose(a, torch.tensor([expected[0]] + [expected[1]] * 3), atol=1e-7)


def test_lens_difficulty_rules_leave_mixed_groups_and_the_paper_default_unchanged():
    correct = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    lp = torch.log(torch.tensor([[0.5, 0.9, 0.2, 0.4], [0.3, 0.6, 0.1, 0.2]], dtype=torch.float64))
    paper = lens_advantages(correct, lp)
    for rule in ("max_confidence_multiple", "most_confident_as_correct"):
        other = lens_advantages(correct, lp, negative_rule=rule, difficulty_multiple=3.0)
        assert torch.equal(other[0], paper[0]) and not torch.allclose(other[1], paper[1])
    assert torch.equal(lens_advantages(correct, lp, negative_rule="max_confidence_multiple", difficulty_multiple=2.0),
                       paper)
    g2 = torch.tensor([[0.0, 0.0]]), torch.log(torch.tensor([[0.3, 0.7]], dtype=torch.float64))
    assert torch.equal(lens_advantages(*g2, negative_rule="most_confident_as_correct"), lens_advantages(*g2))


def test_lens_variant_params_are_checked_by_key():
    with pytest.raises(ParamsError, match=r"train\.lens\.negative_difficulty"):
        load_params("tiny", ["train.lens.negative_difficulty=three_times"])
    with pytest.raises(ParamsError, match="difficulty_multiple=3.0 has no effect"):
        load_params("tiny", ["train.lens.difficulty_multiple=3"])
    with pytest.raises(ParamsError, match=r"train\.lens\.difficulty_multiple"):
        load_params("tiny", ["train.lens.negative_difficulty=max_confidence_multiple", "train.lens.difficulty_multiple=1"])
    for bad in ("train.w_reinforce.positive_weight=-1", "train.unlikeliness.rank_penalty=1.5",
                "train.ngrpo.virtual_samples=0", "train.lens.penalty=word"):
        with pytest.raises(ParamsError, match=bad.split("=")[0].replace(".", r"\.")):
            load_params("tiny", [bad])
    p = load_params("tiny", ["train.algo=ngrpo", "train.ngrpo.virtual_samples=3", "train.clip_low=0.16",
                             "train.clip_high=0.24"])
    assert p.train.ngrpo.virtual_samples == 3 and (p.train.clip_low, p.train.clip_high) == (0.16, 0.24)


# ---- LENS: per-token penalty --------------------------------------------------------------------------
def test_per_token_lens_penalises_each_token_by_its_own_probability():
    # G = 2, all wrong. Answer 0 has tokens of probability [0.8, 0.4], answer 1 one token of 0.4 (then
    # padding). D = 2 x the largest token probability = 1.6; token penalties (1/2) p / (1.6 - p): 0.5 and 1/6.
    # r~ = [[-0.5, -1/6], [-1/6]]; the answers' means -1/3 and -1/6, group mean -1/4; centred
    # [[-0.25, 1/12], [1/12]]; times alpha 0.25: [[-0.0625, 0.0208333], [0.0208333, 0 (padding)]].
    token_lp = torch.log(torch.tensor([[[0.8, 0.4], [0.4, 0.9]]], dtype=torch.float64))
    mask = torch.tensor([[[1, 1], [1, 0]]], dtype=torch.bool)
    negative = token_advantages(torch.zeros(1, 2), token_lp, mask)
    assert torch.allclose(negative, torch.tensor([[[-0.0625, 1 / 48], [1 / 48, 0.0]]]), atol=1e-7)
    # Mixed, G = 2: the correct answer has one token of 0.5, the wrong one tokens of 0.9 and 0.3 (pbar =
    # sqrt(0.27) = 0.5196). D_imp = ((1/2) / 0.5)^-1 = 1, below 2 x the largest token probability 1.8, so D = 1.8
    # (with pbar it would have been max(1, 1.039)). Penalties (1/2) p / (1.8 - p): 0.5 and 0.1, so r~ = [[1],
    # [-0.5, -0.1]]; answer means 1 and -0.3, group mean 0.35, std 1.3 / sqrt(2) = 0.919239:
    # A = [[0.707107], [-0.924678, -0.489535]].
    token_lp = torch.log(torch.tensor([[[0.5, 0.7], [0.9, 0.3]]], dtype=torch.float64))
    mask = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.bool)
    mixed = token_advantages(torch.tensor([[1.0, 0.0]]), token_lp, mask)
    assert torch.allclose(mixed, torch.tensor([[[0.707107, 0.0], [-0.924678, -0.489535]]]), atol=1e-5)
    # The trainer's entry point: per-rollout lists in, per-rollout tensors of the same lengths out.
    out = token_advantages_for_rollouts(torch.zeros(1, 2), [[math.log(0.8), math.log(0.4)], [math.log(0.4)]],
                                        TrainParams().lens, 1e-6)
    assert [o.shape for o in out] == [torch.Size([2]), torch.Size([1])]
    assert torch.allclose(out[0], negative[0, 0]) and torch.allclose(out[1], negative[0, 1, :1])


def test_the_estimator_contract_refuses_the_per_token_penalty_by_name():
    with pytest.raises(ValueError, match=r"train\.lens\.penalty='token'"):
        adv("lens", [[0, 0]], lens={"penalty": "token"})


def test_the_loss_takes_per_token_advantages():
    # On-policy (ratio 1), seq-mean-token-mean over T = 2: d loss / d logp_t = -A_t / 2.
    logp = torch.zeros(1, 2, requires_grad=True)
    policy_loss(logp, logp.detach(), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)).loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, 0.5]]))
    # A constant row is the per-sequence advantage, exactly.
    lp, old = torch.randn(3, 5), torch.randn(3, 5)
    mask = (torch.rand(3, 5) > 0.3).float()
    a = torch.tensor([0.7, -1.2, 0.3])
    for agg in ("seq-mean-token-mean", "token-mean"):
        per_seq = policy_loss(lp, old, a, mask, loss_agg=agg, dual_clip_c=3.0)
        per_tok = policy_loss(lp, old, a.unsqueeze(1).expand(3, 5), mask, loss_agg=agg, dual_clip_c=3.0)
        assert torch.equal(per_seq.loss, per_tok.loss) and torch.equal(per_seq.clip_frac, per_tok.clip_frac)
    with pytest.raises(ValueError, match="advantages shape"):
        policy_loss(lp, old, torch.zeros(3, 4), mask)


# ---- properties of every estimator --------------------------------------------------------------------
ALL = estimators.names()
# The estimators that ignore the policy's confidence, and those that give all-correct groups no signal.
CONFIDENCE_FREE = ("grpo", "drgrpo", "nsr", "w_reinforce", "ngrpo")
LENS_VARIANTS = [{}, {"negative_difficulty": "max_confidence_multiple", "difficulty_multiple": 3.5},
                 {"negative_difficulty": "most_confident_as_correct"}, {"scale_std": False}]


@st.composite
def batches(draw, kind="any"):
    g = draw(st.integers(2, 12))
    n = draw(st.integers(1, 4))
    rows = []
    for _ in range(n):
        if kind == "negative":
            rows.append([0.0] * g)
        elif kind == "positive":
            rows.append([1.0] * g)
        elif kind == "mixed":
            k = draw(st.integers(1, g - 1))
            rows.append(draw(st.permutations([1.0] * k + [0.0] * (g - k))))
        else:
            rows.append(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=g, max_size=g)))
    lp = draw(st.lists(st.lists(st.floats(-8.0, -0.01), min_size=g, max_size=g), min_size=n, max_size=n))
    return torch.tensor(rows), torch.tensor(lp, dtype=torch.float64)


@settings(max_examples=150, deadline=None)
@given(batches(), st.sampled_from(ALL))
def test_property_shape_dtype_finite_and_groups_independent(batch, algo):
    correct, lp = batch
    a = adv(algo, correct, lp)
    assert a.shape == correct.shape and a.dtype == torch.float32 and torch.all(torch.isfinite(a))
    for g in range(correct.shape[0]):  # a group's advantages depend on that group alone
        assert torch.allclose(adv(algo, correct[g:g + 1], lp[g:g + 1])[0], a[g], atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(batches(), st.sampled_from(ALL), st.randoms(use_true_random=False))
def test_property_permuting_a_group_permutes_its_advantages(batch, algo, rnd):
    correct, lp = batch
    perm = list(range(correct.shape[1]))
    rnd.shuffle(perm)
    assert torch.allclose(adv(algo, correct[:, perm], lp[:, perm]), adv(algo, correct, lp)[:, perm], atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(batches(), st.sampled_from(CONFIDENCE_FREE))
def test_property_confidence_free_estimators_ignore_the_log_probs(batch, algo):
    correct, lp = batch
    assert torch.equal(adv(algo, correct, lp), adv(algo, correct, lp - 3.0))


@settings(max_examples=100, deadline=None)
@given(batches(kind="positive"), st.sampled_from([a for a in ALL if a != "w_reinforce"]))
def test_property_all_correct_groups_get_zero(batch, algo):
    correct, lp = batch
    assert torch.all(adv(algo, correct, lp) == 0)


@settings(max_examples=150, deadline=None)
@given(batches(kind="negative"), st.sampled_from(ALL))
def test_property_sign_of_advantages_on_negative_groups(batch, algo):
    correct, lp = batch
    a = adv(algo, correct, lp)
    G = correct.shape[1]
    if algo in ("grpo", "drgrpo", "unlikeliness"):
        assert torch.all(a == 0)                                       # no signal from an all-wrong group
    elif algo in ("nsr", "w_reinforce"):
        assert torch.all(a == -1)
    elif algo == "ngrpo":
        assert torch.allclose(a, torch.full_like(a, -1 / math.sqrt(G + 1)), atol=1e-5)
    else:  # lens: centred, the most confident wrong answer pushed down, the least confident up
        assert torch.allclose(a.sum(dim=1), torch.zeros(a.shape[0]), atol=1e-6)
        top, bottom = lp.argmax(dim=1), lp.argmin(dim=1)
        rows = torch.arange(a.shape[0])
        assert torch.all(a[rows, top] <= 1e-7) and torch.all(a[rows, bottom] >= -1e-7)


@settings(max_examples=150, deadline=None)
@given(batches(kind="mixed"), st.sampled_from(ALL))
def test_property_every_correct_answer_above_every_wrong_one_in_mixed_groups(batch, algo):
    correct, lp = batch
    a = adv(algo, correct, lp)
    for g in range(correct.shape[0]):
        assert a[g][correct[g] == 1].min() > a[g][correct[g] == 0].max()


@settings(max_examples=150, deadline=None)
@given(batches(kind="mixed"))
def test_property_unlikeliness_pays_less_likely_correct_answers_at_least_as_much(batch):
    correct, lp = batch
    a = adv("unlikeliness", correct, lp)
    for g in range(correct.shape[0]):
        right = (correct[g] == 1).nonzero().flatten().tolist()
        for i in right:
            for j in right:
                if lp[g, i] < lp[g, j]:
                    assert a[g, i] > a[g, j]


@settings(max_examples=150, deadline=None)
@given(batches(kind="negative"), st.sampled_from(LENS_VARIANTS), st.floats(0.05, 1.0))
def test_property_lens_negative_groups_depend_on_relative_confidence_only(batch, variant, scale):
    correct, lp = batch
    a = adv("lens", correct, lp, lens=variant)
    assert torch.allclose(adv("lens", correct, lp + math.log(scale), lens=variant), a, atol=1e-6)
    # alpha scales the negative groups' advantages linearly, whatever the rule.
    doubled = adv("lens", correct, lp, lens=variant | {"alpha": 0.5})
    assert torch.allclose(doubled, 2 * a, atol=1e-7)


@settings(max_examples=150, deadline=None)
@given(batches(), st.sampled_from(LENS_VARIANTS), st.data())
def test_property_per_token_lens_with_equal_token_probabilities_is_the_sequence_lens(batch, variant, data):
    correct, lp = batch
    P, G = correct.shape
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, 6), min_size=P * G, max_size=P * G))).view(P, G)
    T = int(lengths.max())
    mask = torch.arange(T).expand(P, G, T) < lengths.unsqueeze(-1)
    token_lp = torch.where(mask, lp.unsqueeze(-1), -0.5)          # padding holds a value that must be ignored
    section = TrainParams(lens=variant).lens
    kwargs = dict(alpha=section.alpha, mixed_groups=section.mixed_groups, negative_groups=section.negative_groups,
                  scale_std=section.scale_std, negative_rule=section.negative_difficulty,
                  difficulty_multiple=section.difficulty_multiple)
    per_token = token_advantages(correct, token_lp, mask, **kwargs)
    per_seq = lens_advantages(correct, lp, **kwargs)
    assert torch.all(per_token[~mask] == 0)
    assert torch.allclose(per_token, per_seq.unsqueeze(-1).expand(P, G, T) * mask, atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(batches(kind="negative"), st.data())
def test_property_per_token_lens_centres_each_negative_group_over_its_answers(batch, data):
    correct, _ = batch
    P, G = correct.shape
    T = 4
    token_lp = torch.tensor(data.draw(st.lists(st.floats(-6.0, 0.0), min_size=P * G * T, max_size=P * G * T)),
                            dtype=torch.float64).view(P, G, T)
    mask = torch.arange(T).expand(P, G, T) < torch.tensor(
        data.draw(st.lists(st.integers(1, T), min_size=P * G, max_size=P * G))).view(P, G, 1)
    a = token_advantages(correct, token_lp, mask).double()
    per_answer = a.sum(-1) / mask.sum(-1)
    assert torch.allclose(per_answer.sum(dim=1), torch.zeros(P, dtype=torch.float64), atol=1e-6)
    assert torch.all(torch.isfinite(a))
