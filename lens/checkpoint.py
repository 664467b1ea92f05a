"""Checkpoints of an RL run: everything needed to continue bit-for-bit on CPU.

A checkpoint directory `checkpoints/step-NNNNNN/` holds the model and optimizer state, the scheduler
(`scheduler.pt`), `trainer_state.json` (step counters and RNG states) and `manifest.json` (checksums,
written last); `checkpoints/latest` names the newest complete one. One process writes whole state dicts
(`model/`, HF safetensors; `optimizer.pt`, name-keyed); several (DDP, FSDP2) write sharded ones, each rank
its part (`dcp/`, lens.checkpoint_sharded), as gathering fp32 masters and Adam states of a 3B model on
rank 0 would need ~37 GB a checkpoint. Either format loads into any number of processes.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from lens.checkpoint_sharded import collective_atomic_directory, is_sharded, load_sharded, save_sharded
from lens.params import ParamsError, flatten
from lens.records import atomic_directory, atomic_write_text, read_manifest, write_manifest

log = logging.getLogger(__name__)

# Keys a resumed run may change: they steer orchestration, length or evaluation, not the training state.
RESUMABLE_CHANGES = ("train.algo", "train.steps", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.steps_per_round", "train.max_consecutive_nonfinite", "tracking", "eval", "compare",
                     "run.output_root", "verify.workers")


class CheckpointError(RuntimeError):
    """No usable checkpoint to resume from (the message says where and why; nothing was deleted)."""


def params_fingerprint(params) -> dict:
    """The resolved params a checkpoint's training state depends on (RESUMABLE_CHANGES left out)."""
    kept = {k: v for k, v in flatten(params).items()
            if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)}
    return json.loads(json.dumps(kept))  # as the manifest stores it (tuples become lists)


