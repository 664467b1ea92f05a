"""Warm start: supervised training of the tiny model on synthetic arithmetic, so that RL starts from a
policy that is sometimes right on easy levels and almost never on hard ones.

Each training sequence is `PLAIN_TEMPLATE.format(problem=...) + "\\boxed{<answer>}" + EOS`; the loss
covers only the completion (prompt tokens are labelled -100). At the end the stage measures sampling
accuracy per level at temperature 1 on the synthetic eval split with a cheap, self-contained exact
match of the \\boxed{} content (the real verifier is the evaluate stage's business).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from lens.data import PLAIN_TEMPLATE, last_boxed, synthetic_problems
from lens.params import Params
from lens.records import atomic_write_json
from lens.tiny_model import build_char_tokenizer, build_tiny_model, save_model

EVAL_PROBLEMS_PER_LEVEL = 32
EVAL_SAMPLES_PER_PROBLEM = 8
EVAL_BATCH_SIZE = 256
WARMUP_FRACTION = 0.05


def completion_text(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def encode_examples(problems, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, labels (-100 on prompt and padding) and lengths for all problems."""
    eos = tokenizer.eos_token_id
    rows: list[tuple[list[int], list[int]]] = []
    for p in problems:
        prompt = tokenizer.encode(PLAIN_TEMPLATE.format(problem=p.problem), add_special_tokens=False)
        target = tokenizer.encode(completion_text(p.answer), add_special_tokens=False) + [eos]
        rows.append((prompt, target))
    max_len = max(len(a) + len(b) for a, b in rows)
    limit = tokenizer.model_max_length
    if max_len > limit:
        raise ValueError(f"a warm-start sequence has {max_len} tokens, more than the model's {limit} positions")
    ids = torch.full((len(rows), max_len), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), max_len), -100, dtype=torch.long)
    lengths = torch.empty(len(rows), dtype=torch.long)
    for r, (prompt, target) in enumerate(rows):
        n = len(prompt) + len(target)
        ids[r, :n] = torch.tensor(prompt + target)
        labels[r, len(prompt):n] = torch.tensor(target)
        lengths[r] = n
    return ids, labels, lengths


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches: shuffled epochs without replacement."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i:i + batch_size]


@torch.no_grad()
def sampling_accuracy(model, tokenizer, problems, *, samples: int, max_new_tokens: int,
                      temperature: float = 1.0, seed: int = 0,
                      batch_size: int = EVAL_BATCH_SIZE) -> dict[int, float]:
    """Fraction of `samples` sampled completions per problem whose \\boxed{} content equals the answer,
    averaged per level."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    jobs = [p for p in problems for _ in range(samples)]
    correct: dict[int, list[float]] = {}
    torch.manual_seed(seed)
    try:
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i:i + batch_size]
            enc = tokenizer([PLAIN_TEMPLATE.format(problem=p.problem) for p in chunk],
                            return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for p, text in zip(chunk, texts):
                got = last_boxed(text)
                correct.setdefault(p.level, []).append(float(got is not None and got.strip() == p.answer.strip()))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return {level: sum(v) / len(v) for level, v in sorted(correct.items())}


def _eval_problems(params: Params, per_level: int):
    syn = params.data.synthetic
    return synthetic_problems("eval", min(per_level, syn.eval_per_level), syn.seed, params.data.levels)


def warm_start(params: Params, out_dir: str | Path | None = None, *,
               eval_problems_per_level: int = EVAL_PROBLEMS_PER_LEVEL,
               eval_samples: int = EVAL_SAMPLES_PER_PROBLEM,
               progress: bool = True) -> dict:
    """Build the tiny model, train it supervised, measure per-level sampling accuracy, save.

    Writes `out_dir/model/` (HF format) and `out_dir/warm_start.json`; returns the json's dict.
    """
    out_dir = Path(out_dir) if out_dir is not None else params.warm_start_dir
    ws, tiny, syn = params.warm_start, params.model.tiny, params.data.synthetic
    started, cpu_started = time.monotonic(), time.process_time()
    torch.manual_seed(params.run.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=tiny.hidden_size, num_layers=tiny.num_layers,
                             num_heads=tiny.num_heads, intermediate_size=tiny.intermediate_size,
                             seed=params.run.seed).to(device)
    train = synthetic_problems("train", syn.train_per_level, syn.seed, params.data.levels)
    ids, labels, lengths = encode_examples(train, tokenizer)

    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, int(WARMUP_FRACTION * ws.steps)),
                              num_training_steps=max(1, ws.steps))
    generator = torch.Generator().manual_seed(params.run.seed)
    batches = _batches(len(train), ws.batch_size, generator)
    deadline = started + ws.max_minutes * 60 if ws.max_minutes else math.inf

    losses: list[float] = []
    model.train()
    bar = tqdm(total=ws.steps, desc="warm start", disable=not progress, mininterval=1.0)
    for _ in range(ws.steps):
        if time.monotonic() > deadline:
            break
        idx = next(batches)
        width = int(lengths[idx].max())
        input_ids = ids[idx, :width].to(device)
        batch_labels = labels[idx, :width].to(device)
        attention_mask = (torch.arange(width)[None, :] < lengths[idx][:, None]).long().to(device)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=batch_labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.update(1)
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    train_seconds = time.monotonic() - started

    eval_started = time.monotonic()
    eval_set = _eval_problems(params, eval_problems_per_level)
    accuracy = sampling_accuracy(model, tokenizer, eval_set, samples=eval_samples,
                                 max_new_tokens=params.rollout.max_new_tokens, temperature=1.0,
                                 seed=params.run.seed) if eval_set else {}
    eval_seconds = time.monotonic() - eval_started

    model_dir = save_model(model.to("cpu"), tokenizer, out_dir / "model")
    tail = max(1, min(50, len(losses) // 10))
    report = {
        "steps": len(losses),
        "planned_steps": ws.steps,
        "stopped_by_time_limit": len(losses) < ws.steps,
        "initial_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-tail:]) / tail if losses else None,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "seconds": round(time.monotonic() - started, 2),
        # CPU seconds of all threads: a load-independent cost measure when the machine is shared.
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_problems": len(train),
        "eval_problems_per_level": {str(level): n for level, n in sorted(Counter(p.level for p in eval_set).items())},
        "eval_samples_per_problem": eval_samples,
        "accuracy_per_level": {str(level): acc for level, acc in accuracy.items()},
        "model_dir": str(model_dir),
    }
    atomic_write_json(out_dir / "warm_start.json", report)
    return report
