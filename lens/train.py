"""The RL trainer: one step = draw prompts -> G rollouts each -> verify -> advantages -> PPO-style updates.

Reads top to bottom like LENS.md: `rollout()` samples, `score()` verifies and computes GRPO or LENS
advantages, `update()` runs `ppo_epochs` passes of mini-batch AdamW updates on the clipped loss. The three
phases pass typed records (`RolloutBatch`, `ScoredBatch`) so orchestrators can show them as separate
tasks. Checkpoints hold everything needed to continue bit-for-bit on CPU: weights (safetensors),
optimizer and scheduler state, RNG states and the step; every step's randomness is derived from
(run.seed, step, rank), so a resumed run draws the same prompts and samples as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from transformers import get_scheduler

from lens.algorithms import compute_advantages, group_masks
from lens.data import Problem, read_problems, render_prompt
from lens.loss import policy_loss, token_logprobs_and_entropy
from lens.models import load_policy
from lens.rollout import Rollout, SamplingConfig, make_engine
from lens.verify import Verifier

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a NaN/inf loss or gradient."""


@dataclass
class RolloutBatch:
    step: int
    problems: list[Problem]            # this process's questions, one per group
    prompts: list[str]
    rollouts: list[Rollout]            # len(problems) * G, grouped by question
    seconds: float

    @property
    def num_tokens(self) -> int:
        return sum(len(r.completion_ids) for r in self.rollouts)


@dataclass
class ScoredBatch:
    batch: RolloutBatch
    correct: torch.Tensor              # [P, G] verifier rewards in {0, 1}
    mean_logprob: torch.Tensor         # [P, G] mean token log-prob under the rollout policy
    advantages: torch.Tensor           # [P, G]
    verify_seconds: float
    verify_stats: dict = field(default_factory=dict)


@dataclass
class TrainState:
    step: int = 0                      # completed RL steps
    updates: int = 0                   # optimiser updates applied
    skipped_updates: int = 0           # updates skipped for a non-finite loss (cumulative)
    consecutive_nonfinite: int = 0


# Whole (gathered) state dicts, offloaded to rank 0's CPU; other ranks get empty dicts.
FULL_ON_RANK0_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_fsdp_support(params, fsdp: bool, fsdp2: bool) -> None:
    """Refuse, before loading anything, the FSDP set-ups the trainer does not implement."""
    if not fsdp:
        return
    if not fsdp2:
        raise ValueError("FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config")
    if params.train.kl_beta > 0:
        raise ValueError("train.kl_beta > 0 is not supported under FSDP: the frozen reference policy would be "
                         "a full, unsharded copy on every GPU (the paper's setting is kl_beta=0)")
    if params.rollout.engine != "hf":
        raise ValueError(f"rollout.engine={params.rollout.engine} is not supported under FSDP: the engine would "
                         "need the full weights gathered on each rank that hosts it; use rollout.engine=hf or "
                         "the DDP config (infra/accelerate/README.md)")


def _step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0])


