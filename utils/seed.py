"""Seeding in one place: Python, numpy and torch, plus reproducible DataLoader workers."""
import atexit
import multiprocessing
import multiprocessing.util  # registers the exit-time terminate/join that stop_workers_at_exit must precede
import random
import signal

import numpy as np
import torch


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def ignore_stop_signals(worker_id=None):
    """``worker_init_fn`` of every DataLoader: workers ignore SIGINT/SIGTERM.

    A signal sent to the whole process group (Ctrl-C, SLURM) must reach only the main process,
    which finishes its step (or validation) and checkpoints; a worker dying first would make the
    DataLoader raise and lose that work. The main process shuts the workers down itself, at the
    latest when it exits (:func:`stop_workers_at_exit`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers_at_exit():
    """End the DataLoader workers still alive when the interpreter exits (registered with atexit).

    A worker's exception re-raised in the main process holds the loader iterator in a reference
    cycle (exception -> traceback -> frame -> exception), so the iterator's ``__del__``, which
    shuts its workers down, has not run when the interpreter exits after an error. Python's own
    exit handler then sends the workers SIGTERM, which they ignore (:func:`ignore_stop_signals`),
    and waits for them forever. Here, first collect such cycles so the iterators stop their workers
    politely, then kill the daemonic children left (DataLoader workers are daemonic; the main
    process has finished all its work by now, so nothing is lost).

    The DataLoader's SIGCHLD handler raises when a worker dies by a signal; it is put back to the
    default first, or killing the workers here would raise in this handler (a traceback after the
    run's error line).
    """
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()
            process.join()


# Registered after multiprocessing.util's exit handler (imported above), so it runs before it.
atexit.register(stop_workers_at_exit)


def seed_worker(worker_id):
    """``worker_init_fn`` of the training streams: :func:`ignore_stop_signals`, then numpy/random
    seeds derived from the torch seed the DataLoader gave the worker."""
    ignore_stop_signals()
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


SEED_STRIDE = 1_000_003  # separates seed streams (epochs, iterations, ranks, domains)
_SEED_MODULUS = 2 ** 63


def step_seed(seed, iteration, rank=0):
    """The seed of the random draws a training step makes on the device (augmented views, mixing
    masks): a pure function of (run seed, iteration, rank), so a resumed run draws exactly the same
    ones without storing any generator state (the global RNG is no use for that: the data streams
    consume it when they are re-positioned)."""
    return ((seed * SEED_STRIDE + iteration) * SEED_STRIDE + rank) % _SEED_MODULUS


class StepGenerator:
    """A ``torch.Generator`` on the step's device, re-seeded with ``step_seed`` at each call: the
    random draws of iteration t are the same in a resumed run (one generator object, reused)."""

    def __init__(self, seed):
        self.seed = seed
        self._generator = None

    def __call__(self, iteration, device, rank=0):
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(step_seed(self.seed, iteration, rank))
        return self._generator


def make_generator(seed):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def rng_state():
    """Everything needed to continue a run's random streams exactly (stored in checkpoints).

    Plain types and tensors only, so checkpoints load with ``weights_only=True``.
    """
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
