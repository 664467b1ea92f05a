"""The RL step: draw prompts -> G rollouts each -> verify -> advantages -> clipped policy-gradient updates.

Reads top to bottom like LENS.md: `rollout()` samples, `score()` verifies and computes the estimator's
advantages, `update()` runs `ppo_epochs` passes of mini-batch AdamW updates on the clipped loss; the three
pass typed records (`RolloutBatch`, `ScoredBatch`, lens.sampling) and `train_step` runs them in order, each
through the caller's phase runner (lens.loop sequences the steps); `train.dynamic_sampling` adds a phase
between scoring and the update (lens.sampling). Every step's randomness is derived from
(run.seed, step, rank), so a resumed run draws the same prompts and samples as one that never stopped.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import get_scheduler

from lens.checkpoint import Checkpointer, params_fingerprint
from lens.collate import MicroBatch, collate, token_budget_split
from lens.data import Problem, read_problems, render_prompt
from lens.estimators import compute_advantages, compute_token_advantages
from lens.logprobs import completion_logprobs
from lens.loss import policy_loss, token_logprobs_and_entropy
from lens.models import load_policy
from lens.preflight import check_fsdp_support, check_master_weights
from lens.records import (ROLLOUT_COLUMNS, RunFiles, RunLock, append_metrics, rollout_columns, truncate_metrics,
                          write_rollouts)
from lens.reward_health import RewardHealth
from lens.rollout import Rollout, SamplingConfig, make_engine
from lens.sampling import RolloutBatch, ScoredBatch, fill_batch, training_set
from lens.scoring import RewardStream, generate_verifying
from lens.step_stats import RolloutCounts, UpdateStats, memory_gib, memory_text, reduce_over_processes
from lens.verify import Verifier

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a NaN/inf loss or gradient."""


@dataclass
class TrainState:
    step: int = 0                      # completed RL steps
    updates: int = 0                   # optimiser updates applied
    skipped_updates: int = 0           # updates skipped for a non-finite loss (cumulative)
    consecutive_nonfinite: int = 0


def _step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0])


