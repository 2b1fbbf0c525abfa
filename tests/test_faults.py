"""Faults: a crash inside a checkpoint write, SIGTERM, SIGKILL + --resume, non-finite losses.

The signal tests run the real scripts as subprocesses on the CPU (one thread, --workers 0, tiny
sizes) and compare with an uninterrupted run of the same command: on the CPU a resumed run must
reach exactly the same weights, and a resumed pseudo-label run exactly the same files.
"""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import trainUnsupervised
from dataset.labels import NUM_CLASSES
from model.bisenet import BiSeNet
from model.loading import bisenet_checkpoint_entry
from tests.conftest import write_tiny_tree
from utils import files as files_module  # where atomic_write calls os.replace
from utils.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save, load_checkpoint_file
from cli.entry import EXIT_USER_ERROR, run_main
from engine.data import BatchStream
from engine.steps import NonFiniteLossError
from engine.trainer import MAX_CONSECUTIVE_SKIPPED, Trainer, TrainingError

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds any one subprocess may take on a loaded two-core machine
TINY = ["--source-size", "64x36", "--target-size", "64x32", "--batch-size", "2", "--workers", "0", "--log-every", "1",
        "--no-progress", "--seed", "3", "--no-tensorboard"]
MAX_ITERS = 8
SCHEDULE = ["--max-iters", str(MAX_ITERS), "--checkpoint-every", "2", "--val-every", "4"]


def temporaries(folder):
    return sorted(p.name for p in Path(folder).rglob(".*.tmp"))


# ----------------------------------------------------------------------------------- atomic writes
def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "iteration": 4, "w": torch.arange(5.0)}, path)
    before = path.read_bytes()

    def crash(source, destination):
        assert Path(source).is_file() and Path(source).parent == path.parent  # written next to it, complete
        assert torch.load(source, weights_only=True)["iteration"] == 6
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(files_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "iteration": 6, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint_file(path)["iteration"] == 4
    assert temporaries(tmp_path) == []


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"x": torch.full((2,), float(index))}


def tiny_trainer(output_dir, step_fn, max_iters=6, checkpoint_every=2, fp16_skipping=False):
    """The real Trainer around a 2x2 linear layer: loop, checkpoints and signals without a BiSeNet."""
    torch.manual_seed(0)
    network = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    def step(batches, iteration):
        return step_fn(network, optimizer, batches["numbers"]["x"], iteration)

    return Trainer(args=SimpleNamespace(seed=0), output_dir=output_dir, device=torch.device("cpu"),
                   networks={"model": network}, optimizers={"model": (optimizer, 0.1)}, scalers={},
                   streams={"numbers": BatchStream(_Numbers(), 2)}, step_fn=step, max_iters=max_iters,
                   checkpoint_every=checkpoint_every, fp16_skipping=fp16_skipping)


def _sgd_step(network, optimizer, x, iteration):
    optimizer.zero_grad()
    loss = network(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach()}


def test_trainer_save_crash_keeps_the_last_checkpoint_and_a_killed_save_is_cleaned_up(tmp_path, monkeypatch):
    saves = []
    real_replace = os.replace

    def replace_then_crash(source, destination):
        saves.append(Path(destination).name)
        if len(saves) == 2:
            raise OSError("simulated crash between write and rename")
        real_replace(source, destination)

    monkeypatch.setattr(files_module.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        tiny_trainer(tmp_path, _sgd_step).run()
    monkeypatch.undo()
    assert load_checkpoint_file(tmp_path / "last.pth")["iteration"] == 2 and temporaries(tmp_path) == []

    # A SIGKILL between write and rename leaves the temporary behind: the next run removes it.
    stale = tmp_path / ".last.pth.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    trainer = tiny_trainer(tmp_path, _sgd_step)
    trainer.resume(tmp_path / "last.pth")
    trainer.run()
    assert not stale.exists() and load_checkpoint_file(tmp_path / "last.pth")["iteration"] == 6


# ----------------------------------------------------------------------------------- non-finite losses
def test_non_finite_loss_names_iteration_and_term_and_keeps_the_last_checkpoint(tiny_data_root, tmp_path,
                                                                                 monkeypatch, capsys):
    """A NaN in iteration 3's source batch (through the real adversarial step and check_finite)."""
    real_step = trainUnsupervised.adversarial_step
    run = tmp_path / "run"
    seen = {"calls": 0}

    def poisoned_step(*args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == 4:  # iteration 3 (0-based), after the checkpoint of iteration 2
            seen["last.pth"] = hashlib.sha256((run / "last.pth").read_bytes()).hexdigest()
            args = list(args)
            args[7] = torch.full_like(args[7], float("nan"))  # source images
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainUnsupervised, "adversarial_step", poisoned_step)
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as exit_info:
        run_main(trainUnsupervised.main, trainUnsupervised.get_args,
                 ["--data-root", str(tiny_data_root), "--output-dir", str(run), *TINY, *SCHEDULE])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"error: iteration 3: non-finite loss in loss_seg. The run stops here; the last good checkpoint ({run / 'last.pth'}) was left as it was" in err
    assert hashlib.sha256((run / "last.pth").read_bytes()).hexdigest() == seen["last.pth"]
    checkpoint = load_checkpoint_file(run / "last.pth")
    assert checkpoint["iteration"] == 2
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values() if value.is_floating_point())


