"""The files of a run, written and read in one place: layout, atomic writes, metrics.jsonl, rollouts.

runs/<profile>/<arm>/ holds `metrics.jsonl` (one JSON row per completed step: {"step": n, "train/...",
"perf/...", "verify/..."}), `rollouts/step-NNNNNN.parquet` (ROLLOUT_COLUMNS, one file per step, named by
the number of steps completed before it), `rollouts/round-NNNN.json`, `evals/step-NNNNNN.json` (during training), `checkpoints/`, `final/` (a
transformers directory), `train_summary.json` and `eval.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# ---- layout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """Where one arm's run keeps its files (`RunFiles(params.algo_dir(arm))`)."""

    dir: Path

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def rollouts(self) -> Path:
        return self.dir / "rollouts"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final(self) -> Path:
        return self.dir / "final"

    @property
    def train_summary(self) -> Path:
        return self.dir / "train_summary.json"

    @property
    def eval(self) -> Path:
        return self.dir / "eval.json"

    @property
    def evals(self) -> Path:
        return self.dir / "evals"

    def eval_at(self, step: int) -> Path:
        """The evaluation of the policy after `step` steps, made during training (eval.every_steps)."""
        return self.evals / f"step-{step:06d}.json"

    def rollout_file(self, step: int) -> Path:
        return self.rollouts / f"step-{step:06d}.parquet"

    def round_manifest(self, index: int) -> Path:
        return self.rollouts / f"round-{index:04d}.json"

    def trained(self) -> bool:
        """train_summary.json says the run reached train.steps (and saved its final policy)."""
        try:
            return bool(json.loads(self.train_summary.read_text()).get("done", False))
        except (OSError, ValueError):
            return False

    def interrupted(self) -> bool:
        """A run was started here and did not finish: checkpoints exist, and no train_summary.json says done."""
        return any(self.checkpoints.glob("step-*")) and not self.trained()


# ---- one writer per run directory ---------------------------------------------------------------


class RunInUseError(RuntimeError):
    """Another process is writing this run directory."""


class RunLock:
    """An exclusive lock on a run directory (`.lock`, flock) for as long as a process writes it: a second
    run on the same outputs would interleave metrics and wipe the first one's checkpoints. The OS releases
    it when the process dies, so a killed run never leaves a stale lock behind."""

    def __init__(self, directory: str | os.PathLike[str]):
        import fcntl

        self.path = Path(directory) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise RunInUseError(f"{self.path.parent} is in use by {holder}: two runs on the same outputs would "
                                "corrupt each other; wait for it, or set run.output_root elsewhere") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()  # closing the file releases the flock


# ---- atomic writes ------------------------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` via a temporary file in the same directory and os.replace: never half a file."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dumps_kwargs: Any) -> Path:
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success it takes `path`'s place."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Old aside, new in, old removed: a kill at any point leaves a complete directory under one of the names.
    old = path.parent / f".old-{path.name}"
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ---- manifests: what a complete directory holds -------------------------------------------------

MANIFEST = "manifest.json"


def file_sha256(*paths: str | os.PathLike[str]) -> str:
    """sha256 over the files' bytes, in the given order (a file's identity without DVC)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike[str], **fields: Any) -> Path:
    """manifest.json listing every file under `directory` with its sha256 (plus `fields`): write it LAST,
    so a directory with a matching manifest is known to be complete and unaltered."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): file_sha256(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    return atomic_write_json(directory / MANIFEST, {"files": files, **fields})


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete, unaltered directory; ValueError saying what is wrong otherwise."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} (written last: the directory is incomplete)")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{MANIFEST} is unreadable ({exc})") from None
    for name, sha in files.items():
        member = Path(directory) / name
        if not member.is_file():
            raise ValueError(f"{name} is missing")
        if file_sha256(member) != sha:
            raise ValueError(f"{name} does not match its checksum (truncated or altered)")
    return manifest


# ---- metrics.jsonl ------------------------------------------------------------------------------


def append_metrics(path: str | os.PathLike[str], row: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(row)) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, one per step (the last row of a step wins), ordered by step.

    A torn last line (a process killed mid-write) is skipped with a warning; a bad line elsewhere raises
    ValueError naming the file and line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s: line %d is incomplete (a write was cut short); ignored", path, number)
                continue
            raise ValueError(f"{path}, line {number}: not JSON ({exc})") from None
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def truncate_metrics(path: str | os.PathLike[str], last_step: int) -> None:
    """Keep the rows of steps <= `last_step` (a resume drops the lost future), rewritten atomically."""
    path = Path(path)
    if path.exists():
        rows = [r for r in read_metrics(path) if r["step"] <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---- rollouts -----------------------------------------------------------------------------------

# What the model wrote and what the algorithm did with it: one row per sampled completion.
ROLLOUT_COLUMNS = ("step", "problem_id", "level", "prompt", "completion", "reward", "mean_logprob",
                   "advantage", "num_tokens", "truncated", "sample", "rank")


def rollout_columns(step: int, problems, prompts, rollouts, scored, group_size: int, rank: int) -> dict:
    """A step's rollouts as ROLLOUT_COLUMNS (rollouts grouped by problem, G per group)."""
    return {
        "step": [step] * len(rollouts),
        "problem_id": [problems[r.prompt_index].id for r in rollouts],
        "level": [problems[r.prompt_index].level for r in rollouts],
        "prompt": [prompts[r.prompt_index] for r in rollouts],
        "completion": [r.text for r in rollouts],
        "reward": scored.correct.flatten().tolist(),
        "mean_logprob": scored.mean_logprob.flatten().tolist(),
        "advantage": scored.advantages.flatten().tolist(),
        "num_tokens": [len(r.completion_ids) for r in rollouts],
        "truncated": [r.truncated for r in rollouts],
        "sample": [i % group_size for i in range(len(rollouts))],
        "rank": [rank] * len(rollouts),
    }


def write_rollouts(path: str | os.PathLike[str], columns: Mapping[str, Sequence[Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if tuple(columns) != ROLLOUT_COLUMNS:
        raise ValueError(f"rollout columns {tuple(columns)} != {ROLLOUT_COLUMNS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(dict(columns)), tmp)
    os.replace(tmp, path)
    return path


def read_rollouts(files: Iterable[str | os.PathLike[str]], columns: Sequence[str] | None = None):
    """The rows of rollout parquet files as one pandas DataFrame (`columns`: a subset)."""
    import pandas as pd

    frames = [pd.read_parquet(f, columns=list(columns) if columns else None) for f in files]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns or ROLLOUT_COLUMNS))


def last_rollout_files(rollouts_dir: str | os.PathLike[str], count: int) -> list[Path]:
    return sorted(Path(rollouts_dir).glob("step-*.parquet"))[-count:] if count > 0 else []


def sample_rollouts(rollout_dirs: Mapping[str, Path], out_path: str | os.PathLike[str], rows_per_arm: int,
                    last_steps: int = 3, seed: int = 0) -> Path | None:
    """A parquet sample of what each arm's policy wrote in its last `last_steps` steps, with an `algo`
    column; None when no arm has rollouts."""
    import pandas as pd

    frames = []
    for arm, directory in rollout_dirs.items():
        files = last_rollout_files(directory, last_steps)
        if not files:
            continue
        df = read_rollouts(files)
        if len(df) > rows_per_arm:
            df = df.sample(n=rows_per_arm, random_state=seed).sort_index()
        frames.append(df.assign(algo=arm))
    if not frames:
        return None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)
    os.replace(tmp, out_path)
    return out_path
