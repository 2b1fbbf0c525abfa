"""engine/trainer.py on a 2x2 linear layer: checkpoints, save crashes, non-finite steps skipped under fp16."""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.helpers import temporaries
from utils import files as files_module  # where atomic_write calls os.replace
from utils.checkpoint import load_checkpoint_file
from engine.data import BatchStream
from engine.steps import NonFiniteLossError, check_finite
from engine.cuda_graph import DeferredFiniteCheck
from engine.trainer import MAX_CONSECUTIVE_SKIPPED, Trainer, TrainingError


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"x": torch.full((2,), float(index))}


def tiny_trainer(output_dir, step_fn, max_iters=6, checkpoint_every=2, fp16_skipping=False, network=None):
    """The real Trainer around a 2x2 linear layer: loop, checkpoints and signals without a BiSeNet."""
    torch.manual_seed(0)
    network = nn.Linear(2, 2) if network is None else network
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
        if Path(destination).name == "last.pth":  # the run writes other files atomically too
            saves.append(Path(destination).name)
        if len(saves) == 2 and Path(destination).name == "last.pth":
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


def test_a_skipped_step_leaves_the_batchnorm_statistics_as_they_were(tmp_path):
    """The fp16 loop goes on after a refused step: with the statistics of before it, not with those
    of the non-finite forward (which would be NaN here, and poison every later step)."""
    states = {}

    def step(network, optimizer, x, iteration):
        states[iteration] = {name: value.clone() for name, value in network.state_dict().items()}
        if iteration == 2:
            x = torch.full_like(x, float("nan"))
        optimizer.zero_grad()
        loss = network(x).pow(2).mean()
        check_finite({"loss": loss})
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    network = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    trainer = tiny_trainer(tmp_path, step, max_iters=4, fp16_skipping=True, network=network)
    trainer.run()
    assert trainer.skipped_steps == 1
    assert states[2].keys() == states[3].keys()
    for name, value in states[2].items():
        assert torch.equal(states[3][name], value), name  # nothing of the refused step remains
    assert not torch.equal(states[1]["1.running_mean"], states[2]["1.running_mean"])  # a real step moves them
    assert all(torch.isfinite(value).all() for value in network.state_dict().values())


def test_a_checkpoint_of_an_iteration_already_saved_links_that_file(tmp_path, monkeypatch):
    # Validation at iteration 2 writes best.pth; last.pth of the same iteration holds the same state,
    # so it is linked to best.pth, not serialised again; a later last.pth is written anew.
    serialised = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, handle, *a, **k: serialised.append(obj["iteration"])
                        or real_save(obj, handle, *a, **k))
    trainer = tiny_trainer(tmp_path, _sgd_step, max_iters=4, checkpoint_every=2)
    trainer.val_every = 2
    trainer.validate_fn = lambda iteration: {"model": {"miou": iteration / 10, "pixel_accuracy": 0.5,
                                                       "num_pixels": 8, "iou": [0.5, 0.5]}}
    trainer.run()
    assert serialised == [2, 4]  # best.pth at 2 and 4; each last.pth of those iterations linked
    best, last = load_checkpoint_file(tmp_path / "best.pth"), load_checkpoint_file(tmp_path / "last.pth")
    assert best["iteration"] == last["iteration"] == 4 and best["best_miou"] == pytest.approx(0.4)
    assert all(torch.equal(best["model"][key], value) for key, value in last["model"].items())
    assert temporaries(tmp_path) == []


def test_a_step_refused_on_the_device_stops_the_run_at_the_next_sync_naming_it_and_saving_nothing(tmp_path):
    """--cuda-graph's finiteness check (engine.cuda_graph.DeferredFiniteCheck) reads nothing in the step:
    the loop learns of a non-finite loss at its next sync (the log window at iteration 4 here), names
    the iteration that had it, and writes no checkpoint of the networks after it; the steps from it on
    were refused on the device, so the networks are still those of last.pth (iteration 2)."""
    torch.manual_seed(0)
    network = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, fused=True)
    check = DeferredFiniteCheck([optimizer], "cpu")

    def step(batches, iteration):
        check.at_iteration(iteration)
        optimizer.zero_grad()
        x = batches["numbers"]["x"] * (float("nan") if iteration == 2 else 1.0)
        loss = network(x).pow(2).mean()
        loss.backward()
        check({"loss": loss})
        optimizer.step()
        return {"loss": loss.detach()}

    trainer = Trainer(args=SimpleNamespace(seed=0), output_dir=tmp_path, device=torch.device("cpu"),
                      networks={"model": network}, optimizers={"model": (optimizer, 0.1)}, scalers={},
                      streams={"numbers": BatchStream(_Numbers(), 2)}, step_fn=step, max_iters=8,
                      log_every=4, checkpoint_every=2, finite_check=check)
    with pytest.raises(TrainingError, match=r"^iteration 2: non-finite loss in loss\. .*not applied either"):
        trainer.run()
    saved = load_checkpoint_file(tmp_path / "last.pth")
    assert saved["iteration"] == 2 and trainer.iteration == 4
    assert all(torch.equal(saved["model"][name], value) for name, value in network.state_dict().items())
