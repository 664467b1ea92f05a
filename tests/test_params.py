"""One typed params model: profiles, overrides, and rejection of unknown keys and bad values by name."""

import pytest

from lens.params import ParamsError, flatten, load_params


def test_default_profile_is_tiny_and_paper_matches_the_paper_setup():
    assert load_params().profile == "tiny"
    paper = load_params("paper")
    assert paper.rollout.group_size == 16 and paper.train.prompts_per_step == 128
    assert paper.train.mini_batch_size == 512 and paper.train.clip_low == paper.train.clip_high == 0.2
    assert paper.train.kl_beta == 0 and paper.rollout.max_new_tokens == 4096 and paper.train.lr == 1e-6
    assert paper.rollout.temperature == 1.0 and paper.rollout.top_p == 1.0 and paper.train.lens.alpha == 0.25
    assert paper.model.trust_remote_code is False


def test_overrides_apply_after_the_profile():
    p = load_params("smollm2", ["train.steps=7", "train.lens.alpha=0.5", "data.levels=[1,2]"])
    assert p.train.steps == 7 and p.train.lens.alpha == 0.5 and p.data.levels == [1, 2]
    assert p.model.source == "smollm2"


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=-1", "train.steps"),
    ("train.algo=ppo", "train.algo"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("data.levels=[0,6]", "data"),
    ("train.micro_batch_size=1000000", "train"),  # larger than any mini-batch: micro <= mini is violated
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params("tiny", [override])


def test_malformed_override_and_unknown_profile():
    with pytest.raises(ParamsError, match="key.path=value"):
        load_params("tiny", ["train.steps"])
    with pytest.raises(ParamsError, match="unknown profile"):
        load_params("nope")


def test_flatten_gives_dotted_keys():
    flat = flatten(load_params())
    assert flat["train.lens.alpha"] == 0.25 and "rollout.group_size" in flat


@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", r"train\.lr: Input should be a finite number"),
    ("verify.timeout_s=inf", r"verify\.timeout_s: Input should be a finite number"),
    ("train.clip_low=5", r"train\.clip_low: Input should be less than 1"),
    ("train.mini_batch_size=1024", r"train\.mini_batch_size=1024 is larger than the samples of a step"),
    ("eval.ks=[0,1]", r"eval\.ks must all be >= 1"),
])
def test_values_that_cannot_work_are_refused_by_key(override, message):
    with pytest.raises(ParamsError, match=message):
        load_params("tiny", [override])
