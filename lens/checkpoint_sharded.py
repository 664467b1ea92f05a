"""Sharded checkpoints for multi-process runs (DDP, FSDP2) with torch.distributed.checkpoint (DCP).

Each rank writes its own part of the model and optimizer state under `<checkpoint>/dcp/`; nothing is
gathered. DCP's planner gives each of DDP's replicated tensors to one rank, so the parts are disjoint.
DCP reshards on load: a checkpoint saved by N processes loads into M, M = 1 included (no process group).
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import broadcast_object_list
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lens.records import atomic_directory

DCP_DIR = "dcp"


def is_sharded(checkpoint: Path) -> bool:
    return (Path(checkpoint) / DCP_DIR).is_dir()


@contextlib.contextmanager
def collective_atomic_directory(path: Path, accelerator) -> Iterator[Path]:
    """records.atomic_directory for all ranks (a collective): rank 0 creates the temporary directory and
    names it to the others; every rank writes into it; rank 0 renames it into place once all are done."""
    with atomic_directory(path) if accelerator.is_main_process else contextlib.nullcontext() as tmp:
        where = [str(tmp) if tmp is not None else None]
        broadcast_object_list(where)
        yield Path(where[0])
        accelerator.wait_for_everyone()


def save_sharded(checkpoint: Path, model, optimizer: torch.optim.Optimizer) -> None:
    """Collective: returns on every rank once all ranks' files and DCP's `.metadata` are written."""
    model_state, optim_state = get_state_dict(model, optimizer)  # this rank's shards (full_state_dict=False)
    dcp.save({"model": model_state, "optimizer": optim_state},
             storage_writer=dcp.FileSystemWriter(Path(checkpoint) / DCP_DIR))


def load_sharded(checkpoint: Path, model, optimizer: torch.optim.Optimizer) -> None:
    """Read a sharded checkpoint into the model and optimizer, whatever world size saved it (collective
    when a process group exists)."""
    directory = Path(checkpoint) / DCP_DIR
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to fill: this rank's shards
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with warnings.catch_warnings():  # one process reading what several wrote is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=DataOnlyReader(directory), planner=DataOnlyLoadPlanner())
    except (CheckpointException, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise RuntimeError(f"sharded checkpoint {directory} does not load into this model and optimizer: "
                           f"{exc}") from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ---- loading without running code from the files ---------------------------------------------------
# torch 2.13's FileSystemReader.read_metadata unpickles `.metadata` with plain pickle.load, and
# DefaultLoadPlanner.load_bytes torch.loads non-tensor values with weights_only=False: a crafted checkpoint
# could run code on load. (Tensors themselves are read with weights_only=True.) Both are replaced here.

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
        "BytesStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
      ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
      ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's Metadata and refuses every other class (names are matched exactly: a dotted name
    would let pickle reach any attribute of an allowed module)."""

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _METADATA_CLASSES and not is_dtype:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata; refused")
        return super().find_class(module, name)


class DataOnlyReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
            metadata = MetadataUnpickler(fh).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{self.path}: .metadata holds a {type(metadata).__name__}, not Metadata")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class DataOnlyLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        torch.load(value, weights_only=True)  # raises on anything but tensors, numbers, strings, containers
        value.seek(0)
        super().load_bytes(read_item, value)
