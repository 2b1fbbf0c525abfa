"""One checkpoint format, written atomically and read without executing code.

Writes go to a temporary file in the target directory, are fsynced, then ``os.replace``d over
the destination (``utils.files.atomic_write``), so a crash at any moment leaves either the
previous file or the new one whole.
Reads use ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""
import re
from pathlib import Path

import torch

from utils.files import atomic_write
from utils.errors import UserError

CHECKPOINT_FORMAT = "uda-bisenet/1"
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # how torch.save's zip archive and the legacy pickle format begin


class CheckpointError(UserError, ValueError):
    """A file that cannot be used as the checkpoint the caller asked for."""


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
        reason = f"{type(error).__name__}: {text.splitlines()[0].split('. ')[0]}" if text else type(error).__name__
        if "Weights only load failed" in reason:
            reason = "its contents are not a pickled PyTorch object"
        head = _first_bytes(path)
        if not head:
            reason = "the file is empty"
        elif not head.startswith(_TORCH_MAGIC):
            reason = f"it is not a PyTorch file (a zip archive or a pickle); it starts with {head!r}"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated, corrupted or another file "
            f"type): {reason[:200]}"
        ) from None


def _first_bytes(path, count=16):
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except OSError:
        return b""
