"""Helpers shared by the test files: the tiny run's flags, reading a run's files, damaging files,
stopping a training script after a given iteration, and launching scripts as subprocesses."""
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 240  # what any one script launch may take on a loaded two-core machine

# A training run on the tiny tree of conftest.tiny_data_root: one thread's worth of work per step.
TINY_RUN = ["--source-size", "64x36", "--target-size", "64x32", "--batch-size", "2", "--workers", "0",
            "--log-every", "1", "--no-progress", "--seed", "3", "--no-tensorboard"]


def tiny_run(*extra, tensorboard=False):
    """TINY_RUN plus ``extra`` (strings or paths), with the TensorBoard writer on when asked."""
    flags = [flag for flag in TINY_RUN if tensorboard is False or flag != "--no-tensorboard"]
    return [*flags, *map(str, extra)]


def losses(run_dir):
    """The loss log of a run: one dict per logging step."""
    return [json.loads(line) for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines()]


def folder_digest(folder, exclude=()):
    """{relative path: sha256} of every file under ``folder`` (names in ``exclude`` left out)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


def temporaries(folder):
    """Names of the temporary files an interrupted atomic write leaves (``.NAME.XXXX.tmp``)."""
    return sorted(p.name for p in Path(folder).rglob(".*.tmp"))


def truncate(path, keep=0.5):
    """Cut a file to the first ``keep`` fraction of its bytes (a download or copy that died)."""
    content = Path(path).read_bytes()
    Path(path).write_bytes(content[:int(len(content) * keep)])


class StopTraining(Exception):
    """Raised by ``stop_after`` once the checkpoint of the chosen iteration is written."""


@contextlib.contextmanager
def stop_after(script_module, iteration):
    """While active, ``script_module``'s training run stops right after writing ``last.pth`` of
    ``iteration`` (raising StopTraining), as a job killed there would; ``--resume`` continues it."""
    base = script_module.Trainer

    class StoppingTrainer(base):
        def save(self, filename):
            super().save(filename)
            if filename == "last.pth" and self.iteration == iteration:
                raise StopTraining(iteration)

    script_module.Trainer = StoppingTrainer
    try:
        yield
    finally:
        script_module.Trainer = base


def subprocess_env():
    """One thread per process, unbuffered output, the repository importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def start_script(script, args, log_dir, name, new_session=False):
    """``python REPO/script ARGS...`` with stdout/stderr to ``log_dir/name.{out,err}`` (so nothing
    blocks on a full pipe); ``new_session``: in a process group of its own."""
    out, err = open(log_dir / f"{name}.out", "w"), open(log_dir / f"{name}.err", "w")
    process = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=log_dir, env=subprocess_env(),
                               stdout=out, stderr=err, start_new_session=new_session)
    process.logs = (log_dir / f"{name}.out", log_dir / f"{name}.err")
    out.close(), err.close()
    return process


def finish(process):
    """(exit code, stdout, stderr) of a started script; killed past SUBPROCESS_TIMEOUT_S."""
    try:
        process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return process.returncode, process.logs[0].read_text(), process.logs[1].read_text()
