"""Exits of the real scripts, run as subprocesses with a time limit: no hang, one `error:` line, exit 2.

An in-process test never reaches interpreter exit, where a DataLoader worker that ignores SIGTERM
used to keep the process waiting forever; only a subprocess shows it.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset.labels import NUM_CLASSES
from model.bisenet import BiSeNet
from model.loading import bisenet_checkpoint_entry
from tests.conftest import write_tiny_tree
from utils.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds: a healthy run here takes ~5-20 s on a loaded two-core machine; a hang never ends
TINY = ["--source-size", "64x36", "--target-size", "64x32", "--batch-size", "2", "--no-progress", "--no-tensorboard"]
EXIT_USER_ERROR = 2


def run(script, *args, cwd=None, timeout=TIMEOUT):
    """``script args`` in a process group of its own; on a timeout the whole group (workers too) is killed."""
    command = [sys.executable, str(REPO / script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(command, cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{script} {' '.join(map(str, args))} did not exit within {timeout} s")
    return process.returncode, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def truncate(path, keep=0.5):
    content = Path(path).read_bytes()
    Path(path).write_bytes(content[:int(len(content) * keep)])


def write_checkpoint(path, num_classes=NUM_CLASSES):
    """An untrained BiSeNet checkpoint of this project (what eval.py and MPL.py read)."""
    torch.manual_seed(0)
    atomic_torch_save({"format": CHECKPOINT_FORMAT,
                       **bisenet_checkpoint_entry(BiSeNet(num_classes, "resnet18").eval(), "imagenet")}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("checkpoint") / "model.pth")


# ----------------------------------------------------------------------------------- item 2: no hang
CITY_TRAIN = "Cityscapes/leftImg8bit/train/city/city_000002_000019_leftImg8bit.png"
CITY_VAL = "Cityscapes/leftImg8bit/val/city/city_000001_000019_leftImg8bit.png"
GTA_IMAGE = "GTA5/images/00003.png"  # not the first file: start-up checks read that one in the main process

WORKER_RUNS = {
    "trainSupervised": ("trainSupervised.py", GTA_IMAGE, ["--train-domain", "gta5", "--workers", "1"]),
    "trainUnsupervised": ("trainUnsupervised.py", GTA_IMAGE, ["--workers", "1"]),
    "eval": ("eval.py", CITY_VAL, []),  # its default --workers 2, as a user would run it
    "createpseudolabels": ("createpseudolabels.py", CITY_TRAIN, ["--workers", "1"]),
    "MPL": ("MPL.py", GTA_IMAGE, ["--workers", "1"]),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name == "MPL" else [])
                                  for name in WORKER_RUNS])
def test_a_data_error_in_a_loader_worker_exits_2_without_hanging(name, checkpoint, tmp_path):
    """The workers ignore SIGTERM (a Ctrl-C to the group must not kill them mid-save), so the exit
    path must end them itself: the script prints one error line and exits 2 instead of waiting forever."""
    script, broken, flags = WORKER_RUNS[name]
    data = write_tiny_tree(tmp_path / "data")
    truncate(data / broken)
    output = tmp_path / "out"
    args = ["--data-root", data, "--output-dir", output, *flags]
    if script == "eval.py":
        args += ["--checkpoint", checkpoint, "--no-progress"]
    elif script == "createpseudolabels.py":
        args += ["--checkpoint", checkpoint, "--target-size", "64x32", "--no-progress"]
    else:
        args += [*TINY, "--max-iters", "4", "--val-every", "100"]
        if script == "MPL.py":
            args += ["--teacher-checkpoint", checkpoint]
    code, _, err = run(script, *args, cwd=tmp_path)
    assert code == EXIT_USER_ERROR, err[-3000:]
    assert error_lines(err) == [error_lines(err)[0]] and str(data / broken) in error_lines(err)[0], err[-3000:]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------- item 3: no silent overwrite
def plant_run(folder):
    """A folder as a finished run leaves it (the files' contents do not matter: the refusal comes first)."""
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "tensorboard" / "events.out.tfevents.old").write_bytes(b"old curves")
    for name in ("best.pth", "last.pth", "metrics.json"):
        (folder / name).write_bytes(b"the old run's " + name.encode())
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    before = plant_run(run_dir)
    code, _, err = run("trainSupervised.py", "--data-root", tiny_data_root, "--output-dir", run_dir, *TINY,
                       "--workers", "0", "--max-iters", "1", cwd=tmp_path)
    assert code == EXIT_USER_ERROR, err[-3000:]
    assert error_lines(err) == [f"error: --output-dir {run_dir} already holds a run (last.pth, best.pth, "
                                f"metrics.json): add --resume {run_dir / 'last.pth'} to continue it, --overwrite "
                                f"to delete it and start afresh, or name a new --output-dir"]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_overwrite_clears_the_old_run_before_training(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    plant_run(run_dir)
    code, _, err = run("trainSupervised.py", "--data-root", tiny_data_root, "--output-dir", run_dir, *TINY,
                       "--workers", "0", "--max-iters", "1", "--overwrite", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert not (run_dir / "tensorboard").exists()  # the old curves are gone; --no-tensorboard wrote none
    assert (run_dir / "best.pth").read_bytes()[:2] == b"PK"  # a new torch zip file, not the old bytes
    assert (run_dir / "metrics.json").read_text().startswith("{")


def test_overwrite_with_resume_or_an_input_inside_the_folder_is_refused(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    before = plant_run(run_dir)
    for flags, expected in [(["--resume", run_dir / "last.pth"], "--overwrite deletes the run that --resume"),
                            (["--init-from", run_dir / "best.pth"], f"--init-from {run_dir / 'best.pth'} lies inside")]:
        code, _, err = run("trainSupervised.py", "--data-root", tiny_data_root, "--output-dir", run_dir, *TINY,
                           "--workers", "0", "--max-iters", "1", "--overwrite", *flags, cwd=tmp_path)
        assert code == EXIT_USER_ERROR and len(error_lines(err)) == 1 and expected in err, err[-3000:]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
