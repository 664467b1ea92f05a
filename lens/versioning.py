"""Lineage and versioning: git commit, file and DVC hashes; DVC commit and push (dvc.yaml, .dvc/config).

The DVC pipeline (dvc.yaml) runs the same `lens` stages as the CLI and the Prefect flows. This module is
what the orchestrators call around it, always through the `dvc` command line of the interpreter that
runs lens (sys.executable's bin directory, else `python -m dvc`), never DVC's Python internals:

* ``data_hash(data_dir)``: the prepared dataset's identity, the md5 DVC gives that directory (the value
  dvc.lock records and the remote stores it under), computed from the files on disk, so it names the
  data that was actually used even before dvc.lock is updated (and without DVC installed);
* ``dvc_commit(stages, repo_root)``: record outputs produced outside `dvc repro` (a Prefect run) in
  dvc.lock, so `dvc status` / `dvc repro` agree with them instead of re-running;
* ``dvc_push(targets, repo_root)``: push the prepared dataset (by default) to the default remote, which
  is the dataset versioning: dvc.lock in git names the hash, the remote holds the bytes;
* ``git_commit()``, ``file_sha256(paths)``: the code's and a file's identity, for run tags and records.

`python -m lens.versioning hash|commit|push ...` exposes the same functions to a shell.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lens.records import file_sha256  # noqa: F401  (lineage: a file's identity without DVC)

DATA_STAGE = "prepare"

# params.yaml keys that steer orchestration but cannot change any output: no DVC stage depends on them,
# and a Prefect run may set them freely without making its outputs disagree with params.yaml.
# (train.algo is set per stage by `--algo`.) tests/test_dvc.py checks dvc.yaml against this list.
ORCHESTRATION_ONLY_PARAMS = (
    "train.algo",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.steps_per_round",
    "tracking",
)


class DvcError(RuntimeError):
    """A DVC command failed, DVC is missing, or an operation would record something untrue."""


# ---- the dvc command line ------------------------------------------------------------------------


def dvc_command() -> list[str] | None:
    """argv prefix of the DVC CLI beside this interpreter, or None when DVC is not installed here."""
    bin_dir = Path(sys.executable).parent  # not resolved: a venv's python is a symlink out of the venv
    for name in ("dvc", "dvc.exe"):
        exe = bin_dir / name
        if exe.is_file() and os.access(exe, os.X_OK):
            return [str(exe)]
    if importlib.util.find_spec("dvc") is not None:
        return [sys.executable, "-m", "dvc"]
    return None


def dvc_available() -> bool:
    """True when the DVC CLI can be run by this interpreter's environment."""
    return dvc_command() is not None


