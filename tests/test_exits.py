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


FAST_WORKER_RUNS = ("trainSupervised", "eval")  # the others run in the slow suite (~10-15 s each here)


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name in FAST_WORKER_RUNS else [pytest.mark.slow])
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


@pytest.mark.slow  # two subprocesses
def test_overwrite_with_resume_or_an_input_inside_the_folder_is_refused(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    before = plant_run(run_dir)
    for flags, expected in [(["--resume", run_dir / "last.pth"], "--overwrite deletes the run that --resume"),
                            (["--init-from", run_dir / "best.pth"], f"--init-from {run_dir / 'best.pth'} lies inside")]:
        code, _, err = run("trainSupervised.py", "--data-root", tiny_data_root, "--output-dir", run_dir, *TINY,
                           "--workers", "0", "--max-iters", "1", "--overwrite", *flags, cwd=tmp_path)
        assert code == EXIT_USER_ERROR and len(error_lines(err)) == 1 and expected in err, err[-3000:]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


# ----------------------------------------------------------------------------------- item 6: one error line, exit 2
def run_in_process(module, argv, capsys):
    """``run_main`` of a script as its ``__main__`` does: (exit status, the stderr lines starting 'error:')."""
    from cli.entry import run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, module.get_args, [str(arg) for arg in argv])
    return exit_info.value.code, error_lines(capsys.readouterr().err)


def _file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
START_ERRORS = {
    "source root alone": (lambda d, t: ["--source-root", d / "GTA5"],
                          "--target-root missing: without --data-root give --source-root and --target-root"),
    "output dir is a file": (lambda d, t: ["--data-root", d, "--output-dir", _file(t)],
                             "is a file, not a folder"),
    "output dir below a file": (lambda d, t: ["--data-root", d, "--output-dir", _file(t) / "run"],
                                "cannot be written: Not a directory"),
    "target too small": (lambda d, t: ["--data-root", d, "--target-size", "100x7"],
                         "--target-size 100x7 is too small to train on: each side must be at least 32 pixels"),
    "source too small": (lambda d, t: ["--data-root", d, "--source-size", "10x10"],
                         "--source-size 10x10 is too small to train on"),
    "unknown device": (lambda d, t: ["--data-root", d, "--device", "tpu"],
                       "--device tpu: expected auto, cpu, cuda or cuda:N"),
    "fp16 on the CPU": (lambda d, t: ["--data-root", d, "--device", "cpu", "--amp", "fp16"],
                        "--amp fp16 needs a CUDA device"),
    "fused loss on the CPU": (lambda d, t: ["--data-root", d, "--device", "cpu", "--fused-loss", "on"],
                              "--fused-loss on: its Triton kernels need a CUDA device (got cpu)"),
    "depthwise triton on the CPU": (lambda d, t: ["--data-root", d, "--device", "cpu", "--depthwise", "triton"],
                                    "--depthwise triton: its Triton kernels need a CUDA device (got cpu)"),
    "cuda graph on the CPU": (lambda d, t: ["--data-root", d, "--device", "cpu", "--cuda-graph", "on"],
                              "--cuda-graph on needs a CUDA device (got cpu); use --cuda-graph off"),
    "cuda without a GPU": (lambda d, t: ["--data-root", d, "--device", "cuda"],
                           "--device cuda: CUDA is not available on this machine"),
}


@pytest.mark.parametrize("case", [pytest.param(case, marks=[NO_CUDA] if "cuda" in case or "fp16" in case else [])
                                  for case in START_ERRORS])
def test_bad_start_up_values_print_one_error_line_and_exit_2(case, tiny_data_root, tmp_path, capsys):
    import trainUnsupervised

    flags, expected = START_ERRORS[case]
    argv = ["--output-dir", tmp_path / "run", *TINY, "--workers", "0", "--max-iters", "1", *flags(tiny_data_root, tmp_path)]
    code, errors = run_in_process(trainUnsupervised, argv, capsys)
    assert code == EXIT_USER_ERROR and len(errors) == 1 and expected in errors[0], errors


