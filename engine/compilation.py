"""``torch.compile`` as every script and the benchmark use it: static shapes, Inductor's caches kept
in a folder that outlives the process, and a cache that cannot be read never stops a run.

Static shapes (``dynamic=False``): the source and target batches differ in size, and with the
default (automatic dynamic shapes) the second size recompiles the network with symbolic shapes,
slower to compile (sympy) and to run. Each size gets its own static graph instead.

Compiled once per machine: Inductor stores its compiled graphs (FX graph cache: forward and
backward kernels) and AOTAutograd's forward/backward split (AOTAutograd cache) on disk, keyed by
the graph, the torch version and the device, so a foreign or stale entry is simply never hit. By
default that folder is ``$TMPDIR/torchinductor_$USER``, which a reboot or a batch system's per-job
``/tmp`` empties; ``configure_compile_cache`` points ``TORCHINDUCTOR_CACHE_DIR`` at a persistent
folder instead (``~/.cache/uda-bisenet/inductor``, or the user's own), and the second run of a
script loads its kernels instead of generating and compiling them. Torch writes every entry
atomically (temporary file + rename), so a run killed mid-write leaves no half entry.

A cache that cannot be read: torch itself skips an entry whose record does not unpickle (condensed
here to one log line), but a damaged kernel file (.so, .py) beside an intact record stops the
compilation. ``compile_network``'s backend then recompiles once into a fresh scratch folder, with
one warning naming the broken cache; only an error that survives that retry is raised.
"""
import atexit
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from utils.errors import OptionError

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # read by Inductor at every cache access
TRITON_CACHE_ENV = "TRITON_CACHE_DIR"
_USER_TRITON_CACHE = TRITON_CACHE_ENV in os.environ  # set before any compilation: the user's
CACHE_OFF = "off"
CACHE_FLAG = "--compile-cache"
_TORCH_LOGGERS = ("torch._inductor.codecache",)  # where Inductor and AOTAutograd report unreadable entries
_scratch_dirs = set()  # fresh folders this process made (never a cache worth keeping)
_torch_cache_switches = {}  # the caches' own on/off settings as this process started


class CompileCacheWarning(UserWarning):
    """The compile cache could not be used; the run compiles without it."""


def default_cache_dir():
    """``$XDG_CACHE_HOME/uda-bisenet/inductor`` (``~/.cache/...`` without it): per user, kept across reboots."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "uda-bisenet" / "inductor"


def _writable_folder_problem(folder):
    """None if ``folder`` exists (or was made) and takes a file; else what went wrong."""
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return error.strerror or str(error)
    return None


def _cache_switches():
    """Inductor's FX graph cache and AOTAutograd's cache: (module, attribute) pairs."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return ((inductor_config, "fx_graph_cache"), (functorch_config, "enable_autograd_cache"))


def _set_caches(enabled):
    """Both caches off, or back to what they were when this process started (the user's env wins)."""
    for module, name in _cache_switches():
        _torch_cache_switches.setdefault((module.__name__, name), getattr(module, name))
        setattr(module, name, enabled and _torch_cache_switches[(module.__name__, name)])


def use_cache_folder(folder):
    """Point Inductor at ``folder`` (None: torch's default) and forget what it loaded from the
    previous one. Torch fixes ``TRITON_CACHE_DIR`` below the cache folder at its first Triton kernel;
    unless the user chose it, it follows the new folder."""
    folder = None if folder is None else str(folder)
    if os.environ.get(CACHE_ENV) == folder:
        return
    if folder is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = folder
    if not _USER_TRITON_CACHE:
        os.environ.pop(TRITON_CACHE_ENV, None)
    from torch._inductor.utils import clear_caches

    clear_caches()


def _scratch_folder():
    """A new empty cache folder for this process, removed when it exits."""
    folder = tempfile.mkdtemp(prefix="uda-inductor-")
    _scratch_dirs.add(folder)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def configure_compile_cache(setting=None):
    """Choose where compiled kernels are kept; returns the folder (a string) or ``"off"``.

    ``setting``: None = ``$TORCHINDUCTOR_CACHE_DIR`` if the user set it, else ``default_cache_dir()``;
    a folder; or ``"off"``: compile from scratch (both caches off, kernels in a scratch folder removed
    at exit, so even content-addressed kernel files are not reused). A folder the user named that
    cannot be written is an ``OptionError``; the default folder falls back to a scratch one with
    a warning. Call it before the first compilation (``compile_network`` works without it too:
    torch's default folder).
    """
    _condense_torch_cache_logs()
    if setting == CACHE_OFF:
        _set_caches(False)
        use_cache_folder(_scratch_folder())
        return CACHE_OFF
    _set_caches(True)
    user_folder = setting or os.environ.get(CACHE_ENV)
    folder = Path(user_folder or default_cache_dir()).expanduser().absolute()
    problem = _writable_folder_problem(folder)
    if problem and user_folder:
        source = CACHE_FLAG if setting else CACHE_ENV
        raise OptionError(f"{source} {folder}: not a writable folder ({problem}); give another folder or "
                          f"{CACHE_FLAG} {CACHE_OFF}")
    if problem:
        scratch = _scratch_folder()
        warnings.warn(f"compile cache {folder} is not writable ({problem}): compiled kernels go to {scratch} "
                      f"for this run only (set {CACHE_FLAG} DIR)", CompileCacheWarning, stacklevel=2)
        folder = scratch
    use_cache_folder(folder)
    return str(folder)


def compile_network(network, mode=None):
    """``torch.compile(network, dynamic=False)`` with Inductor (``mode`` as torch.compile's), whose
    compilation survives a damaged cache (module docstring)."""
    return torch.compile(network, backend=_inductor_backend(mode), dynamic=False)


def _inductor_backend(mode):
    """Inductor exactly as ``torch.compile(backend="inductor")`` builds it, with the retry on a
    fresh cache; plain Inductor where this torch lacks the wrapper class."""
    wrapper = getattr(torch, "_TorchCompileInductorWrapper", None)
    if wrapper is None:
        return "inductor"

    class CacheSafeInductor(wrapper):
        __name__ = "inductor"  # the backend's name in torch's logs and guards

        def __call__(self, model_, inputs_, **kwargs):
            with _backward_compiled_with_forward():
                try:
                    return super().__call__(model_, inputs_, **kwargs)
                except Exception as error:
                    broken = os.environ.get(CACHE_ENV)
                    if broken in _scratch_dirs:  # nothing cached to blame: a real compiler error
                        raise
                    scratch = _scratch_folder()
                    use_cache_folder(scratch)
                    compiled = super().__call__(model_, inputs_, **kwargs)  # a real compiler error fails again
                    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
                    warnings.warn(f"compile cache {broken or 'of torch'} unusable ({reason}); compiled without it "
                                  f"in {scratch} (delete the cache folder to rebuild it)", CompileCacheWarning)
                    return compiled

    return CacheSafeInductor(mode, None, False)


def _backward_compiled_with_forward():
    """AOTAutograd compiles a static graph's backward lazily, at the first ``backward()``: outside
    the backend call, where a damaged cached kernel could not be retried. Compile it at once."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        import contextlib

        return contextlib.nullcontext()
    return functorch_config.patch(force_non_lazy_backward_lowering=True)


class _OneLineCacheRecord(logging.Filter):
    """Torch logs an unreadable cache entry with its whole traceback; one line says the same."""

    def filter(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {error}); compiling it instead"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _condense_torch_cache_logs():
    for name in _TORCH_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineCacheRecord) for f in logger.filters):
            logger.addFilter(_OneLineCacheRecord())
