"""One checkpoint format, written atomically and read without executing code.

Writes go to a temporary file in the target directory, are fsynced, then ``os.replace``d over
the destination, so a crash at any moment leaves either the previous file or the new one whole.
Reads use ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""
import os
import re
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "uda-bisenet/1"


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint the caller asked for."""


def atomic_write(path, write_fn, suffix=".tmp"):
    """Call ``write_fn(file_object)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory):
    # The rename itself is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path):
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def load_checkpoint_file(path, map_location="cpu"):
    """Load a checkpoint safely (``weights_only=True``) with clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError, ...
        text = str(error)
        # torch wraps every unpickling failure in "Weights only load failed"; only a pickle that
        # names a callable outside the allow-list ("unsupported GLOBAL") is a code-execution attempt.
        blocked = re.search(r"[Uu]nsupported (?:GLOBAL|global):? ?([\w.]+)?", text)
        if blocked:
            name = blocked.group(1) or "an object"
            raise CheckpointError(
                f"{path} was refused: it asks to call or build {name}, which could execute code when "
                f"loaded; checkpoints are only read with torch.load(weights_only=True). Only load files "
                f"from a trusted source, and re-save them as plain tensors/dicts"
            ) from None
        reason = text.splitlines()[0] if text else type(error).__name__
        if "Weights only load failed" in reason:
            reason = "its contents are not a pickled PyTorch object"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated, corrupted or another file "
            f"type): {type(error).__name__}: {reason[:200]}"
        ) from None
