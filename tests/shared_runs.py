"""Runs that several test files check, built once per test session (a 2-process launch costs ~15 s).

Both use the sharding-independent sampling of tests/test_multiprocess.py and its EQUIVALENCE settings, so a
one-process run and a two-process run see the same rollouts. Imported as `tests.shared_runs` everywhere, so
that every test file gets the same cache. Tests must not change these directories: copy them first.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from lens.records import RunFiles

_BUILT: dict[str, object] = {}


def one_process_runs(tmp_path_factory) -> Path:
    """In this process: <root>/whole (3 steps) and <root>/stopped (after 2 steps), whole-format checkpoints."""
    if "one" not in _BUILT:
        from lens import cli
        from tests.test_multiprocess import EQUIVALENCE, EQUIVALENCE_ARGS, _setup, install_group_seeded_engine

        root = tmp_path_factory.mktemp("one-process")
        with pytest.MonkeyPatch.context() as mp:
            install_group_seeded_engine(mp.setattr)
            for name, extra in (("whole", []), ("stopped", ["--max-steps", "2"])):
                _setup(root / name, *EQUIVALENCE)
                assert cli.main([*EQUIVALENCE_ARGS, f"run.output_root={root / name}", *extra]) == 0
        _BUILT["one"] = root
    return _BUILT["one"]


def train_two_processes(root: Path, backend: str, *extra: str):
    """`accelerate launch` of 2 CPU processes training the EQUIVALENCE run under `root` (FSDP2 via its seam)."""
    from tests.test_multiprocess import EQUIVALENCE_ARGS, accelerate_launch

    seam = ["--fsdp-on-cpu"] if backend == "fsdp" else []
    return accelerate_launch("tests.test_multiprocess", [*seam, *EQUIVALENCE_ARGS, f"run.output_root={root}", *extra])


def two_process_runs(backend: str, tmp_path_factory) -> SimpleNamespace:
    """Per backend (ddp, fsdp): `whole`, an uninterrupted 3-step run; `resumed`, one stopped after 2 steps and
    resumed for the third (as a user would after a crash); `stopped`, a copy of the latter as it was stopped."""
    if backend not in _BUILT:
        from tests.test_multiprocess import EQUIVALENCE, _setup

        root = tmp_path_factory.mktemp(backend)
        whole, resumed, stopped = root / "whole", root / "resumed", root / "stopped"
        for run in (whole, resumed):
            _setup(run, *EQUIVALENCE)
        train_two_processes(whole, backend)
        train_two_processes(resumed, backend, "--max-steps", "2")
        shutil.copytree(resumed, stopped)
        train_two_processes(resumed, backend, "--resume")
        _BUILT[backend] = SimpleNamespace(backend=backend, whole=RunFiles(whole / "tiny" / "lens"),
                                          resumed=RunFiles(resumed / "tiny" / "lens"), stopped=stopped,
                                          scratch=tmp_path_factory.mktemp(f"{backend}-scratch"))
    return _BUILT[backend]
