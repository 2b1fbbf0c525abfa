"""Experiment logging as null objects: TensorBoard (tensorboardX) and W&B, each on or off.

Both back-ends are imported lazily, only when enabled, so machines without them (a bare GPU
node, CI) run every script with logging off. Only rank 0 ever gets a real logger.
"""
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from utils.distributed import is_main_process
from utils.files import atomic_write_bytes


class RunLogger:
    """Sends scalars and images to the enabled back-ends; with none enabled every call is a no-op."""

    def __init__(self, log_dir=None, tensorboard=True, wandb=False, wandb_project="uda-bisenet", config=None, run_name=None):
        self._tensorboard = None
        self._wandb = None
        if not is_main_process():
            return
        if tensorboard and log_dir is not None:
            self._tensorboard = _EventFile(log_dir)
        if wandb:
            import wandb as wandb_module  # lazy: optional dependency; honours WANDB_MODE=offline/disabled

            self._wandb = wandb_module.init(project=wandb_project, config=config, name=run_name,
                                            dir=str(log_dir) if log_dir else None)

    def scalars(self, values, step, prefix=""):
        values = {f"{prefix}{key}": float(value) for key, value in values.items()
                  if value is not None and not (isinstance(value, float) and math.isnan(value))}
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.scalar(key, value, step)
        if self._wandb is not None and values:
            self._wandb.log(values, step=step)

    def images(self, tag, images_hwc, step):
        """``images_hwc``: list of uint8 HxWx3 arrays, logged as one horizontal strip."""
        if not images_hwc:
            return
        strip = np.concatenate(images_hwc, axis=1)
        if self._tensorboard is not None:
            self._tensorboard.image(tag, strip, step)
        if self._wandb is not None:
            import wandb as wandb_module

            self._wandb.log({tag: wandb_module.Image(strip)}, step=step)

    def flush(self):
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self):
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class _EventFile:
    """A TensorBoard event file written in the calling thread, so ``flush()`` puts every event logged
    so far on disk. tensorboardX's SummaryWriter hands events to a background thread through a queue
    and its flush() does not wait for that queue: a killed run kept a 0-byte file."""

    def __init__(self, log_dir):
        from tensorboardX.event_file_writer import EventsWriter  # lazy: optional dependency

        self._log_dir = Path(log_dir)
        self._writer = None
        self._events_writer = EventsWriter

    def _write(self, summary, step):
        from tensorboardX.proto.event_pb2 import Event

        if self._writer is None:  # at the first event: a run that fails to start leaves no empty folder
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._events_writer(os.path.join(str(self._log_dir), "events"))
        self._writer.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalar(self, tag, value, step):
        from tensorboardX.summary import scalar

        self._write(scalar(tag, value), step)

    def image(self, tag, image_hwc, step):
        from tensorboardX.summary import image

        self._write(image(tag, image_hwc, dataformats="HWC"), step)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


GIT_COMMIT_ENV = "UDA_GIT_COMMIT"


def git_commit(repo=None):
    """The repository's HEAD commit (with ``-dirty`` when there are local changes), or None.

    Changes under ``results/`` do not count: the main job overwrites its committed tables there
    before it writes results.json, and the commit it records must say whether the *code* differed.
    A copy of the working tree sent to another machine (a lent GPU) may carry no ``.git``, or a stale
    one, so a caller that knows better names the commit in $UDA_GIT_COMMIT, which then wins.
    """
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    repo = Path(__file__).resolve().parent.parent if repo is None else Path(repo)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no",
                                "--", ".", ":(exclude)results"], cwd=repo, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def plain_args(args):
    """argparse Namespace -> dict of plain JSON types (paths as strings), safe to store anywhere."""
    def plain(value):
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {str(key): plain(item) for key, item in value.items()}
        return str(value)
    return {key: plain(value) for key, value in vars(args).items()}


def write_json(path, data):
    """Write JSON atomically (temporary file + rename) so readers never see half a file."""
    text = json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"
    atomic_write_bytes(path, text.encode())


def write_text(path, text):
    atomic_write_bytes(path, text.encode())


def write_png(path, image):
    """Write a PIL image or a uint8 array (HxW or HxWx3) as a PNG, atomically."""
    from PIL import Image

    from utils.files import atomic_write

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def write_run_info(output_dir, args, extra=None):
    """Resolved args, seed, git commit and environment next to the run's checkpoints."""
    import torch

    info = {
        "args": plain_args(args),
        "seed": getattr(args, "seed", None),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "pid": os.getpid(),
        **(extra or {}),
    }
    write_json(Path(output_dir) / "run_info.json", info)
    return info


def setup_console_logging(level="INFO"):
    """Show the library's log lines (checkpoint format read, missing keys, ...) on the console."""
    import logging

    logging.basicConfig(level=getattr(logging, level), format="[%(name)s] %(message)s")
