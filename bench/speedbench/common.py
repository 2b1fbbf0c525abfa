"""Helpers shared by the sections: timing (synchronise, quantiles, per-entry time limit), cuDNN and
TF32 switches, the compiler and memory resets, strict JSON, and the job record the recorder runs."""
import contextlib
import gc
import math
import os
import signal
import statistics
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.optim import ADAM_BETAS, SGD_MOMENTUM, SGD_WEIGHT_DECAY, build_optimizer
from cli.options import format_size


class EntryTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise EntryTimeout in the main thread after ``seconds`` (best effort; no-op elsewhere)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise EntryTimeout(f"entry stopped after its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_average():
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cudnn_flags(benchmark=False, allow_tf32=True, deterministic=False):
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=benchmark,
                                      deterministic=deterministic, allow_tf32=allow_tf32)


@contextlib.contextmanager
def strict_fp32():
    """No TF32 anywhere: the reference that 'fp32 eager' predictions are compared against."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with cudnn_flags(benchmark=False, allow_tf32=False, deterministic=True):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@contextlib.contextmanager
def imports_frozen():
    """The objects alive on entry (the imported modules above all) sit in gc's permanent generation
    for the block, so each release_memory walks only what the entries made: a full collection walks
    every tracked object, and the hundreds of thousands that importing torch creates make each one
    cost as much as a small entry."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_compiler():
    """Forget earlier compilations (and their CUDA-graph pools) and Inductor's loaded kernels: each
    compiled entry starts as a fresh process would (the cache folder on disk is kept)."""
    import torch._dynamo
    from torch._inductor.utils import clear_caches

    torch._dynamo.reset()
    clear_caches()


@contextlib.contextmanager
def fresh_compile_cache():
    """An empty Inductor cache folder for the block (a cold compile, whatever this machine compiled
    before), removed afterwards; the previous folder is restored."""
    import shutil
    import tempfile

    from engine.compilation import CACHE_ENV, configure_compile_cache, use_cache_folder

    previous = os.environ.get(CACHE_ENV)  # None: torch's own folder
    folder = tempfile.mkdtemp(prefix="speedbench-inductor-")
    try:
        yield configure_compile_cache(folder)
    finally:
        reset_compiler()
        use_cache_folder(previous)
        shutil.rmtree(folder, ignore_errors=True)


def quantiles(samples_s):
    """Median, p10 and p90 of timing samples, in milliseconds."""
    ordered = sorted(samples_s)
    pick = lambda q: 1e3 * ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"median_ms": 1e3 * statistics.median(ordered), "p10_ms": pick(0.1), "p90_ms": pick(0.9)}


def json_safe(value):
    """NaN/inf -> None, numpy and torch scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def size_text(size_hw):
    return format_size(size_hw)


def make_optimizer(kind, parameters, lr, implementation):
    """SGD (segmentation network) or Adam (discriminator) with the scripts' hyper-parameters.

    ``fused`` is ``engine.optim.build_optimizer`` itself; ``for-loop`` and ``foreach`` change only
    the implementation of the same update.
    """
    if implementation == "fused":
        if kind == "sgd":
            return build_optimizer("sgd", parameters, lr)
        return build_optimizer("adam", parameters, lr, weight_decay=0.0)
    flags = {"foreach": implementation == "foreach"}
    parameters = [p for p in parameters if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY, **flags)
    return torch.optim.Adam(parameters, lr=lr, betas=ADAM_BETAS, weight_decay=0.0, **flags)


class RepeatedDataset(torch.utils.data.Dataset):
    """``times`` passes over ``dataset`` as one epoch, so a loader's workers start once."""

    def __init__(self, dataset, times):
        self.dataset, self.times = dataset, times

    def __len__(self):
        return len(self.dataset) * self.times

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]


@dataclass
class Job:
    """One entry of a section: ``fn()`` measures and returns the fields the recorder adds to it."""

    section: str
    key: str
    name: str
    fn: object
    settings: dict = field(default_factory=dict)
    cost_s: float = 5.0
    phase: int = 0       # 0: eager measurements, 1: compilations (after every eager entry)
    priority: float = 0  # within phase 1: lower first


def bind(fn, *args):
    """A job's callable: ``fn(*args)`` when the recorder runs it."""
    return lambda: fn(*args)
