"""What a run reports: logged loss means, TensorBoard events, console lines (the real Trainer, in process)."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.data import BatchStream
from engine.trainer import Trainer


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"x": torch.full((2,), float(index))}


def counting_trainer(output_dir, max_iters, log_every, checkpoint_every=0, logger=None, progress=False):
    """The real Trainer around a 2x2 linear layer whose step ``i`` (0-based) reports the loss ``i + 1``."""
    torch.manual_seed(0)
    network = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    def step(batches, iteration):
        optimizer.zero_grad()
        network(batches["numbers"]["x"]).sum().backward()
        optimizer.step()
        return {"loss": torch.tensor(float(iteration + 1))}

    return Trainer(args=SimpleNamespace(seed=0, progress=progress), output_dir=output_dir,
                   device=torch.device("cpu"), networks={"model": network}, optimizers={"model": (optimizer, 0.1)},
                   scalers={}, streams={"numbers": BatchStream(_Numbers(), 2)}, step_fn=step, max_iters=max_iters,
                   log_every=log_every, checkpoint_every=checkpoint_every, logger=logger)


def logged(run):
    return {record["iteration"]: record["loss"] for record in
            map(json.loads, (Path(run) / "losses.jsonl").read_text().splitlines())}


# ----------------------------------------------------------------------------------- item 4
def test_each_logged_loss_is_the_mean_of_the_steps_of_its_window(tmp_path):
    """Steps report 1, 2, 3, 4, 5; --log-every 2 logs the means of (1, 2), (3, 4) and the last, partial
    window (5) alone: 5.0, not 5 / 2 as when every window was divided by log_every."""
    counting_trainer(tmp_path, max_iters=5, log_every=2).run()
    assert logged(tmp_path) == {2: 1.5, 4: 3.5, 5: 5.0}


def test_the_first_window_after_a_resume_is_the_mean_of_the_steps_it_ran(tmp_path):
    """Stopped at 3 (its checkpoint), resumed with --log-every 4: iteration 4 logs step 4 alone (4.0)
    and iteration 6 the mean of 5 and 6 (5.5)."""
    counting_trainer(tmp_path, max_iters=3, log_every=4).run()
    resumed = counting_trainer(tmp_path, max_iters=6, log_every=4)
    resumed.resume(tmp_path / "last.pth")
    resumed.run()
    assert logged(tmp_path) == {3: 2.0, 4: 4.0, 6: 5.5}


# ----------------------------------------------------------------------------------- item 7
def test_tensorboard_events_reach_the_disk_at_each_log_window(tmp_path):
    """What a SIGKILL would leave: while step 4 runs, the event file already holds iterations 1..3
    (it was 0 bytes when events were only flushed at the end or every 120 s)."""
    from utils.logger import RunLogger

    logger = RunLogger(tmp_path / "tensorboard", tensorboard=True)
    trainer = counting_trainer(tmp_path, max_iters=5, log_every=1, logger=logger)
    on_disk = {}
    real_step = trainer.step_fn

    def step(batches, iteration):
        if iteration == 3:
            on_disk["bytes"] = b"".join(path.read_bytes() for path in (tmp_path / "tensorboard").glob("events.*"))
        return real_step(batches, iteration)

    trainer.step_fn = step
    trainer.run()
    logger.close()
    assert on_disk["bytes"].count(b"train/loss") == 3


# ----------------------------------------------------------------------------------- item 8
def test_without_a_progress_bar_each_log_window_prints_a_loss_line(tmp_path, capsys):
    """The learning rate shown is the poly schedule's at the window's last step: 0.1 (1 - i/5)^0.9, i = 1, 3, 4."""
    counting_trainer(tmp_path, max_iters=5, log_every=2, progress=False).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] iteration")]
    assert lines == ["[train] iteration 2/5: loss 1.5000, lr_model 8.18e-02",
                     "[train] iteration 4/5: loss 3.5000, lr_model 4.38e-02",
                     "[train] iteration 5/5: loss 5.0000, lr_model 2.35e-02"]


def test_the_progress_bar_shows_a_few_losses_not_all_of_mpls_terms():
    from engine.trainer import MAX_BAR_LOSSES, progress_fields

    means = {f"term_{index}": float(index) for index in range(16)}
    fields = progress_fields(means, {"student": 1e-3, "teacher": 2e-3})
    assert fields == {**{f"term_{index}": f"{index:.3f}" for index in range(MAX_BAR_LOSSES)}, "lr_student": "1.0e-03"}


def test_the_finish_line_after_a_resume_states_the_iterations_this_process_ran(tmp_path, capsys):
    counting_trainer(tmp_path, max_iters=3, log_every=4).run()
    resumed = counting_trainer(tmp_path, max_iters=7, log_every=4)
    resumed.resume(tmp_path / "last.pth")
    capsys.readouterr()
    resumed.run()
    assert "[train] ran 4 iterations (4..7 of 7) in" in capsys.readouterr().out


def test_a_run_that_fails_to_start_leaves_no_run_info_nor_tensorboard_folder(tiny_data_root, tmp_path, capsys):
    import trainSupervised
    from cli.entry import run_main

    not_a_checkpoint = tmp_path / "weights.pth"
    not_a_checkpoint.write_text("not a checkpoint")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:  # the weights are read after start-up, as a network is built
        run_main(trainSupervised.main, trainSupervised.get_args,
                 ["--data-root", str(tiny_data_root), "--output-dir", str(run_dir), "--workers", "0", "--max-iters", "1",
                  "--source-size", "64x36", "--target-size", "64x32", "--init-from", str(not_a_checkpoint)])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
    assert sorted(path.name for path in run_dir.iterdir()) == []


# ----------------------------------------------------------------------------------- item 9: help and formats
def help_text(module, capsys):
    with pytest.raises(SystemExit):
        module.get_args(["--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width


def test_help_shows_each_default_once_and_none_for_switches(capsys):
    import trainUnsupervised

    text = help_text(trainUnsupervised, capsys)
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    assert "random crop WIDTHxHEIGHT after resizing (default: no crop)" in text
    assert "(default: 0.9)" in text  # a real default is still shown


def test_size_defaults_are_shown_as_the_width_x_height_the_flag_takes(capsys):
    import experiments
    from reporting.pipeline import Settings

    text = help_text(experiments, capsys)
    defaults = Settings()
    assert f"GTA5 training size WIDTHxHEIGHT (default: {defaults.source_size})" in text
    assert f"(default: {defaults.target_size})" in text and "(default: (" not in text


def test_eval_offers_no_training_augmentation_flags(tmp_path, capsys):
    import eval as eval_script

    text = help_text(eval_script, capsys)
    assert "--crop-size" not in text and "--scale-range" not in text and "--no-flip" not in text
    with pytest.raises(SystemExit):
        eval_script.get_args(["--checkpoint", "x.pth", "--crop-size", "32x32"])


def test_per_class_tensorboard_tags_name_the_class():
    from dataset.labels import NUM_CLASSES
    from engine.trainer import class_iou_tags

    tags = class_iou_tags([0.5] * NUM_CLASSES)
    assert list(tags)[:3] == ["iou_00_road", "iou_01_sidewalk", "iou_02_building"]
    assert list(tags)[6] == "iou_06_traffic_light" and len(tags) == NUM_CLASSES
    assert list(class_iou_tags([0.1, 0.2])) == ["iou_00", "iou_01"]  # another class count: no names to give


def test_eval_json_stores_the_eval_size_as_the_flag_writes_it(tiny_data_root, tmp_path):
    import eval as eval_script
    from tests.test_exits import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "model.pth")
    eval_script.main(eval_script.get_args(["--checkpoint", str(checkpoint), "--data-root", str(tiny_data_root),
                                           "--workers", "0", "--no-progress", "--eval-size", "64x32",
                                           "--output-dir", str(tmp_path / "eval")]))
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["eval_size"] == "64x32"  # WxH, not [32, 64]
