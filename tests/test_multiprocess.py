"""Multi-process training on CPU (accelerate + gloo), the paper profile's dry run, and the GPU check's smoke run.

What "two processes end within a tolerance of one" can mean. The trainer seeds sampling per (step, rank),
and transformers' `generate` draws a whole batch from one RNG stream, so two processes sample different
completions than one process does for the same prompts: their runs cannot be compared sample by sample.
The equivalence test therefore swaps in `GroupSeededEngine`, which generates each prompt's group on its
own with a seed derived from (run seed, step, prompt), never from the rank: sampling is then independent
of how prompts are sharded, and 1 and 2 processes see identical rollouts at step 0 (and, after updates
that agree to float rounding, at later steps). Everything else is the real code path (`lens.cli train`:
sharding, DDP all-reduce with no_sync micro-batches, loss normalisation, LR schedule, reduced metrics,
checkpoints). With one optimiser update per step (mini_batch_size = the global samples per step) the two
runs compute the same mathematical update, so they differ only by float summation order:
  * rollout-side metrics and every sampled completion: identical (exact);
  * train/loss, train/entropy, train/grad_norm per step: relative difference <= 1e-4;
  * train/lr per step: equal (the schedule must not advance `world` times per update);
  * final policy: per-token log-probs on a fixed probe batch within 1e-4 (absolute), while training moved
    them by at least 100x that. Measured: 5e-7 apart, moved by 0.1; losses 2e-6 apart (relative).
    (The function is compared, not each tensor: Adam can turn rounding noise in gradients that are zero
    in exact arithmetic, like the k-projection bias's, into +-lr steps that change no output.)
The token-mean loss aggregation is used there because it is the case where per-rank normalisation was
wrong (ranks hold different token counts), and a linear schedule with warm-up because accelerate's
prepared scheduler stepped `world` times per update; seq-mean-token-mean and several updates per step
are exercised by the plain CLI run.

Run this module as `python -m tests.test_multiprocess <lens train args>` to get the CLI with
`GroupSeededEngine` installed: that is what the equivalence test launches under accelerate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.helpers import SMALL, random_policy, small_params, synthetic_data

CPU_CONFIG = PROJECT_ROOT / "infra" / "accelerate" / "cpu_2proc.yaml"
FSDP_CONFIG = PROJECT_ROOT / "infra" / "accelerate" / "fsdp_8gpu.yaml"
NO_TRACKING = ["tracking.enabled=false"]  # MLflow has its own tests; here it would only cost ~17 s per DB
RTOL_TRAIN = 1e-4
ATOL_LOGPROB = 1e-4
ATOL_ADAM = 1e-3  # relative to the tensor's largest entry


# ---- sharding-independent sampling (test seam) ----------------------------------------------------
class GroupSeededEngine:
    """Wraps an engine: each prompt's G samples come from a seed of (step seed, prompt text).

    The step seed is `sampling.seed`, which `install_group_seeded_engine` makes independent of the rank;
    being a function of the step, it survives a restart, so a resumed run samples what an unbroken one does.
    """

    def __init__(self, inner):
        self.inner = inner

    @staticmethod
    def group_seed(step_seed: int, prompt: str) -> int:
        digest = hashlib.sha256(f"{step_seed}|{prompt}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes < 2**63 safely

    def generate(self, prompts, n, sampling):
        out = []
        for i, prompt in enumerate(prompts):
            seeded = dataclasses.replace(sampling, seed=self.group_seed(sampling.seed, prompt))
            for r in self.inner.generate([prompt], n, seeded):
                r.prompt_index = i
                out.append(r)
        return out

    def sync_weights(self, model):
        self.inner.sync_weights(model)

    def close(self):
        self.inner.close()


def install_group_seeded_engine(setattr_=setattr) -> None:
    import lens.train

    real_engine, real_seed = lens.train.make_engine, lens.train._step_seed

    def make_engine(params, model, tokenizer, **kwargs):
        return GroupSeededEngine(real_engine(params, model, tokenizer, **kwargs))

    def step_seed(seed, step, rank=0, stream=0):  # the same on every rank
        return real_seed(seed, step, 0, stream)

    setattr_(lens.train, "make_engine", make_engine)
    setattr_(lens.train, "_step_seed", step_seed)


# ---- FSDP on the CPU (test seam) --------------------------------------------------------------------
def force_fsdp_on_cpu(config: Path = FSDP_CONFIG) -> None:
    """Make the trainer's Accelerator run FSDP2 over gloo, with the FSDP settings of the shipped GPU config.

    accelerate only turns FSDP on for accelerator devices (its FSDP branch lists CUDA, XPU, NPU...; a CPU
    run becomes MULTI_CPU = DDP), although torch's `fully_shard` itself works on CPU tensors with gloo.
    So this seam sets the FSDP_* environment that `accelerate launch --config_file fsdp_8gpu.yaml` sets
    (minus bf16, which the CPU test does not want), builds the plugin from it, and overrides the
    distributed type after construction. Everything downstream is the real thing: accelerate's FSDP2
    preparation (one `fully_shard` unit per decoder layer, rank-0 loading with broadcast), DTensor
    parameters, sharded AdamW state, FSDP's gradient reduce-scatter, and the trainer's FSDP code paths.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    import lens.train

    args = launch_command_parser().parse_args(["--config_file", str(config), "--mixed_precision", "no", "x.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith("FSDP_") or key in ("ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION"):
            os.environ[key] = value
    real = lens.train.Accelerator

    def fsdp_accelerator(**kwargs):
        plugin = FullyShardedDataParallelPlugin()
        accelerator = real(**kwargs, fsdp_plugin=plugin)
        assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
        # Both state objects: AcceleratorState() re-copies PartialState's fields every time it is constructed.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        return accelerator

    lens.train.Accelerator = fsdp_accelerator


# ---- helpers --------------------------------------------------------------------------------------
def accelerate_launch(module: str, args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "accelerate"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launcher, "launch", "--config_file", str(CPU_CONFIG), "-m", module, *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def rollout_tables(out: Path) -> dict[int, dict]:
    import pyarrow.parquet as pq

    files = sorted((out / "rollouts").glob("step-*.parquet"))
    return {int(p.stem.split("-")[1]): pq.read_table(p).to_pydict() for p in files}


def probe_logprobs(model_dir: Path, texts: list[str]):
    import torch

    from lens.models import load_model, load_tokenizer

    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, enc["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return lp * enc["attention_mask"][:, 1:]


def _setup(root: Path, *extra: str):
    params = small_params(root, *extra)
    random_policy(params)
    synthetic_data(params)
    return params


# ---- tests ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_shard_prompts_reduce_metrics_and_write_one_checkpoint(tmp_path):
    """`accelerate launch --num_processes 2 -m lens.cli train` as a user runs it (rank-seeded sampling)."""
    params = _setup(tmp_path, "train.algo=lens")
    accelerate_launch("lens.cli", ["train", "--profile", "tiny", "--algo", "lens", f"run.output_root={tmp_path}",
                                   *SMALL, *NO_TRACKING])
    out = params.algo_dir("lens")
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone writes: one row per step
    tables = rollout_tables(out)
    assert sorted(tables) == [0, 1, 2]
    per_step = params.train.prompts_per_step * params.rollout.group_size
    for step, t in tables.items():
        assert len(t["completion"]) == per_step  # both ranks' shards gathered into the record
        by_rank = {r: {pid for pid, rk in zip(t["problem_id"], t["rank"]) if rk == r} for r in (0, 1)}
        assert len(by_rank[0]) == len(by_rank[1]) == params.train.prompts_per_step // 2
        assert not by_rank[0] & by_rank[1]  # data sharded: each rank its own questions
        # Metrics are reduced over both shards, not rank 0's share.
        row = rows[step]
        assert row["train/response_len_mean"] == pytest.approx(sum(t["num_tokens"]) / per_step)
        assert row["train/truncated_frac"] == pytest.approx(sum(t["truncated"]) / per_step)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002", "step-000003"]  # keep 2, no temp
    assert (ckpts / "latest").read_text() == "step-000003"
    assert (out / "final" / "model.safetensors").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["done"] and summary["updates"] == 3 * 2 and summary["skipped_updates"] == 0


EQUIVALENCE = ["train.algo=lens", "train.loss_agg=token-mean", "train.mini_batch_size=16",  # one update per step
               "train.lr_schedule=linear", "train.warmup_steps=1", "train.lr=1e-3"]
EQUIVALENCE_ARGS = ["train", "--profile", "tiny", *SMALL, *NO_TRACKING, *EQUIVALENCE]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference: the same 3 steps in this process, with the same sharding-independent sampling."""
    from tests.shared_runs import one_process_runs

    return small_params(one_process_runs(tmp_path_factory) / "whole", *EQUIVALENCE)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_two_processes_with_the_same_global_batch_match_one_process(backend, one_process_run, tmp_path_factory,
                                                                     tmp_path):
    """DDP and FSDP2, each run as a user would after a crash: 2 steps, then `--resume` for the third.

    So the two-process checkpoint (sharded weights and optimizer state) is written by one launch and read
    back by the next; a mistake there changes the third step's update. (The runs are tests/shared_runs.py's,
    which tests/test_sharded_checkpoints.py also checks.)
    """
    from tests.shared_runs import two_process_runs

    p1 = one_process_run
    out1, out2 = p1.algo_dir("lens"), two_process_runs(backend, tmp_path_factory).resumed.dir
    summary = json.loads((out2 / "train_summary.json").read_text())
    assert summary["distributed"] == {"type": "FSDP" if backend == "fsdp" else "MULTI_CPU", "processes": 2}
    assert summary["done"] and summary["step"] == 3
    t1, t2 = rollout_tables(out1), rollout_tables(out2)
    assert sorted(t1) == sorted(t2) == [0, 1, 2]
    for step in t1:
        s1 = {(pid, s): c for pid, s, c in zip(t1[step]["problem_id"], t1[step]["sample"], t1[step]["completion"])}
        s2 = {(pid, s): c for pid, s, c in zip(t2[step]["problem_id"], t2[step]["sample"], t2[step]["completion"])}
        assert s1 == s2, f"step {step}: the two runs sampled different completions"
        assert set(t2[step]["rank"]) == {0, 1}

    rows1, rows2 = metrics_rows(out1), metrics_rows(out2)
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3]
    exact = ["train/acc", "train/frac_groups_all_wrong", "train/frac_groups_mixed", "train/response_len_mean",
             "train/truncated_frac", "train/frac_samples_with_signal", "train/lr"]
    for r1, r2 in zip(rows1, rows2):
        for key in exact:
            assert r1[key] == pytest.approx(r2[key], rel=1e-12), key
        for key in ("train/loss", "train/entropy", "train/grad_norm", "train/negative_group_adv_abs_mean"):
            assert r1[key] == pytest.approx(r2[key], rel=RTOL_TRAIN, abs=1e-9), (key, r1[key], r2[key])
    # warm-up over 1 update then linear decay to 0 at update 3: the LR *after* each step's update
    assert [r["train/lr"] for r in rows1] == pytest.approx([1e-3, 5e-4, 0.0])

    # One process writes whole, name-keyed optimizer state; two write it sharded (torch.distributed.checkpoint),
    # read back here as whole tensors with torch's converter: the same names and values.
    opt1 = torch_load(out1 / "checkpoints" / "step-000003" / "optimizer.pt")
    opt2 = gathered_dcp(out2 / "checkpoints" / "step-000003", tmp_path)["optimizer"]
    assert opt1["state"].keys() == opt2["state"].keys() and len(opt1["state"]) > 0
    for name, s1 in opt1["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = s1[key], opt2["state"][name][key]
            assert a.shape == b.shape, (name, key)
            assert (a - b).abs().max().item() <= ATOL_ADAM * max(a.abs().max().item(), 1e-12) + 1e-12, (name, key)

    probe = [f"Q: {i}+{j}=?\nA: \\boxed{{{i + j}}}" for i, j in [(1, 2), (3, 4), (12, 30), (7, 8)]]
    start = probe_logprobs(p1.warm_start_dir / "model", probe)
    lp1, lp2 = probe_logprobs(out1 / "final", probe), probe_logprobs(out2 / "final", probe)
    diff, moved = (lp1 - lp2).abs().max().item(), (lp1 - start).abs().max().item()
    assert diff <= ATOL_LOGPROB, diff
    assert moved >= 100 * ATOL_LOGPROB, f"training barely moved the policy ({moved}): the comparison says nothing"


def torch_load(path: Path):
    import torch

    return torch.load(path, weights_only=True)


def gathered_dcp(checkpoint: Path, scratch: Path) -> dict:
    """A sharded checkpoint's whole state, converted by torch (dcp_to_torch_save) and loaded weights_only."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(checkpoint / "dcp", scratch / "gathered.pt")
    return torch_load(scratch / "gathered.pt")


def test_paper_dry_run_prints_the_batch_arithmetic_and_loads_nothing(tmp_path):
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "lens.cli", "train", "--dry-run", "--profile", "paper", "--algo", "lens",
         f"run.output_root={tmp_path / 'runs'}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["prompts_per_step"] == 128
    assert plan["samples_per_step"] == 128 * 16
    assert plan["samples_per_update"] == 512
    assert plan["updates_per_rollout_batch"] == 4
    assert plan["model"] == "Qwen/Qwen2.5-3B" and plan["gradient_checkpointing"]
    assert (plan["dtype"], plan["compute_dtype"]) == ("float32", "bfloat16")  # fp32 masters, bf16 compute
    assert plan["rollout_engine"] == "vllm" and plan["lens"]["alpha"] == 0.25
    assert not (tmp_path / "hf").exists() and not (tmp_path / "runs").exists()  # downloaded and wrote nothing


@pytest.mark.parametrize("name, kind, processes", [("cpu_2proc", "MULTI_GPU", 2), ("ddp_8gpu", "MULTI_GPU", 8),
                                                    ("fsdp_8gpu", "FSDP", 8)])
def test_accelerate_configs_load_and_fsdp_wraps_each_qwen2_or_llama_layer(name, kind, processes, monkeypatch):
    """What `accelerate launch --config_file` would do with each config, short of starting processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CPU_CONFIG.parent / f"{name}.yaml"), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert defaults.distributed_type.value == kind and args.num_processes == processes
    assert args.use_cpu == (name == "cpu_2proc")  # the CPU config must not claim GPUs, the GPU ones must not force CPU
    if kind != "FSDP":
        return
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    plugin = FullyShardedDataParallelPlugin()
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=64)
    for model_cls, config_cls, layer in [(Qwen2ForCausalLM, Qwen2Config, "Qwen2DecoderLayer"),
                                         (LlamaForCausalLM, LlamaConfig, "LlamaDecoderLayer")]:
        model = model_cls(config_cls(**dims))
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
        assert wrapped == [layer] * 2, wrapped


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--tiny", "--steps", "1", "--out", str(out)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["model"]["preset"] == "tiny"
    assert [r["engine"] for r in report["runs"]] == ["hf-dynamic", "hf-static"]
    for run in report["runs"]:
        assert run["ok"], run
        assert run["rollout_tok_s"] > 0 and run["train_tok_s"] > 0 and run["step_s"] > 0
        assert list(run["phases"]) == ["generate_rollouts", "verify_rollouts", "update_policy"]
        assert all(phase["s"] > 0 for phase in run["phases"].values())
        assert all(step["verify/streamed_frac"] == 1.0 for step in run["steps"])  # 2 engine batches a step


if __name__ == "__main__":  # the CLI with sharding-independent sampling (and --fsdp-on-cpu), for the tests above
    from lens import cli

    argv = sys.argv[1:]
    if "--fsdp-on-cpu" in argv:
        argv.remove("--fsdp-on-cpu")
        force_fsdp_on_cpu()
    install_group_seeded_engine()
    sys.exit(cli.main(argv))