class Trainer:
    def __init__(self, params, *, resume: bool | Literal["auto"] = False, accelerator: Accelerator | None = None,
                 callbacks: list | None = None):
        """resume: True continues from the last usable checkpoint (`lens train --resume`); "auto" does so only
        when the arm's last run was interrupted (a finished run's directory starts afresh: a re-run after a
        code change must not reuse it); False starts afresh."""
        self.params = params
        tp = params.train
        check_master_weights(params)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        # bf16 compute over fp32 master weights: torch autocast around every forward (the optimizer and its
        # state stay fp32). Not accelerate's mixed_precision: that is process-wide state, fixed at the first
        # Accelerator; under FSDP2 its config's MixedPrecisionPolicy casts the gathered shards as well.
        self.compute_dtype = getattr(torch, params.model.compute_dtype)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        # FSDP (version 2, `fully_shard`): each rank holds a shard of every parameter, so whole-model
        # operations (checkpoints, generation) are collectives that every rank joins (lens.checkpoint).
        self.fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        check_fsdp_support(params, self.fsdp, self.accelerator.is_fsdp2)
        self.callbacks = list(callbacks or [])
        self.files = RunFiles(params.algo_dir())
        self._lock = RunLock(self.files.dir) if self.accelerator.is_main_process else None

        try:
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
            self.verifier = Verifier(timeout_s=params.verify.timeout_s, workers=params.verify.workers,
                                     max_completion_chars=params.verify.max_completion_chars)
            self.reward_health = RewardHealth.from_params(params.verify)
            self.state = TrainState()
            self.checkpoints = Checkpointer(self.files.checkpoints, self.accelerator, self.model, self.optimizer,
                                            self.scheduler, self.tokenizer, keep=tp.keep_checkpoints,
                                            fingerprint=params_fingerprint(params))

            if self.accelerator.is_main_process:
                self.files.dir.mkdir(parents=True, exist_ok=True)
            if resume == "auto":
                resume = self.files.interrupted()
                if resume:
                    log.info("%s: the last run here was interrupted: resuming it", self.files.dir)
            if resume:
                # Never deletes: a usable checkpoint is loaded (an unusable newest one is skipped with a warning);
                # checkpoints that exist but none usable stop the run (CheckpointError); with none at all, the
                # run starts from the beginning and only the metrics rows no checkpoint backs are dropped.
                path = self.checkpoints.usable()
                if path is not None:
                    self.load_checkpoint(path)
                elif self.accelerator.is_main_process:
                    truncate_metrics(self.files.metrics, 0)
            elif self.accelerator.is_main_process:
                # A fresh run owns its directory: stale checkpoints would be picked up by a later --resume.
                self.checkpoints.clear()
                shutil.rmtree(self.files.rollouts, ignore_errors=True)
                shutil.rmtree(self.files.evals, ignore_errors=True)
                self.files.metrics.unlink(missing_ok=True)
                self.files.train_summary.unlink(missing_ok=True)  # it described the run being replaced
            self.accelerator.wait_for_everyone()
        except BaseException:
            if self._lock is not None:  # a failed start leaves the directory free for the next attempt
                self._lock.release()
            raise

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def samples_per_step(self) -> int:
        return self.params.train.prompts_per_step * self.params.rollout.group_size

    @property
    def updates_per_step(self) -> int:
        tp = self.params.train
        return tp.ppo_epochs * math.ceil(self.samples_per_step / tp.mini_batch_size)

    # ---- phase 1: rollouts ----------------------------------------------------------------------
    def step_problems(self, step: int, all_ranks: bool = False) -> list[Problem]:
        """This process's share of the step's questions (`all_ranks`: all): a seeded permutation per pass."""
        n, per_step = len(self.problems), self.params.train.prompts_per_step
        chosen = []
        for pos in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(pos, n)
            perm = np.random.default_rng([self.params.run.seed, epoch]).permutation(n)
            chosen.append(self.problems[perm[offset]])
        return chosen if all_ranks else chosen[self.rank::self.world]

    def rollout(self, step: int | None = None) -> RolloutBatch:
        step = self.state.step if step is None else step
        return self.generate(step, self.step_problems(step))

    def generate(self, step: int, problems: list[Problem], draw: int = 0) -> RolloutBatch:
        """G rollouts of each question. Draw k > 0 (dynamic sampling's extra rounds) samples from seed stream
        k + 1 of (run.seed, step, rank): stream 0 is the step's first draw, stream 1 the update's order.
        With verify.overlap and an engine that streams, finished groups are verified while the rest generate."""
        prompts = [render_prompt(p, self.tokenizer, self.params.model.prompt) for p in problems]
        rp = self.params.rollout
        sampling = SamplingConfig(temperature=rp.temperature, top_p=rp.top_p, max_new_tokens=rp.max_new_tokens,
                                  seed=_step_seed(self.params.run.seed, step, self.rank, draw + 1 if draw else 0))
        t0 = time.perf_counter()
        rollouts, rewards = generate_verifying(self.engine, self.verifier, prompts, [p.answer for p in problems],
                                               rp.group_size, sampling, self.params.verify.overlap)
        return RolloutBatch(step, problems, prompts, rollouts, time.perf_counter() - t0, rewards)

    # ---- phase 2: verification and advantages ---------------------------------------------------
    def score(self, batch: RolloutBatch, check_health: bool = True) -> ScoredBatch:
        """`check_health`: the step's first draw is the one the reward monitor sees (once per step)."""
        G, tp = self.params.rollout.group_size, self.params.train
        stream = batch.rewards or RewardStream(self.verifier, [p.answer for p in batch.problems])
        scores = stream.result(batch.rollouts)  # what generation left to verify (all of it without overlap)
        if check_health:  # whole-step counts (a collective), so that every rank stops or trains on alike
            self.reward_health.check(reduce_over_processes(scores.stats, self.accelerator), batch.step)
        correct = torch.tensor(scores.rewards, dtype=torch.float32).view(-1, G)
        old = self.recompute_old_logprobs(batch.rollouts) if tp.recompute_old_logprobs else None
        per_rollout = [o.double().mean().item() if o.numel() else 0.0 for o in old] if old is not None else \
            [r.mean_logprob for r in batch.rollouts]
        mean_logprob = torch.tensor(per_rollout, dtype=torch.float64).view(-1, G)
        # The estimator's per-token hook first (pi_old per token); None: one advantage per sequence.
        token_adv = compute_token_advantages(tp, correct, [r.logprobs for r in batch.rollouts] if old is None else old)
        adv = compute_advantages(tp, correct, mean_logprob) if token_adv is None else torch.tensor(
            [a.double().mean().item() if a.numel() else 0.0 for a in token_adv], dtype=torch.float32).view(-1, G)
        return ScoredBatch(batch, correct, mean_logprob, adv, scores.wait_s, scores.stats.as_dict(),
                           old_logprobs=old, token_advantages=token_adv, verify_busy_seconds=scores.busy_s,
                           verify_streamed=scores.streamed_items)

    @torch.no_grad()
    def recompute_old_logprobs(self, rollouts: list[Rollout]) -> list[torch.Tensor]:
        """pi_old of every completion token from the trainer's forward pass, before any update of this
        batch, micro-batched as the update is (verl's compute_log_prob); on the CPU, one tensor per rollout."""
        out: list[torch.Tensor | None] = [None] * len(rollouts)
        for idx in self._micro_batches(rollouts, list(range(len(rollouts)))):
            batch = self._collate(rollouts, None, idx)
            logp, _ = self._logprobs(self.model, batch.input_ids, batch.attention, mask=batch.loss_mask)
            for row, i in enumerate(idx):  # the loss mask is 1 on exactly the completion's targets
                out[i] = logp[row][batch.loss_mask[row].bool()].float().cpu()
        return out

    # ---- phase 3: policy update -----------------------------------------------------------------
    def _collate(self, rollouts: list[Rollout], advantages: torch.Tensor | list[torch.Tensor] | None, idx: list[int],
                 old_logprobs: list[torch.Tensor] | None = None) -> MicroBatch:
        return collate(rollouts, advantages, idx, self.tokenizer.pad_token_id, self.accelerator.device, old_logprobs)

    def _micro_batches(self, rollouts: list[Rollout], idx: list[int]) -> list[list[int]]:
        """`idx` by train.micro_batch_size, or by train.micro_batch_tokens and then as many on every rank (the
        most any rank needs): each forward is a collective under FSDP and syncs buffers under DDP."""
        tp = self.params.train
        if tp.micro_batch_tokens is None:
            return [idx[i:i + tp.micro_batch_size] for i in range(0, len(idx), tp.micro_batch_size)]
        lengths = {i: len(rollouts[i].prompt_ids) + len(rollouts[i].completion_ids) for i in idx}
        micro = token_budget_split(lengths, tp.micro_batch_tokens)
        if self.world > 1:
            count = self.accelerator.gather(torch.tensor([len(micro)], device=self.accelerator.device)).max().item()
            if count > len(micro):
                micro = token_budget_split(lengths, tp.micro_batch_tokens, min_count=int(count))
        return micro

    def _logprobs(self, model, input_ids, attention, with_entropy=False, mask=None):
        """Log-probs [B, T-1], entropy (no gradient); train.logprob_chunk_tokens: on `mask` only (lens.logprobs)."""
        chunk, temperature = self.params.train.logprob_chunk_tokens, self.params.rollout.temperature
        with torch.autocast(self.accelerator.device.type, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            if chunk is not None and mask is not None:
                return completion_logprobs(model, input_ids, attention, mask, temperature, chunk, with_entropy,
                                           unwrapped=self.accelerator.unwrap_model(model))
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        return token_logprobs_and_entropy(logits, input_ids[:, 1:], temperature, with_entropy)

    def update(self, scored: ScoredBatch) -> dict:
        tp = self.params.train
        rollouts, advantages, old_logprobs = training_set(scored)  # [N] or per token; dynamic sampling's kept
        n_local = len(rollouts)
        mini_local = tp.mini_batch_size // self.world
        gen = torch.Generator().manual_seed(_step_seed(self.params.run.seed, scored.batch.step, self.rank, 1))
        applied: list[UpdateStats] = []
        tokens, t0 = 0, time.perf_counter()
        self.model.train()
        for _ in range(tp.ppo_epochs):
            order = torch.randperm(n_local, generator=gen).tolist()
            for mb_start in range(0, n_local, mini_local):
                mb = order[mb_start:mb_start + mini_local]
                stats, mb_tokens = self._minibatch_update(rollouts, advantages, mb, old_logprobs)
                tokens += mb_tokens
                if stats is not None:
                    applied.append(stats)
        seconds = time.perf_counter() - t0
        n = max(len(applied), 1)
        mean = UpdateStats(**{k: sum(getattr(u, k) for u in applied) / n
                              for k in ("loss", "clip_frac", "kl", "entropy", "grad_norm")}, tokens=tokens)
        return reduce_over_processes(mean, self.accelerator).metrics(seconds)

    def _minibatch_update(self, rollouts, advantages, mb: list[int], old_logprobs=None):
        tp = self.params.train
        micro = self._micro_batches(rollouts, mb)
        batches = [self._collate(rollouts, advantages, m, old_logprobs) for m in micro]
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
        for i, (input_ids, attention, mask, old_lp, adv, engine_lp) in enumerate(batches):
            last = i == len(batches) - 1
            # DDP all-reduces on the last backward only; every rank runs every backward, so no rank hangs.
            with (nullcontext() if last else self.accelerator.no_sync(self.model)):
                ref_lp = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_lp, _ = self._logprobs(self.ref_model, input_ids, attention, mask=mask)
                logp, entropy = self._logprobs(self.model, input_ids, attention, with_entropy=True, mask=mask)
                weights = (torch.exp(old_lp - engine_lp).clamp(max=tp.tis_cap) * mask  # truncated pi_old / pi_engine
                           if tp.rollout_correction == "tis" else None)
                out = self.compute_loss(logp, old_lp, adv, mask, ref_lp, normalizer, is_weights=weights)
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
        return UpdateStats(**acc, grad_norm=float(grad_norm)), tokens

    def compute_loss(self, logp, old_lp, adv, mask, ref_lp, normalizer, is_weights=None):
        """The clipped loss with this run's settings (a seam for tests that inject a NaN)."""
        tp = self.params.train
        return policy_loss(logp, old_lp, adv, mask, clip_low=tp.clip_low, clip_high=tp.clip_high,
                           dual_clip_c=tp.dual_clip_c, is_weights=is_weights,
                           loss_agg=tp.loss_agg, ref_logprobs=ref_lp, kl_beta=tp.kl_beta, normalizer=normalizer)

    # ---- one step -------------------------------------------------------------------------------
    def step_metrics(self, scored: ScoredBatch) -> dict:
        """Rollout-side metrics of the whole step (sums over processes, then ratios)."""
        counts = reduce_over_processes(RolloutCounts.of(scored), self.accelerator)
        return counts.metrics(scored.batch.seconds, scored.verify_seconds, scored.verify_busy_seconds)

    def train_step(self, run_phase: Callable | None = None) -> dict:
        """One RL step, each phase through `run_phase(name, fn)` (default: call it); returns its metrics."""
        run_phase = self._watch_memory(run_phase or _call, self.state.step + 1)
        started = time.perf_counter()
        if self.accelerator.device.type == "cuda":  # perf/mem_peak_gib: this step's peak
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
        batch = run_phase("generate_rollouts", self.rollout)
        scored = run_phase("verify_rollouts", lambda: self.score(batch))
        if self.params.train.dynamic_sampling:  # drop zero-variance groups, draw more (lens.sampling)
            scored = run_phase("dynamic_sampling", lambda: fill_batch(self, scored))
        return run_phase("update_policy", lambda: self.complete_step(scored, started))

    def _watch_memory(self, run_phase: Callable, step: int) -> Callable:
        """Log this process's memory around each phase (debug level): where the engine and the trainer meet."""
        def watched(name: str, fn: Callable):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("step %d %s: memory before %s", step, name, memory_text(self.accelerator.device))
            try:
                return run_phase(name, fn)
            finally:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("step %d %s: memory after %s", step, name, memory_text(self.accelerator.device))
        return watched

    def complete_step(self, scored: ScoredBatch, started: float) -> dict:
        """Phase 3 and the step's record: update, weight sync, step counter, rollouts parquet, metrics row."""
        metrics = self.step_metrics(scored) | self.update(scored)
        self.engine.sync_weights(self.unwrapped_model)
        self.state.step += 1
        metrics |= {"train/skipped_steps": self.state.skipped_updates, "train/lr": self.scheduler.get_last_lr()[0],
                    "perf/weight_sync_s": getattr(self.engine, "last_sync_seconds", 0.0),
                    "perf/mem_peak_gib": memory_gib(self.accelerator.device)["peak"],
                    "perf/step_s": time.perf_counter() - started}
        self.save_rollouts(scored)
        self.log_metrics(metrics)
        return metrics

    def log_metrics(self, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            append_metrics(self.files.metrics, {"step": self.state.step} | metrics)
        for cb in self.callbacks:
            cb(self.state.step, metrics)

    def save_rollouts(self, scored: ScoredBatch) -> None:
        """What the model wrote and what the algorithm did with it, one parquet file per step (main rank)."""
        b = scored.batch
        columns = rollout_columns(b.step, b.problems, b.prompts, b.rollouts, scored,
                                  self.params.rollout.group_size, self.rank)
        # Multi-process fix: every rank holds a different shard of the step's rollouts; gather them all
        # (collective: every rank calls it) so the record is the whole batch, not rank 0's share.
        if self.world > 1:
            from accelerate.utils import gather_object

            shards = gather_object([columns])
            columns = {k: [v for shard in shards for v in shard[k]] for k in columns}
        if self.accelerator.is_main_process:
            write_rollouts(self.files.rollout_file(b.step), {k: columns[k] for k in ROLLOUT_COLUMNS})

    # ---- checkpoints ----------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.state.step, asdict(self.state))

    def load_checkpoint(self, path: Path) -> None:
        self.state = TrainState(**self.checkpoints.load(path))
        self.engine.sync_weights(self.unwrapped_model)
        # Metrics and rollouts after the checkpoint belong to the lost future: drop them.
        if self.accelerator.is_main_process:
            truncate_metrics(self.files.metrics, self.state.step)
        log.info("resumed from %s (step %d)", path, self.state.step)

    def save_final(self, path: Path | None = None) -> Path:
        return self.checkpoints.save_final(path or self.files.final)

    def close(self) -> None:
        self.verifier.close()
        self.engine.close()
        if self._lock is not None:
            self._lock.release()


def _call(name: str, fn: Callable):
    return fn()

