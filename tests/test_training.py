"""End-to-end training scripts on a tiny dataset tree (CPU, a few iterations)."""
import json

import pytest
import torch

import trainSupervised
import trainUnsupervised
from cli import builders
from dataset.common import DatasetError
from tests.helpers import StopTraining, losses, stop_after, tiny_run
from utils.checkpoint import load_checkpoint_file
from utils.errors import OptionError



def _unsupervised(data_root, output_dir, *extra):
    """The tiny run with TensorBoard on unless ``extra`` says --no-tensorboard."""
    return trainUnsupervised.get_args(["--data-root", str(data_root), "--output-dir", str(output_dir),
                                       *tiny_run(*extra, tensorboard=True)])


@pytest.mark.slow
def test_resumed_adversarial_run_equals_uninterrupted(tiny_data_root, tmp_path):
    straight = tmp_path / "straight"
    trainUnsupervised.main(_unsupervised(tiny_data_root, straight, "--max-iters", "4", "--val-every", "2", "--no-tensorboard"))
    split = tmp_path / "split"
    # First half: the same schedule (max-iters 4) stopped after its checkpoint at iteration 2.
    args = _unsupervised(tiny_data_root, split, "--max-iters", "4", "--val-every", "2", "--no-tensorboard")
    with stop_after(trainUnsupervised, 2), pytest.raises(StopTraining):
        trainUnsupervised.main(args)
    assert load_checkpoint_file(split / "last.pth")["iteration"] == 2
    trainUnsupervised.main(_unsupervised(tiny_data_root, split, "--max-iters", "4", "--val-every", "2",
                                         "--no-tensorboard", "--resume", str(split / "last.pth")))
    assert losses(split) == losses(straight)
    final_straight, final_split = load_checkpoint_file(straight / "last.pth"), load_checkpoint_file(split / "last.pth")
    for network in ("model", "discriminator"):
        for key, value in final_straight[network].items():
            assert torch.equal(value, final_split[network][key]), f"{network}.{key} differs after resume"
    assert final_straight["history"] == final_split["history"]


@pytest.mark.slow
def test_validation_does_not_change_the_training(tiny_data_root, tmp_path):
    """The demo validates less often than it used to; the scores of a stage must not depend on how
    often: a validation draws nothing from the training streams' generators or the global RNG."""
    runs = {}
    for every in (1, 4):
        runs[every] = tmp_path / f"every{every}"
        trainUnsupervised.main(_unsupervised(tiny_data_root, runs[every], "--discriminator", "dsc", "--max-iters", "4",
                                             "--val-every", str(every), "--no-tensorboard"))
    assert [entry["iteration"] for entry in load_checkpoint_file(runs[1] / "last.pth")["history"]] == [1, 2, 3, 4]
    assert losses(runs[1]) == losses(runs[4])
    often, rarely = load_checkpoint_file(runs[1] / "last.pth"), load_checkpoint_file(runs[4] / "last.pth")
    for network in ("model", "discriminator"):
        for key, value in often[network].items():
            assert torch.equal(value, rarely[network][key]), f"{network}.{key} depends on the validation cadence"


@pytest.mark.slow
def test_source_only_builds_no_discriminator_and_writes_run_files(tiny_data_root, tmp_path):
    run = tmp_path / "source_only"
    trainer = trainUnsupervised.main(_unsupervised(tiny_data_root, run, "--discriminator", "none", "--max-iters", "2", "--no-tensorboard"))
    assert "discriminator" not in trainer.networks
    checkpoint = load_checkpoint_file(run / "last.pth")
    assert "discriminator" not in checkpoint and checkpoint["model_config"]["context_path"] == "resnet18"
    info = json.loads((run / "run_info.json").read_text())
    assert info["args"]["discriminator"] == "none" and info["seed"] == 3 and "git_commit" in info
    assert (run / "best.pth").is_file() and (run / "metrics.json").is_file() and (run / "final_table.md").is_file()
    assert set(losses(run)[0]) == {"iteration", "loss_seg", "lr_model"}


@pytest.mark.parametrize("code,name", [("0", "fcd"), ("1", "dsc"), ("fcd", "fcd"), ("DSC", "dsc"), ("none", "none")])
def test_numeric_discriminator_codes(code, name, tmp_path):
    assert trainUnsupervised.get_args(["--output-dir", str(tmp_path), "--discriminator", code]).discriminator == name