def test_fp16_skips_non_finite_steps_counts_them_and_stops_after_too_many_in_a_row(tmp_path):
    def nan_at(iterations):
        def step(network, optimizer, x, iteration):
            if iteration in iterations:
                raise NonFiniteLossError(["loss_seg"])
            return _sgd_step(network, optimizer, x, iteration)
        return step

    trainer = tiny_trainer(tmp_path / "some", nan_at({1, 2, 4}), fp16_skipping=True)
    trainer.run()
    assert trainer.skipped_steps == 3 and trainer.iteration == 6
    assert load_checkpoint_file(tmp_path / "some" / "last.pth")["skipped_steps"] == 3

    trainer = tiny_trainer(tmp_path / "many", nan_at(set(range(3, 100))), max_iters=100, checkpoint_every=2,
                           fp16_skipping=True)
    with pytest.raises(TrainingError, match=rf"{MAX_CONSECUTIVE_SKIPPED + 1} steps in a row had non-finite losses "
                                            rf"\(last at iteration {3 + MAX_CONSECUTIVE_SKIPPED}\); stopping"):
        trainer.run()
    assert load_checkpoint_file(tmp_path / "many" / "last.pth")["iteration"] <= 3 + MAX_CONSECUTIVE_SKIPPED


# ----------------------------------------------------------------------------------- signals (subprocesses)
def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def start(script, args, log_dir, name, new_session=False):
    """The script in its own process (stdout/stderr to files, so nothing blocks while we poll);
    ``new_session``: in a process group of its own, which a test may signal whole."""
    out, err = open(log_dir / f"{name}.out", "w"), open(log_dir / f"{name}.err", "w")
    process = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=log_dir, env=_env(),
                               stdout=out, stderr=err, start_new_session=new_session)
    process.logs = (log_dir / f"{name}.out", log_dir / f"{name}.err")
    out.close(), err.close()
    return process


def finish(process):
    try:
        process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return process.returncode, process.logs[0].read_text(), process.logs[1].read_text()


def wait_for(condition, process, what):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}) before {what}:\n"
                                 f"{process.logs[1].read_text()[-3000:]}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"timed out waiting for {what}")


class CheckpointWatcher:
    """The iteration of ``last.pth`` (written atomically: always whole), reloaded only when replaced."""

    def __init__(self, path):
        self.path = Path(path)
        self.key, self.iteration = None, None

    def __call__(self):
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key != self.key:
            self.key = key
            self.iteration = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)["iteration"]
        return self.iteration


def logged_iterations(run):
    log = run / "losses.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


@pytest.fixture(scope="module")
def interrupted_runs(tiny_data_root, tmp_path_factory):
    """One uninterrupted run, and the same run stopped by SIGTERM, resumed, SIGKILLed, resumed again."""
    root = tmp_path_factory.mktemp("signals")
    straight, split = root / "straight", root / "split"
    command = ["--data-root", tiny_data_root, *TINY, *SCHEDULE]
    reference = start("trainUnsupervised.py", [*command, "--output-dir", straight], root, "straight")
    try:
        # 1. SIGTERM once the loop runs (its first iteration is logged): finish the step, save, exit 143.
        first = start("trainUnsupervised.py", [*command, "--output-dir", split], root, "sigterm")
        wait_for(lambda: logged_iterations(split) >= 1, first, "the first iteration")
        first.send_signal(signal.SIGTERM)
        sigterm = finish(first)
        stopped_at = load_checkpoint_file(split / "last.pth")["iteration"]

        # 2. Resume; SIGKILL as soon as a periodic checkpoint past 4 exists (mid-way through a later step).
        second = start("trainUnsupervised.py", [*command, "--output-dir", split, "--resume", split / "last.pth"],
                       root, "sigkill")
        watcher = CheckpointWatcher(split / "last.pth")
        killed_at = wait_for(lambda: (watcher() or 0) >= max(4, stopped_at + 1) and watcher(), second,
                             "a checkpoint at iteration >= 4")
        second.send_signal(signal.SIGKILL)
        second.wait(timeout=TIMEOUT)
        assert killed_at < MAX_ITERS, "the run finished before it could be killed"

        # 3. Resume again to the end.
        resumed = finish(start("trainUnsupervised.py", [*command, "--output-dir", split, "--resume",
                                                        split / "last.pth"], root, "resumed"))
        straight_result = finish(reference)
    finally:
        if reference.poll() is None:
            reference.kill()
    return SimpleNamespace(straight=straight, split=split, sigterm=sigterm, stopped_at=stopped_at,
                           killed_at=killed_at, killed_rc=second.returncode, resumed=resumed,
                           straight_result=straight_result)


