"""The DVC pipeline (dvc.yaml) and lens.versioning, against real DVC in a temporary git repository.

The slow tests copy the project's pipeline files into a fresh git repository, shrink the tiny profile in
its params.yaml so the whole pipeline runs in about a minute, and drive it with the project venv's
`dvc` exactly as a user would: `.venv/bin/dvc repro` without the venv on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest
import yaml

from lens.params import load_params
from lens.versioning import (
    ORCHESTRATION_ONLY_PARAMS,
    DvcError,
    data_hash,
    dvc_available,
    dvc_commit,
    dvc_push,
    locked_hash,
)
from tests.conftest import PROJECT_ROOT

STAGES = {"prepare", "warm_start", "train@grpo", "train@lens", "evaluate@grpo", "evaluate@lens", "compare"}
LENS_STAGES = {"train@lens", "evaluate@lens", "compare"}

# The tiny profile, shrunk so that the full pipeline takes about a minute on 2 cores.
SHRINK = {
    "model.tiny.hidden_size": 32, "model.tiny.num_layers": 2, "model.tiny.num_heads": 2,
    "model.tiny.intermediate_size": 64,
    "warm_start.steps": 20, "warm_start.batch_size": 16,
    "data.synthetic.train_per_level": 30, "data.synthetic.eval_per_level": 4,
    "data.max_eval_problems_per_level": 4,
    "rollout.group_size": 4, "rollout.max_new_tokens": 8,
    "train.steps": 2, "train.prompts_per_step": 4, "train.mini_batch_size": 16, "train.micro_batch_size": 16,
    "eval.samples_per_problem": 2, "eval.ks": [1, 2], "eval.max_new_tokens": 8, "eval.bootstrap_samples": 100,
    "verify.workers": 1,
}


# ---- dvc.yaml's parameter declarations (fast) ----------------------------------------------------


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in tree.items():
        key = f"{prefix}{k}"
        keys |= _leaf_keys(v, key + ".") if isinstance(v, dict) and v else {key}
    return keys


def _declared_train_params(algo: str) -> set[str]:
    train = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["train"]
    item = train["foreach"][algo]
    return {p.replace("${item.algo_params}", item["algo_params"]) for p in train["do"]["params"]}


def _covered(key: str, declared: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.mark.parametrize("algo", ["grpo", "lens"])
def test_train_stage_depends_on_every_train_key_in_params_yaml_except_orchestration_ones(algo):
    base = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    train_keys = {f"train.{k}" for k in _leaf_keys(base["train"])}
    orchestration = {k for k in train_keys if _covered(k, set(ORCHESTRATION_ONLY_PARAMS))}
    declared = _declared_train_params(algo)
    # Keys only other estimators read: their params sections (train.lens.*, train.ngrpo.*, ...).
    from lens import estimators

    others = {estimators.get(n).section for n in estimators.names()} - {estimators.get(algo).section, None}
    other_algo_only = {k for k in train_keys if any(k.startswith(f"train.{sec}.") for sec in others)}
    wanted = train_keys - orchestration - other_algo_only
    missing = sorted(k for k in wanted if not _covered(k, declared))
    assert not missing, f"dvc.yaml train@{algo} must declare {missing} under params"
    assert not [k for k in orchestration if _covered(k, declared)], "orchestration-only keys must not be deps"
    if algo == "grpo":
        assert not [d for d in declared if d.startswith("train.lens")], "GRPO must not depend on train.lens"


def test_dvc_yaml_is_generated_from_params_and_imports_and_up_to_date():
    from lens import dvc_yaml

    assert (PROJECT_ROOT / "dvc.yaml").read_text() == dvc_yaml.render(), "run `python -m lens.dvc_yaml`"
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    arms = load_params().compare.arms
    assert list(stages["train"]["foreach"]) == arms and stages["evaluate"]["foreach"] == arms


def test_every_stage_depends_on_the_code_it_imports():
    from lens.dvc_yaml import STAGE_ENTRIES, code_deps

    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    for name, entries in STAGE_ENTRIES.items():
        stage = stages[name].get("do", stages[name])
        declared = {d for d in stage["deps"] if not d.startswith("$")}
        assert set(code_deps(entries)) <= declared, name
        assert all((PROJECT_ROOT / d).exists() for d in declared), name
    train = set(stages["train"]["do"]["deps"])
    # What the result of training depends on through imports (the rollout engines and prompt rendering
    # included: editing them must re-run training).
    assert {"lens/rollout", "lens/data", "lens/estimators", "lens/verify.py", "lens/deadline_pool.py",
            "lens/loss.py", "lens/train.py", "lens/loop.py", "lens/checkpoint.py"} <= train
    assert {"lens/rollout", "lens/data", "lens/verify.py", "lens/evaluate.py"} <= set(stages["evaluate"]["do"]["deps"])
    assert "lens/tracking.py" not in train  # a sink, not part of the result


def test_dvc_commit_refuses_outputs_made_with_other_values_than_params_yaml(tmp_path):
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    used = load_params(None, ["train.steps=3", "train.algo=lens", "tracking.enabled=true"],
                       tmp_path / "params.yaml")
    with pytest.raises(DvcError, match=r"train\.steps: run used 3, params.yaml has 40"):
        dvc_commit(["train@lens"], tmp_path, params=used)
    same = load_params(None, ["train.algo=lens", "train.steps_per_round=1"], tmp_path / "params.yaml")
    with pytest.raises(DvcError, match="not a DVC repository"):  # the params check passed
        dvc_commit(["train@lens"], tmp_path, params=same)


# ---- the pipeline under real DVC (slow) ----------------------------------------------------------


class Repo:
    """A copy of the project's pipeline in a fresh git repository, driven by `.venv/bin/dvc`."""

    def __init__(self, root: Path):
        self.root = root
        self.dvc = root / ".venv" / "bin" / "dvc"
        # A user's shell with the venv NOT activated: system directories and git only, so a stage
        # that runs at all ran with the project's .venv (nothing else here has torch and lens).
        path = ["/usr/local/bin", "/usr/bin", "/bin", str(Path(shutil.which("git") or "/usr/bin/git").parent)]
        self.env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        self.env.update(PATH=os.pathsep.join(dict.fromkeys(path)), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DVC_NO_ANALYTICS="1",
                        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def dvc_(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.dvc), *args, check=check)

    def git(self, *args: str) -> str:
        return self.run("git", *args).stdout

    def status(self) -> dict:
        return json.loads(self.dvc_("status", "--json").stdout)

    def lock(self) -> dict:
        return yaml.safe_load((self.root / "dvc.lock").read_text())["stages"]

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, values: dict) -> None:
        params = self.params()
        for dotted, value in values.items():
            *parents, leaf = dotted.split(".")
            node = params
            for key in parents:
                node = node[key]
            assert leaf in node, f"{dotted} is not in params.yaml"
            node[leaf] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    if not dvc_available():
        pytest.skip("DVC is not installed in this environment")
    root = tmp_path_factory.mktemp("dvc-repo")
    shutil.copytree(PROJECT_ROOT / "lens", root / "lens", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml", "pyproject.toml", ".gitignore", ".dvcignore",
                 ".dvc/config", ".dvc/.gitignore"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / name, root / name)
    # The project's environment where a checkout has it: .venv/ in the repository root.
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    r = Repo(root)
    r.git("init", "-q", "-b", "main")
    with open(root / ".git" / "info" / "exclude", "a") as fh:
        fh.write(".venv\n")  # a symlink: the project's `.venv/` pattern matches directories only
    params = r.params()
    params["profiles"]["alt"] = {"run": {"seed": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r.set_params(SHRINK)
    # Tests never touch the user's default remote (~/.cache/lens/dvc-remote): this machine only.
    r.dvc_("remote", "modify", "--local", "storage", "url", str(tmp_path_factory.mktemp("dvc-remote")))
    r.git("add", "-A")
    r.git("commit", "-qm", "pipeline")
    r.first_repro = r.dvc_("repro")
    r.git("add", "-A")
    r.git("commit", "-qm", "first repro")
    return r


@pytest.mark.slow
def test_repro_runs_every_stage_with_the_venv_lens_and_writes_the_outputs(repo):
    out = repo.first_repro.stdout
    assert ran_stages(out) == STAGES, out
    assert 'PATH="$DVC_ROOT/.venv/bin:$PATH" python -m lens.cli train --algo lens' in out
    tiny = repo.root / "runs" / "tiny"
    for path in ("data/train.jsonl", "data/eval.jsonl", "warm_start/model/config.json",
                 "grpo/final/model.safetensors", "lens/final/model.safetensors", "grpo/metrics.jsonl",
                 "grpo/eval.json", "lens/eval.json", "compare/compare.json", "compare/compare.md",
                 "compare/accuracy_by_level.png", "compare/learning_curves.png",
                 "compare/accuracy_by_level.csv", "compare/curves/grpo.csv", "compare/curves/lens.csv"):
        assert (tiny / path).exists(), path
    # Outputs stay out of git (runs/ is git-ignored); dvc.lock, in git, names them.
    assert not [f for f in repo.git("ls-files").split() if f.startswith("runs/")]
    assert set(repo.lock()) == STAGES
    assert repo.status() == {}
    # The shrunk sizes reached the stages (the full tiny profile would take many minutes).
    assert json.loads((tiny / "warm_start" / "warm_start.json").read_text())["steps"] == SHRINK["warm_start.steps"]
    assert json.loads((tiny / "lens" / "train_summary.json").read_text())["step"] == SHRINK["train.steps"]


@pytest.mark.slow
def test_second_repro_is_a_noop(repo):
    out = repo.dvc_("repro").stdout
    assert ran_stages(out) == set(), out
    assert "Data and pipelines are up to date." in out


@pytest.mark.slow
def test_metrics_and_plots_are_readable_by_dvc(repo, tmp_path):
    metrics = json.loads(repo.dvc_("metrics", "show", "--json").stdout)
    shown = metrics[""]["data"] if "" in metrics else next(iter(metrics.values()))["data"]
    lens_eval = shown["runs/tiny/lens/eval.json"]["data"]
    assert 0.0 <= lens_eval["overall"]["acc"] <= 1.0
    assert "runs/tiny/compare/compare.json" in shown
    plots = json.loads(repo.dvc_("plots", "show", "--json", "-o", str(tmp_path)).stdout)
    assert not plots.get("errors"), plots.get("errors")
    names = set(plots["data"] if "data" in plots else plots)
    assert {"runs/tiny/compare/accuracy_by_level.png", "runs/tiny/compare/learning_curves.png",
            "Reward (train/reward_mean)", "Accuracy by level (GRPO vs LENS)"} <= names, names


@pytest.mark.slow
def test_changing_lens_alpha_reruns_only_the_lens_stages_and_exp_run_works(repo):
    # Edit params.yaml: `dvc status` names train@lens alone (GRPO's stages do not read train.lens.*;
    # status lists the stages whose own deps changed, the downstream ones follow when they run).
    repo.set_params({"train.lens.alpha": 0.5})
    try:
        assert set(repo.status()) == {"train@lens"}
    finally:
        repo.git("checkout", "params.yaml")
    assert repo.status() == {}

    # The same change as an experiment: exactly the LENS branch runs.
    try:
        out = repo.dvc_("exp", "run", "-S", "train.lens.alpha=0.5").stdout
        assert ran_stages(out) == LENS_STAGES, out
        assert repo.params()["train"]["lens"]["alpha"] == 0.5
        assert repo.lock()["train@lens"]["params"]["params.yaml"]["train.lens"]["alpha"] == 0.5
        assert "train.lens" not in repo.lock()["train@grpo"]["params"]["params.yaml"]
        assert repo.status() == {}
        exps = json.loads(repo.dvc_("exp", "show", "--json").stdout)
        assert "0.5" in json.dumps(exps)

        # HEAD's metrics (read from DVC's cache: runs/ is not in git) against the experiment's.
        diff = json.loads(repo.dvc_("metrics", "diff", "--json").stdout)
        assert "runs/tiny/lens/eval.json" in diff, diff
        assert "runs/tiny/grpo/eval.json" not in diff, diff
        assert diff["runs/tiny/lens/eval.json"]["seconds"]["old"] is not None
    finally:
        # Back to the committed state: outputs come back from the cache, nothing re-runs.
        repo.git("checkout", "params.yaml", "dvc.lock")
        repo.dvc_("checkout")
    assert repo.status() == {}


@pytest.mark.slow
def test_a_queued_experiment_grid_runs_and_dvc_exp_show_reads_it(repo):
    """`dvc exp run --queue` over a grid of params, `dvc queue start`, `dvc exp show`: the README's study grid.
    The queue's worker is a `dvc` process found on PATH: the project's environment activated, as README says."""
    env = dict(repo.env, PATH=f"{repo.root / '.venv' / 'bin'}{os.pathsep}{repo.env['PATH']}")
    run = lambda *args: subprocess.run([str(repo.dvc), *args], cwd=repo.root, env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=600, check=True).stdout
    queued = run("exp", "run", "--queue", "-S", "train.lens.alpha=0.1,0.5")
    assert queued.count("Queued experiment") == 2, queued
    run("queue", "start", "--jobs", "1")
    deadline = time.monotonic() + 900
    while any(state in (status := run("queue", "status")) for state in ("Queued", "Running")):
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    shown = json.loads(run("exp", "show", "--json"))
    exps = [e for rev in shown for exp in (rev.get("experiments") or []) for e in exp.get("revs", [])]
    alphas = {e["data"]["params"]["params.yaml"]["data"]["train"]["lens"]["alpha"]: e for e in exps}
    assert set(alphas) == {0.1, 0.5}, shown
    for e in alphas.values():
        assert e["data"]["metrics"]["runs/tiny/lens/eval.json"]["data"]["overall"]["acc"] is not None
    repo.dvc_("exp", "remove", "--all-commits", "--queue", check=False)
    assert repo.status() == {}  # the workspace was never touched


@pytest.mark.slow
def test_prepared_dataset_is_pushed_to_the_remote_under_the_hash_dvc_lock_records(repo):
    data_dir = repo.root / "runs" / "tiny" / "data"
    locked = repo.lock()["prepare"]["outs"][0]["md5"]
    assert locked.endswith(".dir")
    assert data_hash(data_dir) == locked == locked_hash(data_dir, repo.root)
    (data_dir / ".train.jsonl.123.tmp").write_text("left by a killed writer")  # .dvcignore'd
    assert data_hash(data_dir) == locked
    (data_dir / ".train.jsonl.123.tmp").unlink()

    dvc_push(None, repo.root)  # the default remote (here redirected by .dvc/config.local)
    remote = Path(repo.dvc_("config", "remote.storage.url").stdout.strip())
    assert (remote / "files" / "md5" / locked[:2] / locked[2:]).is_file()
    for entry in json.loads((remote / "files" / "md5" / locked[:2] / locked[2:]).read_text()):
        assert (remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]).is_file(), entry
    status = json.loads(repo.dvc_("status", "--cloud", "--json", "prepare").stdout)
    assert status == {}, status


@pytest.mark.slow
def test_dvc_commit_records_outputs_produced_outside_repro(repo):
    # As a Prefect run would: the stage's own command, outside DVC; its outputs differ from dvc.lock's
    # (the report carries timings, and here also a note).
    repo.run(str(repo.root / ".venv" / "bin" / "python"), "-m", "lens.cli", "compare")
    report = repo.root / "runs" / "tiny" / "compare" / "compare.md"
    report.write_text(report.read_text() + "\nNote added by an orchestrator.\n")
    assert set(repo.status()) == {"compare"}
    before = repo.lock()["compare"]

    dvc_commit(["compare"], repo.root)

    assert repo.status() == {}
    after = repo.lock()["compare"]
    md = "runs/tiny/compare/compare.md"
    assert [o["md5"] for o in after["outs"] if o["path"] == md] != [o["md5"] for o in before["outs"] if o["path"] == md]
    assert ran_stages(repo.dvc_("repro").stdout) == set()
    repo.git("commit", "-qam", "record the orchestrator's outputs")  # what a user does with dvc.lock


@pytest.mark.slow
def test_the_profile_selects_the_output_paths(repo):
    repo.set_params({"profile": "alt"})
    try:
        status = repo.status()
        assert set(status) == STAGES  # alt's outputs do not exist yet
        assert "runs/alt/data" in json.dumps(status["prepare"])
        assert ran_stages(repo.dvc_("repro", "prepare").stdout) == {"prepare"}
        assert (repo.root / "runs" / "alt" / "data" / "train.jsonl").exists()
        assert repo.lock()["prepare"]["outs"][0]["path"] == "runs/alt/data"
    finally:
        repo.git("checkout", "params.yaml", "dvc.lock")
    assert repo.status() == {}
