"""One checkpoint format, written atomically and read without executing code.

Writes go to a temporary file in the target directory, are fsynced, then ``os.replace``d over
the destination, so a crash at any moment leaves either the previous file or the new one whole.
Reads use ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""
import glob
import os
import re
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "uda-bisenet/1"
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # how torch.save's zip archive and the legacy pickle format begin


def _read_umask():
    # Read once at import: os.umask can only be read by setting it, which is not thread-safe.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a written file gets the permissions open() would have given it.
_FILE_MODE = 0o666 & ~_read_umask()


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint the caller asked for."""


def atomic_write(path, write_fn, suffix=".tmp"):
    """Call ``write_fn(file_object)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                write_fn(handle)
                handle.flush()
                os.fchmod(handle.fileno(), _FILE_MODE)
                os.fsync(handle.fileno())
        except Exception as error:
            reason = _write_failure(error)
            if reason is None:
                raise
            raise CheckpointError(f"cannot write {path}: {reason}; the previous {path.name}, if any, "
                                  f"is left as it was") from error
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _write_failure(error):
    """Why writing failed, when the file system refused (a full disk, a quota, a read-only mount), else None.

    torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] ... file write
    failed", with the OSError ("No space left on device") only in the chained exception.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    if "write failed" in str(error):
        return "the file write failed (is the disk full?)"
    return None


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


def remove_stale_temporaries(path, suffix=".tmp"):
    """Delete the temporary files that writes of ``path`` left behind when their process was killed
    between creating and renaming them (SIGKILL, power loss); return how many were removed."""
    path = Path(path)
    removed = 0
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"):
        try:
            stale.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


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
