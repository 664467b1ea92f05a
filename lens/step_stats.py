"""A step's statistics as typed records whose fields carry their reduction over processes.

Each process fills a record for its share of the step; `reduce_over_processes` sums every field over
processes (one all-reduce), divides the fields marked MEAN by the number of processes and keeps LOCAL ones. Metrics are
then named where they are computed (`RolloutCounts.metrics`, `UpdateStats.metrics`), never gathered
positionally and named later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

import torch

from lens.estimators.groups import group_masks

MEAN = {"reduce": "mean"}    # averaged over processes (each process's value describes an equal share)
LOCAL = {"reduce": "none"}   # already the same on every process: kept as it is
R = TypeVar("R")


def memory_gib(device: torch.device) -> dict[str, float]:
    """This process's memory: on CUDA allocated / reserved / peak allocated (since the last reset); elsewhere
    the resident set and its high-water mark (the process's lifetime)."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.memory_allocated(device) / 2**30,
                "reserved": torch.cuda.memory_reserved(device) / 2**30,
                "peak": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    statm = Path("/proc/self/statm")  # Linux; elsewhere the high-water mark alone
    rss = {"rss": int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30} if statm.exists() else {}
    return rss | {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss: KiB on Linux


def memory_text(device: torch.device) -> str:
    """`memory_gib` for a log line."""
    return ", ".join(f"{k} {v:.2f} GiB" for k, v in memory_gib(device).items())


def reduce_over_processes(record: R, accelerator) -> R:
    """The record summed over processes (fields marked MEAN: averaged)."""
    if accelerator is None or accelerator.num_processes == 1:
        return record
    names = [f.name for f in fields(record)]
    local = torch.tensor([float(getattr(record, n)) for n in names], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").tolist()
    world = accelerator.num_processes
    how = {f.name: f.metadata.get("reduce", "sum") for f in fields(record)}
    reduced = {n: v / world if how[n] == "mean" else v for n, v in zip(names, total, strict=True)}
    return replace(record, **{n: v for n, v in reduced.items() if how[n] != "none"})


@dataclass
class RolloutCounts:
    """Sums over a step's rollouts and their verification (this process's share until reduced)."""

    correct: float = 0.0
    samples: int = 0
    groups: int = 0
    groups_all_correct: int = 0
    groups_all_wrong: int = 0
    groups_mixed: int = 0
    samples_with_signal: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    negative_adv_abs: float = 0.0          # sum of |advantage| over samples of all-wrong groups
    negative_samples: int = 0
    verify_timeouts: int = 0
    verify_errors: int = 0
    verify_parse_failures: int = 0
    verify_rejected: int = 0               # scored 0 unverified: too long or nested too deep (lens.reward_health)
    verify_sanitized: int = 0              # NUL bytes / invalid UTF-8 removed before scoring
    verify_gold_errors: int = 0            # gold answers that did not parse (scored 0, never 1)
    verify_streamed: int = 0               # handed to the verifier before generation ended (verify.overlap)
    # engine vs trainer log-probs of the same tokens (when pi_old is recomputed): sums over tokens
    logprob_abs_diff: float = 0.0
    logprob_k3: float = 0.0                # k3 estimate of KL(engine || trainer), >= 0 per token
    logprob_tokens: int = 0
    groups_trained: int = 0                # groups the update used (all of them unless dynamic sampling)
    groups_dropped_zero_variance: int = 0  # all-correct / all-wrong groups dynamic sampling left out
    sampling_rounds: int = field(default=1, metadata=LOCAL)  # generation rounds of the step (the same on every rank)

    @classmethod
    def of(cls, scored) -> RolloutCounts:
        """Counts of a `lens.train.ScoredBatch`."""
        all_correct, all_wrong, mixed = group_masks(scored.correct)
        adv, rollouts, vs = scored.advantages, scored.batch.rollouts, scored.verify_stats
        # |advantage| per sample: per-token advantages by their token mean of |A| (their own mean can cancel)
        adv_abs = adv.abs() if scored.token_advantages is None else torch.tensor(
            [a.abs().mean().item() if a.numel() else 0.0 for a in scored.token_advantages]).view_as(adv)
        trained = torch.ones_like(mixed) if scored.trained is None else scored.trained
        diff = k3 = 0.0
        tokens = 0
        if scored.old_logprobs is not None:
            for r, trainer in zip(rollouts, scored.old_logprobs, strict=True):
                log_ratio = trainer.double() - torch.tensor(r.logprobs, dtype=torch.float64)
                diff += log_ratio.abs().sum().item()
                k3 += (log_ratio.exp() - log_ratio - 1).sum().item()
                tokens += log_ratio.numel()
        return cls(
            logprob_abs_diff=diff, logprob_k3=k3, logprob_tokens=tokens,
            correct=scored.correct.sum().item(), samples=scored.correct.numel(), groups=scored.correct.shape[0],
            groups_all_correct=int(all_correct.sum()), groups_all_wrong=int(all_wrong.sum()),
            groups_mixed=int(mixed.sum()), samples_with_signal=int((adv_abs != 0).sum()),
            completion_tokens=sum(len(r.completion_ids) for r in rollouts),
            truncated=sum(r.truncated for r in rollouts), negative_adv_abs=adv_abs[all_wrong].sum().item(),
            groups_trained=int(trained.sum()), sampling_rounds=scored.sampling_rounds,
            groups_dropped_zero_variance=int(((all_correct | all_wrong) & ~trained).sum()),
            negative_samples=int(all_wrong.sum()) * adv.shape[1], verify_timeouts=vs.get("timeouts", 0),
            verify_errors=vs.get("errors", 0), verify_parse_failures=vs.get("parse_failures", 0),
            verify_rejected=vs.get("rejected", 0), verify_sanitized=vs.get("sanitized", 0),
            verify_gold_errors=vs.get("gold_errors", 0), verify_streamed=scored.verify_streamed)

    def metrics(self, rollout_s: float, verify_s: float, verify_busy_s: float = 0.0) -> dict[str, float]:
        """verify_s: what the step waited for the verifier after generation; verify_busy_s: its working time
        (more than verify_s when it verified groups while the engine generated the rest, verify.overlap)."""
        return {
            "train/reward_mean": self.correct / self.samples, "train/acc": self.correct / self.samples,
            "train/frac_groups_all_correct": self.groups_all_correct / self.groups,
            "train/frac_groups_all_wrong": self.groups_all_wrong / self.groups,
            "train/frac_groups_mixed": self.groups_mixed / self.groups,
            "train/frac_samples_with_signal": self.samples_with_signal / self.samples,
            "train/response_len_mean": self.completion_tokens / self.samples,
            "train/truncated_frac": self.truncated / self.samples,
            "train/negative_group_adv_abs_mean": (self.negative_adv_abs / self.negative_samples
                                                  if self.negative_samples else 0.0),
            "perf/rollout_tok_s": self.completion_tokens / max(rollout_s, 1e-9),
            "verify/timeouts": self.verify_timeouts, "verify/errors": self.verify_errors,
            "verify/parse_failures": self.verify_parse_failures, "verify/rejected": self.verify_rejected,
            "verify/sanitized": self.verify_sanitized, "verify/gold_errors": self.verify_gold_errors,
            "train/samples": self.samples, "train/completion_tokens": self.completion_tokens,
            "perf/rollout_s": rollout_s, "perf/verify_s": verify_s, "perf/verify_busy_s": verify_busy_s,
            "verify/streamed_frac": self.verify_streamed / self.samples,
            # dynamic sampling's cost: every rollout generated (dropped ones included) and the groups kept
            "train/rollouts_generated": self.samples, "train/groups_trained": self.groups_trained,
            "train/groups_dropped_zero_variance": self.groups_dropped_zero_variance,
            "train/dynamic_sampling_rounds": self.sampling_rounds,
        } | ({"train/rollout_logprob_abs_diff": self.logprob_abs_diff / self.logprob_tokens,
              "train/rollout_trainer_kl": self.logprob_k3 / self.logprob_tokens} if self.logprob_tokens else {})


@dataclass
class UpdateStats:
    """Means over a step's optimiser updates (per process: each holds an equal shard of the batch)."""

    loss: float = field(default=0.0, metadata=MEAN)
    clip_frac: float = field(default=0.0, metadata=MEAN)
    kl: float = field(default=0.0, metadata=MEAN)
    entropy: float = field(default=0.0, metadata=MEAN)
    grad_norm: float = field(default=0.0, metadata=LOCAL)  # already global (measured after the all-reduce): not reduced
    tokens: int = 0                        # prompt + completion tokens trained on (summed)

    def metrics(self, seconds: float) -> dict[str, float]:
        return {"train/loss": self.loss, "train/clip_frac": self.clip_frac, "train/kl": self.kl,
                "train/entropy": self.entropy, "train/grad_norm": self.grad_norm,
                "perf/train_tok_s": self.tokens / max(seconds, 1e-9), "perf/update_s": seconds}
