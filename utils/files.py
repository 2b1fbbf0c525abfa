"""Atomic file writes: a reader sees the previous file or the new one whole, never half of one.

A write goes to a temporary file in the destination's folder (``.<name>.<random><suffix>``) and is
then ``os.replace``d over the destination. ``durable`` writes also fsync the file and the folder,
so the new file survives a power cut once the call returns (checkpoints); bulk files that are
cheap to regenerate (the synthetic benchmark's images) skip the fsyncs.
"""
import glob
import os
import shutil
import tempfile
from pathlib import Path

from utils.errors import WriteError

COPY_CHUNK_BYTES = 16 * 2**20


def _read_umask():
    # Read once at import: os.umask can only be read by setting it, which is not thread-safe.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a written file gets the permissions open() would have given it.
_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write(path, write_fn, suffix=".tmp", durable=True):
    """Call ``write_fn(file_object)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                write_fn(handle)
                os.fchmod(handle.fileno(), _FILE_MODE)
                if durable:
                    handle.flush()
                    os.fsync(handle.fileno())
        except Exception as error:
            reason = _write_failure(error)
            if reason is None:
                raise
            raise WriteError(f"cannot write {path}: {reason}; the previous {path.name}, if any, "
                             f"is left as it was") from error
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    if durable:
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


def atomic_link(source, path):
    """Make ``path`` hold the bytes ``source`` holds now, durably, without writing them again: a hard
    link to ``source`` renamed over ``path``, or a copy where the file system has no hard links.

    The two names then share one file, which stays safe because every write here replaces a name
    (``os.replace``) instead of rewriting a file: when ``source`` is written again, ``path`` keeps
    the bytes it has.
    """
    source, path = Path(source), Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.unlink(tmp_name)  # mkstemp reserved a fresh name; os.link needs it free
        try:
            os.link(source, tmp_name)
        except OSError:  # no hard links here (FAT, some network file systems): copy the bytes
            atomic_write(path, lambda handle: _copy_into(source, handle))
            return
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _copy_into(source, handle):
    with open(source, "rb") as original:
        shutil.copyfileobj(original, handle, COPY_CHUNK_BYTES)


def atomic_write_bytes(path, data, durable=True):
    """Write ``data`` (bytes) to ``path`` through ``atomic_write``."""
    atomic_write(path, lambda handle: handle.write(data), durable=durable)


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
