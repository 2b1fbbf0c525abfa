"""Faults through the real scripts: a non-finite loss, SIGTERM, SIGKILL + --resume, a killed
pseudo-label run (the trainer's own fault handling on a toy network is in test_trainer.py).

The signal tests run the real scripts as subprocesses on the CPU (one thread, --workers 0, tiny
sizes) and compare with an uninterrupted run of the same command: on the CPU a resumed run must
reach exactly the same weights, and a resumed pseudo-label run exactly the same files.
"""
import os
import signal
from types import SimpleNamespace

import pytest
import torch

import trainUnsupervised
from dataset.labels import NUM_CLASSES
from model.bisenet import BiSeNet
from model.loading import bisenet_checkpoint_entry
from tests.conftest import write_tiny_tree
import uda.step as uda_step
from tests.helpers import TINY_RUN, finish, folder_digest, start_script, temporaries
from utils.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save, load_checkpoint_file
from cli.entry import EXIT_USER_ERROR, run_main

TINY = TINY_RUN  # one thread per subprocess, --workers 0, tiny sizes
MAX_ITERS = 8
SCHEDULE = ["--max-iters", str(MAX_ITERS), "--checkpoint-every", "2", "--val-every", "4"]


# ----------------------------------------------------------------------------------- non-finite losses
def test_non_finite_loss_names_iteration_and_term_and_keeps_the_last_checkpoint(tiny_data_root, tmp_path,
                                                                                 monkeypatch, capsys, one_thread):
    """A NaN in iteration 3's source batch (through the real adversarial step and check_finite)."""
    real_step = uda_step.adversarial_step
    run = tmp_path / "run"
    seen = {"calls": 0}

    def poisoned_step(*args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == 4:  # iteration 3 (0-based), after the checkpoint of iteration 2
            seen["last.pth"] = (run / "last.pth").read_bytes()
            args = list(args)
            args[7] = torch.full_like(args[7], float("nan"))  # source images
        return real_step(*args, **kwargs)

    monkeypatch.setattr(uda_step, "adversarial_step", poisoned_step)  # what trainUnsupervised's step calls
    with pytest.raises(SystemExit) as exit_info:
        run_main(trainUnsupervised.main, trainUnsupervised.get_args,
                 ["--data-root", str(tiny_data_root), "--output-dir", str(run), *TINY, *SCHEDULE])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    # The discriminator's loss reads the source map too: both terms are named, in one check.
    assert (f"error: iteration 3: non-finite loss in loss_seg, loss_d. The run stops here; the last good "
            f"checkpoint ({run / 'last.pth'}) was left as it was") in err
    assert (run / "last.pth").read_bytes() == seen["last.pth"]
    checkpoint = load_checkpoint_file(run / "last.pth")
    assert checkpoint["iteration"] == 2
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values() if value.is_floating_point())


# ----------------------------------------------------------------------------------- signals (subprocesses)
# Each faulty run signals itself at a fixed point (tests/run_with_fault.py): where it stops does
# not depend on how fast the machine is.
TERM_AFTER, KILL_AFTER = 1, 5  # iterations; with checkpoints every 2, the kill leaves last.pth at 4
FAULT_LAUNCHER = "tests/run_with_fault.py"


def start_with_fault(fault, script, args, log_dir, name, new_session=False):
    return start_script(FAULT_LAUNCHER, [*fault, "--", script, *args], log_dir, name, new_session)


def logged_iterations(run):
    log = run / "losses.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