def test_unknown_discriminator_and_bad_sizes_are_rejected_by_argparse(tmp_path, capsys):
    for flags in (["--discriminator", "2"], ["--target-size", "-5x10"], ["--optimizer", "lbfgs"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            trainUnsupervised.get_args(["--output-dir", str(tmp_path), *flags])
    assert "fcd" in capsys.readouterr().err


def test_missing_dataset_fails_before_any_model_is_built(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data were checked")

    monkeypatch.setattr(builders, "build_bisenet", no_model)
    args = trainUnsupervised.get_args(["--data-root", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run")])
    with pytest.raises(DatasetError, match="nowhere"):
        trainUnsupervised.main(args)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="GTA5"):
        trainUnsupervised.main(trainUnsupervised.get_args(["--data-root", str(empty), "--output-dir", str(tmp_path / "run")]))


@pytest.mark.slow
def test_adversarial_training_writes_readable_tensorboard_scalars(tiny_data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    trainUnsupervised.main(_unsupervised(tiny_data_root, run, "--discriminator", "fcd", "--max-iters", "3", "--val-every", "3"))
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss_seg", "train/loss_adv", "train/loss_d", "lr/model", "lr/discriminator", "val/model/miou"} <= tags
    assert [event.step for event in accumulator.Scalars("train/loss_seg")] == [1, 2, 3]
    assert accumulator.Tags()["images"]


@pytest.mark.slow
def test_supervised_training_lowers_the_loss(tiny_data_root, tmp_path):
    run = tmp_path / "supervised"
    trainSupervised.main(trainSupervised.get_args([
        "--data-root", str(tiny_data_root), "--output-dir", str(run), "--target-size", "64x32", "--batch-size", "2",
        "--workers", "0", "--no-progress", "--max-iters", "12", "--log-every", "3", "--no-tensorboard",
        "--learning-rate", "0.01"]))
    logged = [entry["loss_seg"] for entry in losses(run)]
    assert logged[-1] < logged[0]


def _conv_weights(path):
    state = load_checkpoint_file(path)["model"]
    return {key: value for key, value in state.items() if value.dtype.is_floating_point and value.dim() == 4}


@pytest.mark.slow
def test_init_from_fine_tunes_from_the_checkpoint_weights(tiny_data_root, tmp_path):
    flags = ["--discriminator", "none", "--no-tensorboard"]
    trainUnsupervised.main(_unsupervised(tiny_data_root, tmp_path / "first", *flags, "--max-iters", "2"))
    # A step too small to move anything: what the second run ends with is what it started from.
    still = ["--max-iters", "1", "--optimizer", "sgd", "--learning-rate", "1e-12", "--momentum", "0", "--weight-decay", "0"]
    trainUnsupervised.main(_unsupervised(tiny_data_root, tmp_path / "tuned", *flags, *still,
                                         "--init-from", str(tmp_path / "first" / "last.pth")))
    trainUnsupervised.main(_unsupervised(tiny_data_root, tmp_path / "fresh", *flags, *still))
    first, tuned, fresh = (_conv_weights(tmp_path / name / "last.pth") for name in ("first", "tuned", "fresh"))
    assert all(torch.allclose(tuned[key], first[key], atol=1e-7) for key in first)
    assert not all(torch.allclose(fresh[key], first[key], atol=1e-4) for key in first)
    # A fine-tuning run starts its own schedule: iteration 1 of 1, not where the first run stopped.
    assert load_checkpoint_file(tmp_path / "tuned" / "last.pth")["iteration"] == 1


@pytest.mark.slow
def test_init_from_refuses_a_checkpoint_of_another_input_convention(tiny_data_root, tmp_path):
    flags = ["--discriminator", "none", "--no-tensorboard", "--max-iters", "1"]
    trainUnsupervised.main(_unsupervised(tiny_data_root, tmp_path / "first", *flags))
    checkpoint = tmp_path / "first" / "last.pth"
    with pytest.raises(OptionError, match="input-convention"):
        trainUnsupervised.main(_unsupervised(tiny_data_root, tmp_path / "tuned", *flags, "--init-from", str(checkpoint),
                                             "--input-convention", "course"))
    assert not (tmp_path / "tuned" / "last.pth").exists()