def test_sigterm_to_the_whole_process_group_spares_the_loader_workers(tiny_data_root, tmp_path):
    """SLURM and Ctrl-C signal the whole group: the DataLoader workers must ignore it, so the main
    process can finish its step and save instead of dying on 'worker exited unexpectedly'."""
    run = tmp_path / "group"
    args = [*TINY, *SCHEDULE]
    args[args.index("--workers") + 1] = "1"
    process = start("trainUnsupervised.py", ["--data-root", tiny_data_root, *args, "--output-dir", run], tmp_path,
                    "group", new_session=True)
    try:
        wait_for(lambda: logged_iterations(run) >= 1, process, "the first iteration")
        os.killpg(process.pid, signal.SIGTERM)
        code, out, err = finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, err
    assert "checkpoint written to" in err and "exited unexpectedly" not in err and "Traceback" not in err
    assert 1 <= load_checkpoint_file(run / "last.pth")["iteration"] < MAX_ITERS


def test_every_loader_worker_ignores_stop_signals(tiny_data_root):
    from dataset.cityscapes import CityscapesDataset
    from engine.data import eval_loader
    from utils.seed import ignore_stop_signals

    loader = eval_loader(CityscapesDataset(tiny_data_root / "Cityscapes", split="val"), num_workers=1)
    assert loader.worker_init_fn is ignore_stop_signals
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        ignore_stop_signals(0)
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_non_zero(interrupted_runs):
    code, out, err = interrupted_runs.sigterm
    split, stopped_at = interrupted_runs.split, interrupted_runs.stopped_at
    assert code == 128 + signal.SIGTERM, err
    assert "[signal] SIGTERM received: finishing the current step, then saving a checkpoint" in out
    assert (f"[signal] SIGTERM: stopped after iteration {stopped_at}; checkpoint written to {split / 'last.pth'}. "
            f"Continue with --resume {split / 'last.pth'}") in err
    assert 1 <= stopped_at < MAX_ITERS
    assert "Traceback" not in err


def test_sigkill_then_resume_reaches_the_uninterrupted_weights(interrupted_runs):
    runs = interrupted_runs
    assert runs.killed_rc == -signal.SIGKILL
    for code, out, err in (runs.resumed, runs.straight_result):
        assert code == 0, err[-3000:]
    assert f"[resume] {runs.split / 'last.pth'}: continuing at iteration {runs.killed_at}/{MAX_ITERS}" in runs.resumed[1]
    straight, split = load_checkpoint_file(runs.straight / "last.pth"), load_checkpoint_file(runs.split / "last.pth")
    assert straight["iteration"] == split["iteration"] == MAX_ITERS
    for network in ("model", "discriminator"):
        assert straight[network].keys() == split[network].keys()
        for key, value in straight[network].items():
            assert torch.equal(value, split[network][key]), f"{network}.{key} differs after SIGTERM + SIGKILL + resume"
    assert straight["history"] == split["history"]
    assert (runs.straight / "losses.jsonl").read_text() == (runs.split / "losses.jsonl").read_text()
    assert temporaries(runs.split) == []


# ----------------------------------------------------------------------------------- pseudo labels
PSEUDO_IMAGES = 24


def folder_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.skipif(not (REPO / "createpseudolabels.py").is_file(), reason="no createpseudolabels.py")
def test_pseudo_labels_killed_midway_and_resumed_equal_an_uninterrupted_run(tmp_path):
    data = write_tiny_tree(tmp_path / "data", num_source=2, num_target_train=PSEUDO_IMAGES, num_target_val=1)
    checkpoint = tmp_path / "model.pth"
    torch.manual_seed(0)
    atomic_torch_save({"format": CHECKPOINT_FORMAT,
                       **bisenet_checkpoint_entry(BiSeNet(NUM_CLASSES, "resnet18").eval(), "imagenet")}, checkpoint)
    command = ["--checkpoint", checkpoint, "--data-root", data, "--target-size", "64x32", "--workers", "0",
               "--no-progress", "--writer-threads", "0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = start("createpseudolabels.py", [*command, "--output-dir", straight], tmp_path, "pseudo_straight")
    try:
        first = start("createpseudolabels.py", [*command, "--output-dir", killed], tmp_path, "pseudo_killed")
        wait_for(lambda: len(list(killed.glob("city/*_pseudo_trainIds.png"))) >= 3, first, "the first pseudo labels")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=TIMEOUT)
        labels_at_kill = len(list(killed.glob("city/*_pseudo_trainIds.png")))
        assert 3 <= labels_at_kill < PSEUDO_IMAGES and not (killed / "complete.json").exists()
        code, out, err = finish(start("createpseudolabels.py", [*command, "--output-dir", killed, "--resume"],
                                      tmp_path, "pseudo_resumed"))
        assert code == 0, err[-3000:]
        code, _, err = finish(reference)
        assert code == 0, err[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
    assert (killed / "complete.json").is_file()
    assert folder_digest(killed) == folder_digest(straight)