@pytest.fixture(scope="module")
def interrupted_runs(tiny_data_root, tmp_path_factory):
    """One uninterrupted run, and the same run stopped by SIGTERM, resumed, SIGKILLed, resumed again."""
    root = tmp_path_factory.mktemp("signals")
    straight, split = root / "straight", root / "split"
    command = ["--data-root", tiny_data_root, *TINY, *SCHEDULE]
    reference = start_script("trainUnsupervised.py", [*command, "--output-dir", straight], root, "straight")
    try:
        # 1. SIGTERM during iteration 2 (after iteration 1's log line): finish the step, save, exit 143.
        sigterm = finish(start_with_fault(["--signal", "TERM", "--after-logged-iteration", TERM_AFTER],
                                          "trainUnsupervised.py", [*command, "--output-dir", split], root, "sigterm"))
        stopped_at = load_checkpoint_file(split / "last.pth")["iteration"]

        # 2. Resume; SIGKILL after iteration 5's log line: last.pth holds iteration 4, the loss log
        # already has a line of iteration 5 that the next resume must drop.
        killed = finish(start_with_fault(["--signal", "KILL", "--after-logged-iteration", KILL_AFTER],
                                         "trainUnsupervised.py",
                                         [*command, "--output-dir", split, "--resume", split / "last.pth"],
                                         root, "sigkill"))
        killed_at = load_checkpoint_file(split / "last.pth")["iteration"]
        logged_at_kill = logged_iterations(split)

        # 3. Resume again to the end.
        resumed = finish(start_script("trainUnsupervised.py", [*command, "--output-dir", split, "--resume",
                                                             split / "last.pth"], root, "resumed"))
        straight_result = finish(reference)
    finally:
        if reference.poll() is None:
            reference.kill()
    return SimpleNamespace(straight=straight, split=split, sigterm=sigterm, stopped_at=stopped_at,
                           killed_at=killed_at, killed_rc=killed[0], logged_at_kill=logged_at_kill, resumed=resumed,
                           straight_result=straight_result)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_spares_the_loader_workers(tiny_data_root, tmp_path):
    """SLURM and Ctrl-C signal the whole group: the DataLoader workers must ignore it, so the main
    process can finish its step and save instead of dying on 'worker exited unexpectedly'."""
    run = tmp_path / "group"
    args = [*TINY, *SCHEDULE]
    args[args.index("--workers") + 1] = "1"
    process = start_with_fault(["--signal", "TERM", "--after-logged-iteration", TERM_AFTER, "--process-group"],
                               "trainUnsupervised.py", ["--data-root", tiny_data_root, *args, "--output-dir", run],
                               tmp_path, "group", new_session=True)
    try:
        code, out, err = finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, err
    assert "checkpoint written to" in err and "exited unexpectedly" not in err and "Traceback" not in err
    assert load_checkpoint_file(run / "last.pth")["iteration"] == TERM_AFTER


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


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_non_zero(interrupted_runs):
    code, out, err = interrupted_runs.sigterm
    split, stopped_at = interrupted_runs.split, interrupted_runs.stopped_at
    assert code == 128 + signal.SIGTERM, err
    assert "[signal] SIGTERM received: finishing the current step, then saving a checkpoint" in out
    assert (f"[signal] SIGTERM: stopped after iteration {stopped_at}; checkpoint written to {split / 'last.pth'}. "
            f"Continue with --resume {split / 'last.pth'}") in err
    assert stopped_at == TERM_AFTER  # the step under way when the signal came, not the next checkpoint (2)
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_uninterrupted_weights(interrupted_runs):
    runs = interrupted_runs
    assert runs.killed_rc == -signal.SIGKILL
    assert runs.killed_at == KILL_AFTER - 1 and runs.logged_at_kill == KILL_AFTER  # a line past the checkpoint
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
PSEUDO_IMAGES, KILLED_AFTER_LABELS = 24, 3


@pytest.mark.slow
def test_pseudo_labels_killed_midway_and_resumed_equal_an_uninterrupted_run(tmp_path):
    data = write_tiny_tree(tmp_path / "data", num_source=2, num_target_train=PSEUDO_IMAGES, num_target_val=1)
    checkpoint = tmp_path / "model.pth"
    torch.manual_seed(0)
    atomic_torch_save({"format": CHECKPOINT_FORMAT,
                       **bisenet_checkpoint_entry(BiSeNet(NUM_CLASSES, "resnet18").eval(), "imagenet")}, checkpoint)
    command = ["--checkpoint", checkpoint, "--data-root", data, "--target-size", "64x32", "--workers", "0",
               "--no-progress", "--writer-threads", "0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = start_script("createpseudolabels.py", [*command, "--output-dir", straight], tmp_path, "pseudo_straight")
    try:
        code, _, err = finish(start_with_fault(["--signal", "KILL", "--after-label-files", KILLED_AFTER_LABELS],
                                               "createpseudolabels.py", [*command, "--output-dir", killed],
                                               tmp_path, "pseudo_killed"))
        assert code == -signal.SIGKILL, err[-3000:]
        assert len(list(killed.glob("city/*_pseudo_trainIds.png"))) == KILLED_AFTER_LABELS
        assert not (killed / "complete.json").exists()
        code, out, err = finish(start_script("createpseudolabels.py", [*command, "--output-dir", killed, "--resume"],
                                             tmp_path, "pseudo_resumed"))
        assert code == 0, err[-3000:]
        code, _, err = finish(reference)
        assert code == 0, err[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
    assert (killed / "complete.json").is_file()
    assert folder_digest(killed) == folder_digest(straight)