@NO_CUDA
def test_cuda_without_a_gpu_exits_2_as_a_subprocess(tiny_data_root, tmp_path):
    code, _, err = run("trainSupervised.py", "--data-root", tiny_data_root, "--output-dir", tmp_path / "run",
                       "--device", "cuda", *TINY, cwd=tmp_path)
    assert code == EXIT_USER_ERROR and error_lines(err) == [
        "error: --device cuda: CUDA is not available on this machine; use --device cpu"], err[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_input_convention_exits_2(tiny_data_root, checkpoint, tmp_path, capsys):
    import trainUnsupervised

    argv = ["--data-root", tiny_data_root, "--output-dir", tmp_path / "run", *TINY, "--workers", "0",
            "--max-iters", "1", "--init-from", checkpoint, "--input-convention", "course"]
    code, errors = run_in_process(trainUnsupervised, argv, capsys)
    assert code == EXIT_USER_ERROR and len(errors) == 1 and "was trained with --input-convention imagenet" in errors[0]


@pytest.mark.parametrize("flag, value, expected", [
    ("--learning-rate", "inf", "a finite number"), ("--learning-rate-d", "nan", "a finite number"),
    ("--lambda-adv", "nan", "a finite number"), ("--momentum", "nan", "a momentum in [0, 1)"),
    ("--momentum", "1.5", "a momentum in [0, 1)"), ("--weight-decay", "-5", "a number >= 0"),
    ("--learning-rate", "-1", "a positive number")])
def test_non_finite_or_negative_numbers_are_refused_by_argparse(flag, value, expected, tmp_path, capsys):
    import trainUnsupervised

    with pytest.raises(SystemExit) as exit_info:
        trainUnsupervised.get_args(["--output-dir", str(tmp_path), flag, value])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert f"argument {flag}: expected {expected}, got {value}" in capsys.readouterr().err


def test_eval_refuses_an_output_folder_it_cannot_write_before_evaluating(tiny_data_root, checkpoint, tmp_path, capsys,
                                                                          monkeypatch):
    import eval as eval_script

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking where the results go")

    monkeypatch.setattr(eval_script, "evaluate", no_evaluation)
    for flag in ("--output-dir", "--save-predictions"):
        argv = ["--checkpoint", checkpoint, "--data-root", tiny_data_root, "--workers", "0", "--no-progress",
                flag, _file(tmp_path)]
        code, errors = run_in_process(eval_script, argv, capsys)
        assert code == EXIT_USER_ERROR and errors == [f"error: {flag} {_file(tmp_path)} is a file, not a folder: "
                                                      f"name a folder (it is created if missing)"]


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    import errno

    from utils.checkpoint import load_checkpoint_file
    from utils.errors import WriteError
    from utils.files import atomic_write

    path = tmp_path / "last.pth"
    atomic_torch_save({"iteration": 4}, path)

    def full_disk(handle):  # what torch.save raises: the OSError only as the chained cause
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed") from error

    with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device; the previous last.pth"):
        atomic_write(path, full_disk)
    assert load_checkpoint_file(path)["iteration"] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


# ----------------------------------------------------------------------------------- item 5: class count
def test_eval_refuses_a_checkpoint_whose_classes_are_not_the_datasets(tiny_data_root, tmp_path, capsys):
    """A 5-class model scored under the 19-class header printed 5 cells as road..pole: refused instead."""
    import eval as eval_script

    five = write_checkpoint(tmp_path / "five.pth", num_classes=5)
    code, errors = run_in_process(eval_script, ["--checkpoint", five, "--data-root", tiny_data_root, "--workers", "0",
                                                "--output-dir", tmp_path / "eval"], capsys)
    assert code == EXIT_USER_ERROR
    assert errors == [f"error: {five} holds a model of 5 classes, but the Cityscapes labels have 19 (road, sidewalk, "
                      f"building, ...); eval.py scores 19-class models only"]
    assert not (tmp_path / "eval").exists()


def test_the_scripts_import_no_torchvision_even_when_they_build_a_network():
    """torchvision's import pulls in torch._dynamo (seconds of every script start): neither loading
    the scripts nor building a BiSeNet imports it (the trunk is model.resnet's own)."""
    scripts = ("trainSupervised", "trainUnsupervised", "createpseudolabels", "MPL", "eval", "predict", "experiments")
    code = (f"import sys; import {', '.join(scripts)}; import model; "
            "network = model.build_bisenet('resnet18', 19); assert network.context_path.layer4 is not None; "
            "print(sorted(m for m in sys.modules if m.startswith('torchvision')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                            check=True).stdout.strip()
    assert loaded == "[]"


STOP_WORKERS_UNDER_THE_LOADERS_HANDLER = """
import multiprocessing, signal, time
from utils.seed import stop_workers_at_exit

def loader_handler(signum, frame):  # what torch's DataLoader installs: raise when a worker dies by a signal
    raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed.")

signal.signal(signal.SIGCHLD, loader_handler)
worker = multiprocessing.Process(target=time.sleep, args=(60,), daemon=True)
worker.start()
stop_workers_at_exit()
print("stopped", worker.exitcode)
"""


def test_stopping_the_workers_at_exit_does_not_trip_the_loaders_sigchld_handler(tmp_path):
    """The exit handler kills the workers left after a data error; the DataLoader's SIGCHLD handler
    would raise at their death, and the run would print a traceback after its one error line."""
    process = subprocess.run([sys.executable, "-c", STOP_WORKERS_UNDER_THE_LOADERS_HANDLER], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 0 and "Traceback" not in process.stderr, process.stderr
    assert process.stdout.split() == ["stopped", str(-signal.SIGKILL)]
