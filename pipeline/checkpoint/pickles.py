"""Loading checkpoint files without running code from them.

A pickle can name any Python callable and have the unpickler call it. Two walls stand between a crafted
checkpoint and the process that loads it:

1. Every file that torch or DeepSpeed unpickles is loaded with torch's weights-only unpickler, which builds
   only tensors, plain containers and the globals on an allow-list: DeepSpeed's own state classes
   (`deepspeed_pickle_classes`) and those the user lists in PIPELINE_TRUSTED_PICKLE_GLOBALS (classes only).
   DeepSpeed's loads go through the checkpoint engine the pipeline plugs into every engine
   (pipeline.checkpoint.save_load.PipelineCheckpointEngine); the loads DeepSpeed makes outside its engine
   (universal checkpoints, zero_to_fp32, the universal converter) run inside `weights_only_loading()`, which
   makes every torch.load of the process weights-only (TORCH_FORCE_WEIGHTS_ONLY_LOAD) while it lasts.
2. Before anything is unpickled, `check_pickles` walks the checkpoint directory without following links
   (a symbolic link or a special file anywhere in it is refused) and scans every torch file's pickle for
   globals beyond that allow-list.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.checkpoint.layout import CheckpointError
from pipeline.containment import ContainmentError, tree_files

# Environment variable naming further classes (module.Name, comma-separated) that a checkpoint the user
# trusts may pickle, e.g. the state classes of another DeepSpeed version. Only classes are accepted: a
# function named there would be called by the unpickler.
TRUSTED_GLOBALS_ENV = "PIPELINE_TRUSTED_PICKLE_GLOBALS"
# Modules whose classes can reach the operating system, the interpreter or the import system: never trusted.
_NEVER_TRUSTED = ("builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "socket", "importlib", "runpy",
                  "pickle", "marshal", "ctypes", "code", "codeop", "pty", "signal", "multiprocessing", "threading",
                  "asyncio", "io", "pathlib", "tempfile", "functools", "operator", "types", "inspect", "webbrowser",
                  "urllib", "http", "ftplib", "smtplib", "torch._C", "torch.ops", "numpy.lib", "pydoc")


def deepspeed_pickle_classes() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _trusted_class(name: str) -> type:
    """The class that PIPELINE_TRUSTED_PICKLE_GLOBALS names as module.Name; CheckpointError for anything else."""
    module_name, _, attr = name.rpartition(".")
    fix = f"remove {name!r} from {TRUSTED_GLOBALS_ENV}"
    if not module_name or any(module_name == m or module_name.startswith(m + ".") for m in _NEVER_TRUSTED):
        raise CheckpointError(f"{TRUSTED_GLOBALS_ENV} names {name!r}, which can run code when a checkpoint names it "
                              f"(a module of the interpreter or the operating system): {fix}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"{TRUSTED_GLOBALS_ENV} names {name!r}, which cannot be imported ({err}): {fix} or "
                              f"install the package that defines it") from err
    if not isinstance(obj, type):
        raise CheckpointError(f"{TRUSTED_GLOBALS_ENV} names {name!r}, a {type(obj).__name__}, not a class: the "
                              f"unpickler would call it with arguments from the file; {fix}")
    return obj


def allowed_classes() -> list[type]:
    """DeepSpeed's state classes and the classes the user trusts (PIPELINE_TRUSTED_PICKLE_GLOBALS)."""
    names = [n.strip() for n in os.environ.get(TRUSTED_GLOBALS_ENV, "").split(",") if n.strip()]
    return deepspeed_pickle_classes() + [_trusted_class(n) for n in names]


_depth = 0  # weights_only_loading nests (torch's safe_globals would drop the classes when an inner one ends)


@contextmanager
def weights_only_loading() -> Iterator[None]:
    """While it lasts, every torch.load of this process is weights-only, even one that asks for
    weights_only=False (DeepSpeed's loads outside its checkpoint engine), with the allowed classes."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    _depth = 1
    try:
        with torch.serialization.safe_globals(allowed_classes()):
            yield
    finally:
        _depth = 0
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def safe_load(path: Path | str, map_location=None):
    """torch.load of one checkpoint file, weights-only, with the allowed classes."""
    with weights_only_loading():
        return torch.load(path, map_location=map_location, weights_only=True)


def _is_torch_file(path: Path) -> bool:
    """A file torch.load would unpickle: a torch zip file, or anything named *.pt (legacy pickles included)."""
    return path.suffix in (".pt", ".pth", ".bin", ".ckpt") or zipfile.is_zipfile(path)


def check_pickles(tag_dir: Path) -> None:
    """Refuse a checkpoint that holds a symbolic link or a special file anywhere below it, or whose pickles name
    any Python global beyond tensors, plain data and the allowed classes, before anything unpickles it. Scanning
    reads only the pickles, not the tensor data."""
    tag_dir = Path(tag_dir)
    try:
        names = tree_files(tag_dir, f"the checkpoint {tag_dir} holds",
                           "a checkpoint this pipeline writes holds only regular files; delete it or resume from another")
    except ContainmentError as err:
        raise CheckpointError(str(err)) from err
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in allowed_classes()}
    for name in names:
        path = tag_dir / name
        if not _is_torch_file(path):
            continue
        try:
            unknown = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)
        except Exception as err:  # not a torch.save zip file at all (a legacy pickle cannot be scanned)
            raise CheckpointError(f"checkpoint file {path} is not a readable torch zip file ({err}): it cannot be "
                                  f"checked before loading, so it is refused; resume from another checkpoint") from err
        if unknown:
            raise CheckpointError(
                f"checkpoint file {path} pickles Python objects that neither this pipeline nor DeepSpeed writes "
                f"({', '.join(unknown)}); loading it could run arbitrary code, so it is refused. Delete this "
                f"checkpoint, or resume from one written by this pipeline (SECURITY.md says what is trusted)."
            )
