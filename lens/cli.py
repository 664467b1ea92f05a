"""`lens <command> [--profile NAME] [--algo grpo|lens] [key.path=value ...]`: the stages from a shell."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lens import estimators
from lens.params import ParamsError, flatten, load_params

COMMANDS = {
    "prepare": "load and normalise the profile's train/eval problems",
    "warm-start": "build and supervise the tiny model so RL has a start (tiny profile)",
    "train": "RL-train with an estimator (--algo: grpo, lens, ...), checkpointing; --resume continues a killed run",
    "evaluate": "per-level accuracy and pass@k of a trained policy (--algo or --model)",
    "compare": "every arm (compare.arms) vs the baseline per level, paired-bootstrap confidence intervals",
    "all": "prepare, warm-start, train and evaluate every arm of compare.arms, compare",
    "study": "every arm of study.arms x every seed of study.seeds from one warm start, then one report with "
             "CIs over seeds (a re-run skips finished runs)",
    "params": "print the resolved parameters (--explain: with one-line meanings)",
    "replay-tracking": "send the MLflow records runs left on disk (tracking_buffer*.jsonl) when the store did not "
                       "answer",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens", description="LENS / GRPO RL on math, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="params.yaml overrides")
        p.add_argument("--profile", default=None, help="profile from params.yaml (default: its `profile:`)")
        p.add_argument("--params-file", default=None, help="params file (default: the project's params.yaml)")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name in ("train", "evaluate"):
            p.add_argument("--algo", choices=estimators.names(), default=None, help="sets train.algo")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        if name == "all":
            p.add_argument("--resume", action="store_true",
                           help="continue the arms a killed run left unfinished (finished arms train afresh)")
        if name == "train":
            p.add_argument("--max-steps", type=int, default=None, help="stop after this many more steps")
            p.add_argument("--dry-run", action="store_true",
                           help="validate the configuration and print the plan (batches, prompt, per-GPU memory); "
                                "refuse one that cannot fit the GPU; load and download nothing")
            p.add_argument("--world-size", type=int, default=None, metavar="N",
                           help="dry run: plan for N processes (default: accelerate launch's WORLD_SIZE, else 1)")
            p.add_argument("--fsdp", action="store_true", default=None,
                           help="dry run: plan for FSDP (default: as accelerate launch set it, else DDP)")
        if name == "evaluate":
            p.add_argument("--model", default=None, help="evaluate this model directory instead of <algo>/final")
            p.add_argument("--out", default=None, help="where to write the evaluation JSON")
        if name == "study":
            p.add_argument("--jobs", type=int, default=None, help="runs trained at once (sets study.jobs)")
        if name == "replay-tracking":
            p.add_argument("--path", default=None,
                           help="a buffer file or directory (default: every one under the profile's outputs)")
        if name == "params":
            p.add_argument("--explain", action="store_true", help="show each key's meaning")
    return parser


def train_plan(params, world_size: int = 1, fsdp: bool = False, gpu_memory_gb: float | None = None) -> dict:
    """The batch arithmetic and per-GPU memory a user wants to see before paying for a run."""
    from lens.memory_plan import memory_plan

    tp, rp = params.train, params.rollout
    samples = tp.prompts_per_step * rp.group_size
    updates = tp.ppo_epochs * -(-samples // tp.mini_batch_size)
    return {
        "profile": params.profile, "algo": tp.algo,
        "model": params.model.name_or_path if params.model.source == "hub" else params.model.source,
        "dtype": params.model.dtype, "compute_dtype": params.model.compute_dtype,
        "gradient_checkpointing": params.model.gradient_checkpointing,
        "rollout_engine": rp.engine, "group_size": rp.group_size, "max_new_tokens": rp.max_new_tokens,
        "data": {"train": params.data.train_source, "eval": params.data.eval_source, "levels": params.data.levels},
        "prompts_per_step": tp.prompts_per_step, "samples_per_step": samples,
        "samples_per_update": tp.mini_batch_size, "updates_per_rollout_batch": updates,
        "micro_batch_size": tp.micro_batch_size, "micro_batch_tokens": tp.micro_batch_tokens,
        # by count; with micro_batch_tokens the split follows each mini-batch's lengths
        "grad_accumulation_steps": (-(-tp.mini_batch_size // tp.micro_batch_size) if tp.micro_batch_tokens is None
                                    else "by token budget"),
        "steps": tp.steps, "total_updates": tp.steps * updates,
        "total_samples": tp.steps * samples, "max_rollout_tokens": tp.steps * samples * rp.max_new_tokens,
        "clip": [tp.clip_low, tp.clip_high], "kl_beta": tp.kl_beta, "lr": tp.lr,
        "outputs": str(params.algo_dir()),
        "prompt": _prompt_example(params),
        "memory": memory_plan(params, world_size, fsdp, gpu_memory_gb),
    } | _section(tp)


def _prompt_example(params) -> dict:
    """One prompt as the policy will see it: the first prepared train problem (or a stand-in), rendered
    with model.prompt. A chat template needs the tokenizer: used only if already on disk, never downloaded."""
    from lens.data import Problem, profile_tokenizer, read_problems, render_prompt

    prompt = params.model.prompt
    train_file = params.data_dir / "train.jsonl"
    problems = read_problems(train_file)[:1] if train_file.exists() else []
    problem = problems[0] if problems else Problem("example", "What is $1 + 2 \\cdot 3$?", "7", 1, "example")
    plan = {"template": prompt.template, "instruction": prompt.instruction,
            "problem": str(train_file) if problems else "a stand-in (no prepared data yet)",
            "max_prompt_tokens": params.data.max_prompt_tokens}
    tokenizer = profile_tokenizer(params, local_only=True) if prompt.template == "chat" else None
    if prompt.template == "chat" and tokenizer is None:
        return plan | {"rendered": None, "note": "the chat template needs the model's tokenizer, which is not on "
                                                 "this machine yet (a dry run downloads nothing)"}
    return plan | {"rendered": render_prompt(problem, tokenizer, prompt)}


def _section(train_params) -> dict:
    """{section: values} of the estimator train.algo names, e.g. {"lens": {"alpha": ...}} ({} if none)."""
    section = estimators.get(train_params.algo).section
    return {section: getattr(train_params, section).model_dump()} if section else {}


def explain(params) -> str:
    from lens.params import Params

    def walk(model_cls, obj, prefix=""):
        for name, field in model_cls.model_fields.items():
            value = getattr(obj, name)
            key = f"{prefix}{name}"
            sub = getattr(field.annotation, "model_fields", None)
            if sub is not None:
                yield from walk(field.annotation, value, key + ".")
            else:
                yield f"{key} = {json.dumps(value, default=str)}    # {field.description or ''}"

    return "\n".join(walk(Params, params))


def run(args: argparse.Namespace) -> object:
    overrides = list(args.overrides)
    if getattr(args, "algo", None):
        overrides.append(f"train.algo={args.algo}")
    if getattr(args, "jobs", None):
        overrides.append(f"study.jobs={args.jobs}")
    params = load_params(args.profile, overrides, args.params_file)
    from lens import stages

    cmd = args.command
    if cmd == "params":
        return explain(params) if args.explain else flatten(params)
    if cmd == "prepare":
        return stages.prepare(params)
    if cmd == "warm-start":
        return stages.warm_start(params)
    if cmd == "train" and args.dry_run:
        return _dry_run(params, args)
    if cmd == "replay-tracking":
        from lens.tracking import replay_buffer

        dirs = [Path(args.path)] if args.path else sorted({p.parent for p in params.root.rglob("tracking_buffer*.jsonl")})
        return {str(d): {k: v for k, v in vars(replay_buffer(d, params)).items() if not k.endswith("_by_run")}
                for d in dirs}

    # MLflow: a no-op when tracking.enabled is false; an unreachable server fails here, before any work.
    from lens import pipeline, versioning
    from lens.loop import Runner
    from lens.tracking import Tracker

    runner = Runner()
    if cmd == "train":
        tracker = Tracker(params)
        with tracker.algo_run(params.train.algo, params):
            pipeline.record_dataset(tracker, params, versioning.data_hash(params.data_dir))
            summary = pipeline.train_arm(params, tracker, runner, resume=args.resume, max_steps=args.max_steps)
            if summary["done"]:
                pipeline.publish_policy(params, tracker, runner)
        return summary
    if cmd == "evaluate":
        tracker = Tracker(params)
        algo = params.train.algo
        with tracker.algo_run(algo, params, run_id=tracker.latest_algo_run(algo)):
            summary = pipeline.evaluate_arm(params, tracker, runner, model_path=args.model, out_path=args.out)
        return {k: summary[k] for k in ("metrics", "model", "seconds")}
    if cmd == "compare":
        with Tracker(params, run_name=f"compare-{params.profile}") as tracker:
            cmp = pipeline.run_comparison(params, tracker, runner)
        return _comparison_result(cmp, tracker.run_url())
    if cmd == "all":
        t0 = time.perf_counter()
        result = pipeline.run_pipeline(
            params, lambda arm: load_params(args.profile, overrides + [f"train.algo={arm}"], args.params_file),
            runner, arms=params.compare.arms, compare=True, run_name=f"all-{params.profile}",
            resume="auto" if args.resume else False)
        return _comparison_result(result["comparison"], result["mlflow_url"]) | {
            "seconds": round(time.perf_counter() - t0, 1)}
    if cmd == "study":
        from lens.study import run_study

        result = run_study(params, runner)
        print(Path(result["files"]["markdown"]).read_text())
        return result
    raise AssertionError(cmd)


def _dry_run(params, args) -> dict:
    """train_plan for the launch topology (accelerate's, or --world-size/--fsdp); a plan that cannot fit the
    GPU is printed, then refused (exit 2) with the keys to change, as are set-ups FSDP does not implement."""
    from lens.memory_plan import gpu_memory, launch_topology, memory_refusal
    from lens.preflight import check_fsdp_support

    world, fsdp = launch_topology()
    world = args.world_size or world
    fsdp = fsdp if args.fsdp is None else args.fsdp
    try:
        check_fsdp_support(params, fsdp, fsdp2=True)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    memory_gb, memory_source = gpu_memory(params)
    plan = train_plan(params, world, fsdp, memory_gb)
    plan["memory"]["gpu_memory_source"] = memory_source
    refusal = memory_refusal(plan["memory"], params, memory_source)
    if refusal:
        print(json.dumps(plan, indent=2, default=str))
        raise ParamsError(refusal)
    return plan


def _comparison_result(cmp: dict, mlflow_url: str | None) -> dict:
    print(Path(cmp["files"]["md"]).read_text())
    return {"files": cmp["files"], "mlflow": mlflow_url}


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures with a message meant for the user: printed without a traceback, exit code 1."""
    from lens.checkpoint import CheckpointError
    from lens.records import RunInUseError
    from lens.reward_health import RewardHealthError
    from lens.tracking import TrackingError
    from lens.train import NonFiniteLossError
    from lens.verify import VerifierError

    return (FileNotFoundError, TrackingError, NonFiniteLossError, VerifierError, CheckpointError, RunInUseError,
            RewardHealthError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before, between or after the flags: argparse takes the first run of them as the
    # positional list and leaves later ones unrecognised; those that look like key=value join the list.
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    if getattr(args, "world_size", None) is not None and args.world_size < 1:
        parser.error("--world-size must be >= 1")
    if (getattr(args, "world_size", None) is not None or getattr(args, "fsdp", None)) and not args.dry_run:
        parser.error("--world-size and --fsdp describe a dry run; a run takes them from accelerate launch")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # transformers' per-shard progress bars drown the training progress in a terminal.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        result = run(args)
    except ParamsError as exc:
        print(f"lens: {exc}", file=sys.stderr)
        return 2
    except _expected_errors() as exc:  # evaluated only when something raised: imports stay lazy
        print(f"lens: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