# Whole (gathered) state dicts, offloaded to rank 0's CPU; other ranks get empty dicts.
FULL_ON_RANK0_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Checkpointer:
    """Saves and restores (model, optimizer, scheduler, counters, RNG) under `directory`."""

    def __init__(self, directory: Path, accelerator, model, optimizer, scheduler, tokenizer, keep: int,
                 fingerprint: dict | None = None):
        self.directory, self.accelerator = Path(directory), accelerator
        self.model, self.optimizer, self.scheduler, self.tokenizer = model, optimizer, scheduler, tokenizer
        self.keep = keep
        self.fingerprint = fingerprint or {}
        self._verified: dict[Path, dict] = {}   # manifests checked by usable(): not re-hashed by load()

    @property
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    def latest(self) -> Path | None:
        """The newest checkpoint `latest` names, if its manifest exists (cheap: no checksums)."""
        pointer = self.directory / "latest"
        if pointer.exists():
            path = self.directory / pointer.read_text().strip()
            if (path / "manifest.json").exists():
                return path
        return None

    def usable(self) -> Path | None:
        """The newest checkpoint whose manifest verifies: `latest`'s, else the newest complete `step-*`
        (with a warning naming both). None when there is none at all; CheckpointError when checkpoints exist
        but none is usable (nothing is deleted either way). A collective under several processes."""
        if self.accelerator.num_processes > 1:
            # Rank 0 alone hashes the files and tells the others: N ranks would read a sharded checkpoint N times.
            found = [self._find_usable() if self.accelerator.is_main_process else None]
            broadcast_object_list(found)
            path, manifest, error = found[0]
        else:
            path, manifest, error = self._find_usable()
        if error:
            raise CheckpointError(error)
        if path is not None:
            self._verified[path] = manifest
        return path

    def _find_usable(self) -> tuple[Path | None, dict | None, str | None]:
        pointer = self.directory / "latest"
        named = self.directory / pointer.read_text().strip() if pointer.is_file() else None
        steps = sorted((p for p in self.directory.glob("step-*") if p.is_dir()), reverse=True)
        candidates = list(dict.fromkeys([*([named] if named is not None else []), *steps]))
        problems = []
        for path in candidates:
            try:
                manifest = read_manifest(path)
            except ValueError as exc:
                problems.append(f"{path.name}: {exc}")
                continue
            if problems:
                log.warning("checkpoint %s is not usable (%s); resuming from %s instead", candidates[0],
                            "; ".join(problems), path)
            return path, manifest, None
        if problems:
            return None, None, (f"no usable checkpoint in {self.directory} ({'; '.join(problems)}); nothing was "
                                "deleted: restore a checkpoint, or start afresh without --resume")
        return None, None, None

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _save_model(self, directory: Path, model_state: dict) -> None:
        # Only rank 0 writes; `state_dict=` carries the gathered weights (the module's own may be shards).
        self.accelerator.unwrap_model(self.model).save_pretrained(directory, state_dict=model_state,
                                                                  safe_serialization=True)
        self.tokenizer.save_pretrained(directory)

    def save(self, step: int, counters: dict) -> Path:
        """Write to a temporary directory, then rename: a kill mid-write never leaves a half checkpoint.
        A collective: every rank calls it (it writes its shards, or the state dicts are gathered)."""
        self.accelerator.wait_for_everyone()
        name = f"step-{step:06d}"
        final = self.directory / name
        if self.accelerator.num_processes > 1:
            with collective_atomic_directory(final, self.accelerator) as tmp:
                save_sharded(tmp, self.model, self._torch_optimizer)  # every rank's part written on return
                if self.accelerator.is_main_process:
                    self._save_training_state(tmp, step, counters)
        else:
            model_state = get_model_state_dict(self.model, options=FULL_ON_RANK0_CPU)
            optim_state = get_optimizer_state_dict(self.model, self._torch_optimizer, options=FULL_ON_RANK0_CPU)
            with atomic_directory(final) as tmp:
                self._save_model(tmp / "model", model_state)
                torch.save(optim_state, tmp / "optimizer.pt")
                self._save_training_state(tmp, step, counters)
            del model_state, optim_state
        if self.accelerator.is_main_process:
            atomic_write_text(self.directory / "latest", name)
            kept = sorted(p for p in self.directory.glob("step-*") if p.is_dir())
            for old in kept[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def _save_training_state(self, tmp: Path, step: int, counters: dict) -> None:
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
               "torch": torch.get_rng_state().tolist()}
        (tmp / "trainer_state.json").write_text(json.dumps(counters | {"rng": rng}))
        write_manifest(tmp, step=step, params=self.fingerprint)  # last: it vouches for the rest

    def load(self, path: Path) -> dict:
        """Restore model, optimizer, scheduler and RNG from `path` (either format, any number of processes;
        a collective); returns the saved counters."""
        manifest = self._verified.pop(path, None) or read_manifest(path)
        saved = manifest.get("params", {})
        changed = sorted(k for k in saved.keys() | self.fingerprint.keys() if saved.get(k) != self.fingerprint.get(k))
        if changed:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in changed[:8])
            raise ParamsError(f"--resume with other params than checkpoint {path} was trained with: {shown}"
                              f"{' ...' if len(changed) > 8 else ''}; resume with the run's values (these may "
                              f"change: {', '.join(RESUMABLE_CHANGES)}) or start a new run")
        if is_sharded(path):
            load_sharded(path, self.model, self._torch_optimizer)
        else:
            self._load_full(path)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        counters = json.loads((path / "trainer_state.json").read_text())
        rng = counters.pop("rng")
        random.setstate(_tupled(rng["python"]))
        np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        # A failure mid-backward (a retried round) leaves gradients behind; the next update must not add them.
        self.optimizer.zero_grad(set_to_none=True)
        return counters

    def _load_full(self, path: Path) -> None:
        # With several processes rank 0 alone reads the files and broadcasts them (for FSDP, each rank keeps
        # its shard): N ranks reading an 8B checkpoint at once would hold N copies in host memory.
        broadcast = self.accelerator.num_processes > 1
        reader = self.accelerator.is_main_process or not broadcast
        weights, optim_state = {}, {}
        if reader:
            for f in sorted((path / "model").glob("*.safetensors")):
                weights |= load_file(f)
            expected = set(self.accelerator.unwrap_model(self.model).state_dict())
            missing, unexpected = expected - set(weights), set(weights) - expected
            # Tied embeddings are saved once; the tied head keeps pointing at them.
            if unexpected or any("lm_head" not in k for k in missing):
                raise RuntimeError(f"checkpoint {path} does not match the model: missing {sorted(missing)}, "
                                   f"unexpected {sorted(unexpected)}")
            # Only tensors and plain containers: weights_only refuses anything that would need unpickling code.
            optim_state = torch.load(path / "optimizer.pt", weights_only=True)
        options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=broadcast)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self._torch_optimizer, optim_state, options=options)
        del weights, optim_state

    def save_final(self, path: Path) -> Path:
        """The policy alone, as a standard transformers directory (collective, like `save`)."""
        self.accelerator.wait_for_everyone()
        model_state = get_model_state_dict(self.model, options=FULL_ON_RANK0_CPU)
        if self.accelerator.is_main_process:
            with atomic_directory(path) as tmp:
                self._save_model(tmp, model_state)
                write_manifest(tmp)  # a standard transformers directory, plus the checksums of its files
        del model_state
        self.accelerator.wait_for_everyone()
        return path


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    return obj


def _tupled(obj):
    return tuple(_tupled(x) for x in obj) if isinstance(obj, list) else obj
