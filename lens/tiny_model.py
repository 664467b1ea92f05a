"""The tiny profile's model: a character-level tokenizer and a small Qwen2 built from a config.

Everything here is plain transformers: the saved directory is an ordinary Qwen2 checkpoint (safetensors,
tokenizer.json, generation_config.json) that `AutoModelForCausalLM` / `AutoTokenizer` and vLLM load as is.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
MAX_POSITIONS = 128


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of string.printable (plus the three special tokens); no BOS.

    Why byte-level BPE without merges instead of a WordLevel model: transformers 5 forces
    `AutoTokenizer` to `Qwen2Tokenizer` for any directory whose config says model_type "qwen2", and that
    class rebuilds the tokenizer as byte-level BPE from the saved vocab/merges, discarding a custom
    pre-tokenizer and decoder. A byte-level BPE with an empty merge list *is* a character tokenizer for
    ASCII, and it survives that rebuild unchanged, so the tokenizer we train with is exactly the one
    `AutoTokenizer` (and vLLM) load. Characters outside the vocabulary are dropped, never mapped to unk.
    Left padding because the tokenizer's main consumer after training is batched generation.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(string.printable + "\n"):
        ((symbol, _),) = byte_level.pre_tokenize_str(ch)  # e.g. " " -> "\u0120", "\n" -> "\u010a"
        vocab[symbol] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=UNK_TOKEN,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A freshly initialised fp32 Qwen2 whose initial weights depend only on `seed`."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Qwen2 convention: no real BOS token, bos id = eos id (never prepended by the tokenizer).
        bos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    # fork_rng: seeding the init must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.to(torch.float32)
    model.generation_config = _generation_config(tokenizer)
    return model


def _generation_config(tokenizer) -> GenerationConfig:
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )


def save_model(model, tokenizer, directory: str | Path) -> Path:
    """Save model + tokenizer as safetensors under `directory`, replacing it atomically.

    Written into a sibling temp dir first and renamed, so a crash never leaves a half-written model
    where the next stage (or DVC) would pick it up.
    """
    from lens.records import atomic_directory

    directory = Path(directory)
    if getattr(model.generation_config, "eos_token_id", None) is None:
        model.generation_config = _generation_config(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return directory