class Trainer:
    def __init__(self, params, *, resume: bool = False, accelerator: Accelerator | None = None,
                 callbacks: list | None = None):
        self.params = params
        tp = params.train
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        # FSDP (version 2, `fully_shard`): each rank holds a shard of every parameter, so whole-model
        # operations (checkpoints, generation) are collectives that every rank joins; see `_full_state`.
        self.fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        check_fsdp_support(params, self.fsdp, self.accelerator.is_fsdp2)
        self.callbacks = list(callbacks or [])
        self.out_dir = params.algo_dir()
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.rollouts_dir = self.out_dir / "rollouts"

        if tp.prompts_per_step % self.world or tp.mini_batch_size % self.world:
            raise ValueError(f"train.prompts_per_step and train.mini_batch_size must divide by the "
                             f"number of processes ({self.world})")
        train_file = params.data_dir / "train.jsonl"
        if not train_file.exists():
            raise FileNotFoundError(f"{train_file} not found: run `lens prepare --profile {params.profile}` first")
        self.problems = read_problems(train_file)

        torch.manual_seed(params.run.seed)
        model, self.tokenizer = load_policy(params)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tp.lr, betas=tuple(tp.adam_betas),
                                           weight_decay=tp.weight_decay)
        self.scheduler = get_scheduler(
            "constant_with_warmup" if tp.lr_schedule == "constant" else tp.lr_schedule,
            self.optimizer, num_warmup_steps=tp.warmup_steps,
            num_training_steps=max(1, tp.steps * self.updates_per_step))
        # Multi-process fix: the scheduler is NOT passed to accelerator.prepare. accelerate's wrapper steps
        # it num_processes times per call (it assumes a per-process dataloader that shrinks with the world
        # size), but our updates per step do not depend on the world size (mini_batch_size is global), so
        # a prepared scheduler ran warm-up and decay `world` times too fast.
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.ref_model = None
        if tp.kl_beta > 0:  # a frozen copy of the starting policy; beta = 0 loads nothing
            self.ref_model, _ = load_policy(params)
            self.ref_model.to(self.accelerator.device).eval().requires_grad_(False)
        # Under FSDP every forward pass all-gathers layers (a collective), so all ranks must run the same
        # number of decode steps: `synced_gpus` keeps a finished rank stepping until every rank is done.
        self.engine = make_engine(params, self.unwrapped_model, self.tokenizer, synced_gpus=self.fsdp)
        self.verifier = Verifier(timeout_s=params.verify.timeout_s, workers=params.verify.workers)
        self.state = TrainState()

        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.latest_checkpoint() is not None:
            self.load_checkpoint(self.latest_checkpoint())
        elif self.accelerator.is_main_process:
            # A fresh run owns its directory: stale checkpoints would be picked up by a later --resume.
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            shutil.rmtree(self.rollouts_dir, ignore_errors=True)
            self.metrics_path.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    @property
    def samples_per_step(self) -> int:
        return self.params.train.prompts_per_step * self.params.rollout.group_size

    @property
    def updates_per_step(self) -> int:
        tp = self.params.train
        return tp.ppo_epochs * math.ceil(self.samples_per_step / tp.mini_batch_size)

    # ---- phase 1: rollouts ----------------------------------------------------------------------
    def step_problems(self, step: int) -> list[Problem]:
        """This process's share of the step's questions: a seeded permutation per pass over the data."""
        n, per_step = len(self.problems), self.params.train.prompts_per_step
        chosen = []
        for pos in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(pos, n)
            perm = np.random.default_rng([self.params.run.seed, epoch]).permutation(n)
            chosen.append(self.problems[perm[offset]])
        return chosen[self.rank::self.world]

    def rollout(self, step: int | None = None) -> RolloutBatch:
        step = self.state.step if step is None else step
        problems = self.step_problems(step)
        chat = self.params.model.chat_template
        prompts = [render_prompt(p, self.tokenizer, chat) for p in problems]
        rp = self.params.rollout
        sampling = SamplingConfig(temperature=rp.temperature, top_p=rp.top_p, max_new_tokens=rp.max_new_tokens,
                                  seed=_step_seed(self.params.run.seed, step, self.rank))
        t0 = time.perf_counter()
        rollouts = self.engine.generate(prompts, rp.group_size, sampling)
        return RolloutBatch(step, problems, prompts, rollouts, time.perf_counter() - t0)

    # ---- phase 2: verification and advantages ---------------------------------------------------
    def score(self, batch: RolloutBatch) -> ScoredBatch:
        G = self.params.rollout.group_size
        golds = [batch.problems[r.prompt_index].answer for r in batch.rollouts]
        before = self.verifier.stats.as_dict()
        t0 = time.perf_counter()
        rewards = self.verifier.score_batch([r.text for r in batch.rollouts], golds)
        seconds = time.perf_counter() - t0
        after = self.verifier.stats.as_dict()
        correct = torch.tensor(rewards, dtype=torch.float32).view(-1, G)
        mean_logprob = torch.tensor([r.mean_logprob for r in batch.rollouts], dtype=torch.float64).view(-1, G)
        tp = self.params.train
        adv = compute_advantages(tp.algo, correct, mean_logprob, scale_std=tp.scale_std, eps=tp.adv_eps,
                                 alpha=tp.lens.alpha, mixed_groups=tp.lens.mixed_groups,
                                 negative_groups=tp.lens.negative_groups)
        return ScoredBatch(batch, correct, mean_logprob, adv, seconds,
                           {k: after[k] - before[k] for k in after})

    # ---- phase 3: policy update -----------------------------------------------------------------
    def _collate(self, rollouts: list[Rollout], advantages: torch.Tensor, idx: list[int]):
        """Right-padded prompt+completion tensors; targets are shifted by one (logits[t] predicts t+1)."""
        seqs = [rollouts[i].prompt_ids + rollouts[i].completion_ids for i in idx]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        loss_mask = torch.zeros((len(idx), width - 1))
        old_logprobs = torch.zeros((len(idx), width - 1))
        for row, (i, seq) in enumerate(zip(idx, seqs)):
            r = rollouts[i]
            input_ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
            start, end = len(r.prompt_ids) - 1, len(seq) - 1
            loss_mask[row, start:end] = 1
            old_logprobs[row, start:end] = torch.tensor(r.logprobs)
        dev = self.accelerator.device
        return (input_ids.to(dev), attention.to(dev), loss_mask.to(dev), old_logprobs.to(dev),
                advantages[idx].to(dev))

    def _logprobs(self, model, input_ids, attention, with_entropy=False):
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        return token_logprobs_and_entropy(logits, input_ids[:, 1:], self.params.rollout.temperature, with_entropy)

    def update(self, scored: ScoredBatch) -> dict:
        tp = self.params.train
        rollouts = scored.batch.rollouts
        advantages = scored.advantages.flatten()
        n_local = len(rollouts)
        mini_local = tp.mini_batch_size // self.world
        gen = torch.Generator().manual_seed(_step_seed(self.params.run.seed, scored.batch.step, self.rank, 1))
        totals = dict(loss=0.0, clip_frac=0.0, kl=0.0, entropy=0.0, grad_norm=0.0, n=0)
        tokens, t0 = 0, time.perf_counter()
        self.model.train()
        for _ in range(tp.ppo_epochs):
            order = torch.randperm(n_local, generator=gen).tolist()
            for mb_start in range(0, n_local, mini_local):
                mb = order[mb_start:mb_start + mini_local]
                stats, mb_tokens = self._minibatch_update(rollouts, advantages, mb)
                tokens += mb_tokens
                if stats is not None:
                    for k in ("loss", "clip_frac", "kl", "entropy", "grad_norm"):
                        totals[k] += stats[k]
                    totals["n"] += 1
        seconds = time.perf_counter() - t0
        n = max(totals["n"], 1)
        means = {k: totals[k] / n for k in ("loss", "clip_frac", "kl", "entropy", "grad_norm")}
        # Multi-process fix: loss/clip_frac/kl/entropy are per-shard values; average them over ranks (shards
        # are equal-sized) and sum the tokens, so the row rank 0 writes describes the global batch.
        # grad_norm is already global (measured after the all-reduce).
        keys = ("loss", "clip_frac", "kl", "entropy")
        local = torch.tensor([means[k] for k in keys] + [float(tokens)], dtype=torch.float64,
                             device=self.accelerator.device)
        reduced = self.accelerator.reduce(local, reduction="sum").tolist()
        means |= {k: reduced[i] / self.world for i, k in enumerate(keys)}
        return {f"train/{k}": v for k, v in means.items()} | {
            "perf/train_tok_s": reduced[-1] / max(seconds, 1e-9), "perf/update_s": seconds}

    def _minibatch_update(self, rollouts, advantages, mb: list[int]):
        tp = self.params.train
        micro = [mb[i:i + tp.micro_batch_size] for i in range(0, len(mb), tp.micro_batch_size)]
        batches = [self._collate(rollouts, advantages, m) for m in micro]
        if tp.loss_agg == "seq-mean-token-mean":
            normalizer = float(len(mb))
        else:
            # Multi-process fix: DDP averages gradients over ranks, so each rank divides by the global token
            # count / world; a per-rank count weighted the ranks' tokens unequally (1/T_r instead of 1/T).
            local_tokens = torch.tensor([float(sum(b[2].sum().item() for b in batches))],
                                        device=self.accelerator.device)
            normalizer = self.accelerator.reduce(local_tokens, reduction="sum").item() / self.world
        acc = dict(loss=0.0, clip_frac=0.0, kl=0.0, entropy=0.0)
        nonfinite, tokens = False, 0
        for i, (input_ids, attention, mask, old_lp, adv) in enumerate(batches):
            last = i == len(batches) - 1
            # DDP all-reduces on the last backward only; every rank runs every backward, so no rank hangs.
            with (nullcontext() if last else self.accelerator.no_sync(self.model)):
                if tp.recompute_old_logprobs:
                    with torch.no_grad():
                        old_lp, _ = self._logprobs(self.model, input_ids, attention)
                ref_lp = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_lp, _ = self._logprobs(self.ref_model, input_ids, attention)
                logp, entropy = self._logprobs(self.model, input_ids, attention, with_entropy=True)
                out = self.compute_loss(logp, old_lp, adv, mask, ref_lp, normalizer)
                loss = out.loss
                if not torch.isfinite(loss):
                    nonfinite = True
                    loss = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
                self.accelerator.backward(loss)
            frac = len(micro[i]) / len(mb)
            acc["loss"] += out.loss.item() if torch.isfinite(out.loss) else 0.0
            acc["clip_frac"] += out.clip_frac.item() * frac
            acc["kl"] += out.kl.item() * frac
            acc["entropy"] += ((entropy * mask).sum() / mask.sum().clamp_min(1)).item() * frac
            tokens += int(attention.sum().item())

        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), tp.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the (replicated) global norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        flag = torch.tensor([float(nonfinite or not torch.isfinite(torch.as_tensor(grad_norm)))],
                            device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_updates += 1
            self.state.consecutive_nonfinite += 1
            log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)",
                        self.state.step, self.state.consecutive_nonfinite)
            if self.state.consecutive_nonfinite >= tp.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self.state.consecutive_nonfinite} consecutive non-finite losses at step {self.state.step} "
                    f"(train.max_consecutive_nonfinite={tp.max_consecutive_nonfinite}); last checkpoint: "
                    f"{self.latest_checkpoint()}")
            return None, tokens
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.updates += 1
        self.state.consecutive_nonfinite = 0
        return acc | {"grad_norm": float(grad_norm)}, tokens

    def compute_loss(self, logp, old_lp, adv, mask, ref_lp, normalizer):
        """The clipped loss with this run's settings (a seam for tests that inject a NaN)."""
        tp = self.params.train
        return policy_loss(logp, old_lp, adv, mask, clip_low=tp.clip_low, clip_high=tp.clip_high,
                           loss_agg=tp.loss_agg, ref_logprobs=ref_lp, kl_beta=tp.kl_beta, normalizer=normalizer)

    # ---- one step, many steps -------------------------------------------------------------------
    def step_metrics(self, scored: ScoredBatch) -> dict:
        """Rollout-side metrics, reduced over processes (sums then ratios, so shards may differ in size)."""
        rollouts = scored.batch.rollouts
        all_correct, all_wrong, mixed = group_masks(scored.correct)
        adv = scored.advantages
        sums = torch.tensor([
            scored.correct.sum().item(), scored.correct.numel(), all_correct.sum().item(), all_wrong.sum().item(),
            mixed.sum().item(), scored.correct.shape[0], (adv != 0).sum().item(),
            sum(len(r.completion_ids) for r in rollouts), sum(r.truncated for r in rollouts),
            adv[all_wrong].abs().sum().item(), all_wrong.sum().item() * adv.shape[1],
            scored.batch.num_tokens, scored.verify_stats.get("timeouts", 0), scored.verify_stats.get("errors", 0),
            scored.verify_stats.get("parse_failures", 0),
        ], dtype=torch.float64, device=self.accelerator.device)
        s = self.accelerator.reduce(sums, reduction="sum").tolist()
        return {
            "train/reward_mean": s[0] / s[1], "train/acc": s[0] / s[1],
            "train/frac_groups_all_correct": s[2] / s[5], "train/frac_groups_all_wrong": s[3] / s[5],
            "train/frac_groups_mixed": s[4] / s[5], "train/frac_samples_with_signal": s[6] / s[1],
            "train/response_len_mean": s[7] / s[1], "train/truncated_frac": s[8] / s[1],
            "train/negative_group_adv_abs_mean": s[9] / s[10] if s[10] else 0.0,
            "perf/rollout_tok_s": s[11] / max(scored.batch.seconds, 1e-9) ,
            "verify/timeouts": s[12], "verify/errors": s[13], "verify/parse_failures": s[14],
            "perf/rollout_s": scored.batch.seconds, "perf/verify_s": scored.verify_seconds,
        }

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        scored = self.score(self.rollout())
        return self.complete_step(scored, self.step_metrics(scored), t0)

    def complete_step(self, scored: ScoredBatch, metrics: dict, started: float) -> dict:
        """Phase 3 and the step's record: update, weight sync, step counter, rollouts parquet, metrics row.

        `metrics` are the rollout-side metrics (`step_metrics`); `started` is when the step's rollout began.
        """
        metrics = metrics | self.update(scored)
        self.engine.sync_weights(self.unwrapped_model)
        self.state.step += 1
        metrics |= {"train/skipped_steps": self.state.skipped_updates, "train/lr": self.scheduler.get_last_lr()[0],
                    "perf/weight_sync_s": getattr(self.engine, "last_sync_seconds", 0.0),
                    "perf/step_s": time.perf_counter() - started}
        self.save_rollouts(scored)
        self.log_metrics(metrics)
        return metrics

    def train(self, max_steps: int | None = None, progress: bool = True) -> dict:
        """Run until train.steps (or `max_steps` more); checkpoint every train.checkpoint_every steps."""
        tp = self.params.train
        target = tp.steps if max_steps is None else min(tp.steps, self.state.step + max_steps)
        from tqdm.auto import tqdm

        bar = tqdm(total=target, initial=self.state.step, desc=f"{tp.algo} train", unit="step",
                   disable=not (progress and self.accelerator.is_main_process))
        metrics: dict = {}
        while self.state.step < target:
            metrics = self.train_step()
            bar.update(1)
            bar.set_postfix(acc=f"{metrics['train/acc']:.3f}", all_wrong=f"{metrics['train/frac_groups_all_wrong']:.2f}")
            if self.state.step % tp.checkpoint_every == 0 or self.state.step == tp.steps:
                self.save_checkpoint()
        bar.close()
        return metrics

    def log_metrics(self, metrics: dict) -> None:
        row = {"step": self.state.step} | metrics
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        for cb in self.callbacks:
            cb(self.state.step, metrics)

    def save_rollouts(self, scored: ScoredBatch) -> None:
        """What the model wrote and what the algorithm did with it, one parquet file per step (main rank)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        G = self.params.rollout.group_size
        b = scored.batch
        columns = {
            "step": [b.step] * len(b.rollouts),
            "problem_id": [b.problems[r.prompt_index].id for r in b.rollouts],
            "level": [b.problems[r.prompt_index].level for r in b.rollouts],
            "prompt": [b.prompts[r.prompt_index] for r in b.rollouts],
            "completion": [r.text for r in b.rollouts],
            "reward": scored.correct.flatten().tolist(),
            "mean_logprob": scored.mean_logprob.flatten().tolist(),
            "advantage": scored.advantages.flatten().tolist(),
            "num_tokens": [len(r.completion_ids) for r in b.rollouts],
            "truncated": [r.truncated for r in b.rollouts],
            "sample": [i % G for i in range(len(b.rollouts))],
            "rank": [self.rank] * len(b.rollouts),
        }
        # Multi-process fix: every rank holds a different shard of the step's rollouts; gather them all
        # (collective: every rank calls it) so the record is the whole batch, not rank 0's share.
        if self.world > 1:
            from accelerate.utils import gather_object

            shards = gather_object([columns])
            columns = {k: [v for shard in shards for v in shard[k]] for k in columns}
        if not self.accelerator.is_main_process:
            return
        table = pa.table(columns)
        self.rollouts_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.rollouts_dir / f".step-{b.step:06d}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.rollouts_dir / f"step-{b.step:06d}.parquet")

    # ---- checkpoints ----------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if pointer.exists():
            path = self.ckpt_dir / pointer.read_text().strip()
            if (path / "trainer_state.json").exists():
                return path
        return None

    def _full_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts, whole and on rank 0's CPU (empty on other ranks).

        A collective: every rank must call it. torch's distributed state-dict API gives the same result for
        a plain module, DDP and FSDP2 (gathering the shards of the latter), keyed by parameter name, so a
        checkpoint written by any of them loads into any other.
        """
        model_state = get_model_state_dict(self.model, options=FULL_ON_RANK0_CPU)
        optim_state = get_optimizer_state_dict(self.model, self._torch_optimizer, options=FULL_ON_RANK0_CPU)
        return model_state, optim_state

    def _save_model(self, directory: Path, model_state: dict) -> None:
        # Only rank 0 writes; `state_dict=` carries the gathered weights (the module's own may be shards).
        self.unwrapped_model.save_pretrained(directory, state_dict=model_state, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)

    def save_checkpoint(self) -> Path:
        """Write to a temporary directory, then rename: a kill mid-write never leaves a half checkpoint."""
        self.accelerator.wait_for_everyone()
        name = f"step-{self.state.step:06d}"
        final = self.ckpt_dir / name
        model_state, optim_state = self._full_state()
        if self.accelerator.is_main_process:
            tmp = self.ckpt_dir / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model(tmp / "model", model_state)
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            state = self.state.__dict__ | {"rng": {
                "python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
                "torch": torch.get_rng_state().tolist()}}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = self.ckpt_dir / ".latest.tmp"
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, self.ckpt_dir / "latest")
            self._prune_checkpoints()
        del model_state, optim_state
        self.accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        kept = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
        for old in kept[:-self.params.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        # With several processes rank 0 alone reads the files and broadcasts them (for FSDP, each rank keeps
        # its shard): N ranks reading an 8B checkpoint at once would hold N copies in host memory.
        broadcast = self.world > 1
        reader = self.accelerator.is_main_process or not broadcast
        weights, optim_state = {}, {}
        if reader:
            for f in sorted((path / "model").glob("*.safetensors")):
                weights |= load_file(f)
            expected = set(self.unwrapped_model.state_dict())
            missing, unexpected = expected - set(weights), set(weights) - expected
            # Tied embeddings are saved once; the tied head keeps pointing at them.
            if unexpected or any("lm_head" not in k for k in missing):
                raise RuntimeError(f"checkpoint {path} does not match the model: missing {sorted(missing)}, "
                                   f"unexpected {sorted(unexpected)}")
            # Only tensors and plain containers: weights_only refuses anything that would need unpickling code.
            optim_state = torch.load(path / "optimizer.pt", weights_only=True)
        options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=broadcast)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self._torch_optimizer, optim_state, options=options)
        del weights, optim_state
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        state = json.loads((path / "trainer_state.json").read_text())
        rng = state.pop("rng")
        self.state = TrainState(**state)
        random.setstate(_tupled(rng["python"]))
        np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        # A failure mid-backward (a retried round) leaves gradients behind; the next update must not add them.
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.sync_weights(self.unwrapped_model)
        # Metrics and rollouts after the checkpoint belong to the lost future: drop them.
        if self.accelerator.is_main_process and self.metrics_path.exists():
            rows = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.state.step]
            self.metrics_path.write_text("".join(r + "\n" for r in rows))
        log.info("resumed from %s (step %d)", path, self.state.step)

    def save_final(self, path: Path | None = None) -> Path:
        path = path or self.out_dir / "final"
        self.accelerator.wait_for_everyone()
        model_state = get_model_state_dict(self.model, options=FULL_ON_RANK0_CPU)  # collective, see _full_state
        if self.accelerator.is_main_process:
            tmp = path.parent / f".tmp-{path.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            self._save_model(tmp, model_state)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        del model_state
        self.accelerator.wait_for_everyone()
        return path

    def close(self) -> None:
        self.verifier.close()
        self.engine.close()


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    return obj


def _tupled(obj):
    return tuple(_tupled(x) for x in obj) if isinstance(obj, list) else obj
