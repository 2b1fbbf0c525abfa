"""trainUnsupervised.py with the self-training flags of uda/, end to end on the tiny dataset tree."""
import json
import math
import shutil

import pytest
import torch

import trainUnsupervised
from utils.checkpoint import load_checkpoint_file

COMMON = ["--source-size", "64x36", "--target-size", "64x32", "--batch-size", "2", "--workers", "0",
          "--log-every", "1", "--no-progress", "--seed", "5", "--no-tensorboard"]


def _args(data_root, output_dir, *extra):
    return trainUnsupervised.get_args(["--data-root", str(data_root), "--output-dir", str(output_dir), *COMMON, *extra])


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dacs_resume_equals_the_uninterrupted_run_teacher_included(tiny_data_root, tmp_path):
    flags = ("--self-training", "dacs", "--discriminator", "dsc", "--max-iters", "2", "--val-every", "1",
             "--ema-decay", "0.9", "--pseudo-threshold", "0.1")
    straight = tmp_path / "straight"
    trainUnsupervised.main(_args(tiny_data_root, straight, *flags))
    split = tmp_path / "split"
    trainer_cls = trainUnsupervised.Trainer

    class StopAtOne(trainer_cls):
        def save(self, filename):
            super().save(filename)
            if filename == "last.pth" and self.iteration == 1:
                raise KeyboardInterrupt

    trainUnsupervised.Trainer = StopAtOne
    try:
        with pytest.raises(KeyboardInterrupt):
            trainUnsupervised.main(_args(tiny_data_root, split, *flags))
    finally:
        trainUnsupervised.Trainer = trainer_cls
    trainUnsupervised.main(_args(tiny_data_root, split, *flags, "--resume", str(split / "last.pth")))
    assert _losses(split) == _losses(straight)
    assert all(math.isfinite(entry["loss_mix"]) and 0 <= entry["pseudo_weight"] <= 1 for entry in _losses(straight))
    final_straight, final_split = load_checkpoint_file(straight / "last.pth"), load_checkpoint_file(split / "last.pth")
    for network in ("model", "discriminator", "teacher"):
        for key, value in final_straight[network].items():
            assert torch.equal(value, final_split[network][key]), f"{network}.{key} differs after resume"
    # The teacher is an average, not a copy, of the student (after 2 steps, decay min(1 - 1/3, 0.9)).
    differing = [key for key, value in final_straight["teacher"].items()
                 if value.is_floating_point() and not torch.equal(value, final_straight["model"][key])]
    assert differing


@pytest.mark.slow
@pytest.mark.parametrize("flags, logged", [
    (("--fda-beta", "0.05", "--discriminator", "dsc"), {"loss_seg", "loss_adv", "loss_d"}),
    (("--entropy-weight", "0.01", "--discriminator", "dsc"), {"loss_seg", "loss_adv", "loss_entropy"}),
    (("--entropy-weight", "0.01", "--discriminator", "none"), {"loss_seg", "loss_entropy"}),
    (("--rare-class-sampling", "0.5", "--discriminator", "none"), {"loss_seg"}),
    (("--self-training", "dacs", "--discriminator", "none"), {"loss_seg", "loss_mix", "pseudo_weight"}),
], ids=["fda+dsc", "entropy+dsc", "entropy", "rcs", "dacs"])
def test_each_method_trains_two_iterations(tiny_data_root, tmp_path, flags, logged):
    run = tmp_path / "run"
    # Rare-class sampling caches its statistics beside the dataset: a private copy of the tree.
    data_root = shutil.copytree(tiny_data_root, tmp_path / "data") if "--rare-class-sampling" in flags else tiny_data_root
    trainUnsupervised.main(_args(data_root, run, "--max-iters", "2", "--val-every", "2", *flags))
    losses = _losses(run)
    assert [entry["iteration"] for entry in losses] == [1, 2]
    assert logged <= set(losses[0]) and all(math.isfinite(value) for entry in losses for value in entry.values())
    checkpoint = load_checkpoint_file(run / "last.pth")
    assert ("teacher" in checkpoint) == ("dacs" in flags)
    assert (run / "final_table.md").is_file()
    if "--rare-class-sampling" in flags:
        assert (data_root / "GTA5" / "rcs_class_stats_all.json").is_file()