def run_dvc(args: Sequence[str], repo_root: str | os.PathLike[str], *, check: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `dvc <args>` in ``repo_root``; on failure raise DvcError with the command and its output."""
    cmd = dvc_command()
    if cmd is None:
        raise DvcError(f"DVC is not installed for {sys.executable}: "
                       "pip install -e '.[pipeline]' (or `make setup`)")
    root = Path(repo_root)
    if not (root / ".dvc").is_dir():
        raise DvcError(f"{root} is not a DVC repository (no .dvc/ directory)")
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    proc = subprocess.run([*cmd, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip())[-4000:]
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n{output}")
    return proc


def find_repo_root(start: str | os.PathLike[str]) -> Path:
    """The nearest directory at or above ``start`` that holds .dvc/."""
    path = Path(start).resolve()
    for candidate in (path, *path.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    raise DvcError(f"no DVC repository (.dvc/) at or above {path}")


# ---- dataset identity ----------------------------------------------------------------------------


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _ignore_patterns(repo_root: Path | None) -> list[str]:
    """The name patterns of the repository's .dvcignore (lines without an inner '/', as ours are)."""
    if repo_root is None or not (repo_root / ".dvcignore").is_file():
        return []
    patterns = []
    for line in (repo_root / ".dvcignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "/" not in line.rstrip("/"):
            patterns.append(line.rstrip("/"))
    return patterns


def data_hash(data_dir: str | os.PathLike[str]) -> str:
    """DVC's md5 of a directory (``<md5>.dir``) or file, computed from disk exactly as DVC 3 does.

    A directory's hash is the md5 of the JSON list of its files' ``{"md5", "relpath"}`` sorted by path
    (files matched by the repository's .dvcignore name patterns are left out, as DVC leaves them out);
    it equals what `dvc repro`/`dvc commit` write to dvc.lock for that output and names the object in
    the remote. Computing it instead of reading dvc.lock means it describes the data actually on disk,
    also between a Prefect run and its `dvc commit`, and works where DVC is not installed.
    """
    path = Path(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `lens prepare` first")
    if path.is_file():
        return _file_md5(path)
    try:
        ignore = _ignore_patterns(find_repo_root(path))
    except DvcError:
        ignore = []

    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)

    entries = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = [d for d in dirnames if not ignored(d)]
        for name in filenames:
            if not ignored(name):
                full = Path(dirpath, name)
                entries.append({"md5": _file_md5(full), "relpath": full.relative_to(path).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(listing, usedforsecurity=False).hexdigest() + ".dir"


def locked_hash(out_path: str | os.PathLike[str], repo_root: str | os.PathLike[str] | None = None) -> str | None:
    """The md5 dvc.lock records for the output at ``out_path`` (None: not recorded or no dvc.lock)."""
    import yaml

    out = Path(out_path).resolve()
    root = Path(repo_root).resolve() if repo_root else find_repo_root(out)
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for entry in stage.get("outs", []):
            if (root / entry["path"]).resolve() == out:
                return entry.get("md5")
    return None


# ---- code and file identity -----------------------------------------------------------------------


def git_commit(root: str | os.PathLike[str] | None = None) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the repository at ``root`` (default: the
    project), or (None, None) outside a git repository."""
    if root is None:
        from lens.params import PROJECT_ROOT

        root = PROJECT_ROOT

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


# ---- recording and pushing -------------------------------------------------------------------------


def _flat_params(params: Any) -> dict[str, Any]:
    from lens.params import flatten

    return {k: v for k, v in flatten(params).items()
            if not any(k == p or k.startswith(p + ".") for p in ORCHESTRATION_ONLY_PARAMS)}


def params_mismatch(params: Any, repo_root: str | os.PathLike[str]) -> dict[str, tuple[Any, Any]]:
    """Keys where ``params`` (what a run used) differ from the repository's params.yaml, as
    ``{key: (used, params_yaml)}``; orchestration-only keys are not compared."""
    from lens.params import load_params

    on_disk = load_params(params_file=Path(repo_root) / "params.yaml")
    used, recorded = _flat_params(params), _flat_params(on_disk)
    return {k: (used.get(k), recorded.get(k)) for k in sorted(used.keys() | recorded.keys())
            if used.get(k) != recorded.get(k)}


def dvc_commit(stages: Iterable[str], repo_root: str | os.PathLike[str], *, params: Any = None) -> None:
    """Record in dvc.lock the current outputs, deps and params of ``stages`` (e.g. ``["prepare",
    "train@lens", "evaluate@lens", "compare"]``) produced outside `dvc repro`: `dvc commit -f`.

    dvc.lock then claims these outputs follow from params.yaml; pass the run's resolved ``params`` to
    refuse (DvcError naming the keys) when the run used other values (a different profile, overrides).
    The outputs must be complete: committing `compare` records its plot data as it is on disk.
    """
    stages = list(stages)
    if not stages:
        raise ValueError("dvc_commit: no stages given")
    root = Path(repo_root)
    if params is not None:
        diff = params_mismatch(params, root)
        if diff:
            lines = "\n  ".join(f"{k}: run used {a!r}, params.yaml has {b!r}" for k, (a, b) in diff.items())
            raise DvcError("refusing to record outputs in dvc.lock: they were not made with params.yaml's "
                           f"values (put the run's values in params.yaml, or re-run with `dvc repro`):\n  {lines}")
    run_dvc(["commit", "--force", *stages], root)


def dvc_push(targets: Iterable[str] | None = None, repo_root: str | os.PathLike[str] = ".", *,
             remote: str | None = None) -> None:
    """`dvc push` ``targets`` (default: the prepare stage, i.e. the prepared dataset) to ``remote``
    (default: the repository's default remote, .dvc/config `core.remote`)."""
    targets = list(targets) if targets is not None else [DATA_STAGE]
    args = ["push", *(["--remote", remote] if remote else []), *targets]
    run_dvc(args, repo_root)


def default_remote_url(repo_root: str | os.PathLike[str]) -> str | None:
    """URL of the default remote (for lineage records), None when none is configured."""
    name = run_dvc(["remote", "default"], repo_root, check=False).stdout.strip()
    if not name:
        return None
    url = run_dvc(["config", f"remote.{name}.url"], repo_root, check=False).stdout.strip()
    return url or None


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lens.versioning", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hash", help="print DVC's md5 of a directory or file")
    p.add_argument("path")
    p = sub.add_parser("commit", help="record outputs made outside `dvc repro` (dvc commit -f)")
    p.add_argument("stages", nargs="+")
    p.add_argument("--repo", default=".")
    p = sub.add_parser("push", help="push the prepared dataset (or targets) to the default remote")
    p.add_argument("targets", nargs="*")
    p.add_argument("--repo", default=".")
    p.add_argument("--remote", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "hash":
            print(data_hash(args.path))
        elif args.command == "commit":
            dvc_commit(args.stages, args.repo)
        elif args.command == "push":
            dvc_push(args.targets or None, args.repo, remote=args.remote)
    except (DvcError, FileNotFoundError) as exc:
        print(f"lens.versioning: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
