"""createpseudolabels.py and uda/pseudolabels.py end to end, on tiny Cityscapes trees built here.

A fake deterministic "model" returns a fixed logit map per image (it recognises the image by its
uniform colour). The logits are designed so that each pixel's max softmax is a chosen float16
value ``p`` (logit ``log(p (C-1) / (1-p))`` for the predicted class, 0 for the others; float32
softmax lands far closer to ``p`` than half a float16 step), so the references below are plain
numpy on the designed values and never touch the code under test.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

import createpseudolabels
import uda.pseudolabel_files as pl_files
import uda.pseudolabels as pl
from dataset.cityscapes import CityscapesDataset
from dataset.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, train_ids_to_ids
from dataset.paths import THRESHOLDS_FILE, pseudo_color_path, pseudo_label_path
from dataset.transforms import eval_transform
from model import bisenet_checkpoint_entry, build_bisenet
from tests.helpers import folder_digest
from utils.checkpoint import CHECKPOINT_FORMAT
from uda.pseudolabel_stats import MAX_THRESHOLD

H, W = 16, 32
C = NUM_CLASSES
CITIES = {"aachen": 2, "bochum": 3}  # 5 images, sorted aachen/0, aachen/1, bochum/0, bochum/1, bochum/2
PREDICTED = (0, 1, 2, 8, 10, 13)      # classes the fake model predicts; every other class never is
CAPPED = 13                           # car: every confidence >= 0.95, median above the cap
UNPREDICTED_NAME = "traffic sign"     # one of the never-predicted classes, for the warning
SPLIT_CLASS = 2                        # building: low confidences in image 0, high in image 1
FLOAT16_BELOW_ONE = float(np.float16(1 - 2 ** -11))

# Most classes are never predicted here; the warning about it is checked once, below.
pytestmark = pytest.mark.filterwarnings("ignore:pseudo labels. class")


# ------------------------------------------------------------------------------------- fixtures
def image_value(k):
    return 20 + 40 * k  # uniform grey level of image k: how the fake model recognises it


def design(num_images, seed=0, sizes=None):
    """Per image: (pred int64 HxW, p float16 values as float64 HxW, truth trainIds HxW)."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(num_images):
        height, width = sizes[k] if sizes else (H, W)
        pred = rng.choice(PREDICTED, size=(height, width))
        p = rng.uniform(0.15, 0.99, size=(height, width))
        p[pred == CAPPED] = rng.uniform(0.95, FLOAT16_BELOW_ONE, size=int((pred == CAPPED).sum()))
        if k in (0, 1):  # the per-image variant must see a different median here than the whole set
            low, high = ((0.2, 0.45), (0.7, 0.9))[k]
            p[pred == SPLIT_CLASS] = rng.uniform(low, high, size=int((pred == SPLIT_CLASS).sum()))
        p = np.minimum(p.astype(np.float16).astype(np.float64), FLOAT16_BELOW_ONE)
        truth = np.where(rng.random((height, width)) < 0.7, pred, rng.choice(PREDICTED, size=(height, width)))
        truth[rng.random((height, width)) < 0.1] = IGNORE_INDEX
        images.append((pred, p, truth.astype(np.uint8)))
    return images


def logits_of(pred, p):
    logit = np.log(p * (C - 1) / (1 - p))
    logits = np.zeros((C, *pred.shape), np.float64)
    np.put_along_axis(logits, pred[None], logit[None], axis=0)
    return torch.from_numpy(logits).float()


class FakeModel(nn.Module):
    """Returns the logit map of the image it recognises (resized to the input, nearest)."""

    def __init__(self, maps, normalization, fail_after=None):
        super().__init__()
        self.register_buffer("table", torch.stack(maps))  # [K, C, h, w]: part of the state_dict
        self.mean, self.std = normalization.mean[0], normalization.std[0]
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        grey = images[:, 0].mean(dim=(-2, -1)) * self.std + self.mean
        k = torch.round((grey - 20) / 40).long().clamp(0, len(self.table) - 1)
        logits = self.table[k]
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="nearest")
        return logits


def write_tree(root, images):
    """Official Cityscapes layout: uniform images (grey level = index) and their truth."""
    names = []
    k = 0
    for city, count in CITIES.items():
        for frame in range(count):
            base = f"{city}_000000_{frame:06d}"
            pred, _, truth = images[k]
            image_path = root / "leftImg8bit" / "train" / city / f"{base}_leftImg8bit.png"
            label_path = root / "gtFine" / "train" / city / f"{base}_gtFine_labelIds.png"
            for path in (image_path, label_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((*pred.shape, 3), image_value(k), np.uint8)).save(image_path)
            Image.fromarray(train_ids_to_ids(truth)).save(label_path)
            names.append(f"{city}/{base}")
            k += 1
    return names


@pytest.fixture
def setup(tmp_path):
    images = design(sum(CITIES.values()))
    root = tmp_path / "cityscapes"
    names = write_tree(root, images)
    dataset = CityscapesDataset(root, split="train", transform=eval_transform(None), labeled=True)
    model = FakeModel([logits_of(pred, p) for pred, p, _ in images], dataset.normalization)
    return {"images": images, "root": root, "names": names, "dataset": dataset, "model": model, "tmp": tmp_path}


def generate(setup, output_dir, **kwargs):
    options = dict(batch_size=2, writer_threads=0)
    options.update(kwargs)
    model = options.pop("model", setup["model"])
    dataset = options.pop("dataset", setup["dataset"])
    return pl.generate_pseudo_labels(model, dataset, output_dir, "cpu", **options)


# ----------------------------------------------------------------------------------- references
def ref_thresholds(images, cap=MAX_THRESHOLD):
    pred = np.concatenate([i[0].ravel() for i in images])
    p = np.concatenate([i[1].ravel() for i in images])
    medians = np.array([np.median(p[pred == c]) if (pred == c).any() else np.nan for c in range(C)])
    return medians, np.where(np.isnan(medians), 0.0, np.minimum(medians, cap))


def ref_labels(pred, p, thresholds):
    return np.where(p >= thresholds[pred], pred, IGNORE_INDEX).astype(np.uint8)


def read_png(path):
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


# ---------------------------------------------------------------------------------------- tests
def test_end_to_end_thresholds_are_the_exact_median(setup):
    out = setup["tmp"] / "pseudo"
    with pytest.warns(UserWarning, match=UNPREDICTED_NAME):
        result = generate(setup, out)
    medians, thresholds = ref_thresholds(setup["images"])
    report = json.loads((out / THRESHOLDS_FILE).read_text())
    assert report == result["thresholds"]
    assert report["mode"] == "dataset" and report["max_threshold"] == MAX_THRESHOLD
    assert report["thresholds"] == thresholds.tolist()  # exact equality: float16 medians are exact in JSON
    pred = np.concatenate([i[0].ravel() for i in setup["images"]])
    p = np.concatenate([i[1].ravel() for i in setup["images"]])
    for c, name in enumerate(CLASS_NAMES):
        entry = report["classes"][name]
        assert entry["train_id"] == c and entry["pixels"] == int((pred == c).sum())
        if c in PREDICTED:
            assert entry["median"] == medians[c]
            assert entry["kept_fraction"] == (p[pred == c] >= thresholds[c]).mean()
        else:
            assert entry["median"] is None and entry["threshold"] == 0.0 and entry["kept_fraction"] is None
            assert name in report["never_predicted"]
    assert medians[CAPPED] > MAX_THRESHOLD and report["classes"][CLASS_NAMES[CAPPED]]["threshold"] == MAX_THRESHOLD
    assert UNPREDICTED_NAME in report["never_predicted"]
    assert (out / pl.COMPLETE_FILE).is_file() and result["written"] == len(setup["names"])


def test_labels_are_train_ids_at_full_resolution_and_readable_by_the_loader(setup):
    out = setup["tmp"] / "pseudo"
    generate(setup, out)
    _, thresholds = ref_thresholds(setup["images"])
    for name, (pred, p, _) in zip(setup["names"], setup["images"]):
        mode, labels = read_png(pseudo_label_path(out, name))
        assert mode == "L" and labels.shape == pred.shape
        assert set(np.unique(labels)) <= set(range(C)) | {IGNORE_INDEX}
        np.testing.assert_array_equal(labels, ref_labels(pred, p, thresholds))
        color_mode, color = read_png(pseudo_color_path(out, name))
        assert color_mode == "P"
        np.testing.assert_array_equal(color, labels)
    loader_view = CityscapesDataset(setup["root"], split="train", labeled=False, pseudo_label_dir=out)
    assert loader_view.names == setup["names"]
    for index, name in enumerate(loader_view.names):
        np.testing.assert_array_equal(loader_view[index]["label"].numpy(), read_png(pseudo_label_path(out, name))[1])


def test_quality_against_ground_truth_matches_numpy(setup):
    out = setup["tmp"] / "pseudo"
    quality = generate(setup, out)["quality"]
    assert json.loads((out / pl.QUALITY_FILE).read_text()) == quality
    _, thresholds = ref_thresholds(setup["images"])
    pred = np.concatenate([i[0].ravel() for i in setup["images"]])
    p = np.concatenate([i[1].ravel() for i in setup["images"]])
    truth = np.concatenate([i[2].ravel() for i in setup["images"]])
    labels = ref_labels(pred, p, thresholds)
    valid = truth != IGNORE_INDEX
    assert quality["ground_truth"] and quality["images"] == len(setup["names"])
    for c in PREDICTED:
        row = quality["classes"][CLASS_NAMES[c]]
        kept = labels == c
        assert row["kept_pixels"] == kept.sum() and row["kept_fraction"] == pytest.approx(kept.sum() / (pred == c).sum())
        assert row["accuracy_all"] == pytest.approx((truth[valid & (pred == c)] == c).mean())
        assert row["accuracy_kept"] == pytest.approx((truth[valid & kept] == c).mean())
    overall = quality["overall"]
    scored = valid & (labels != IGNORE_INDEX)
    assert overall["accuracy_kept"] == pytest.approx((truth[scored] == labels[scored]).mean())
    assert overall["kept_fraction"] == pytest.approx((labels != IGNORE_INDEX).mean())
    assert quality["classes"][UNPREDICTED_NAME]["accuracy_kept"] is None


def test_per_image_variant_thresholds_each_image_alone(setup):
    out, out_dataset = setup["tmp"] / "per_image", setup["tmp"] / "dataset"
    result = generate(setup, out, per_image=True)
    generate(setup, out_dataset)
    report = json.loads((out / THRESHOLDS_FILE).read_text())
    assert report["mode"] == "per-image" and report["thresholds"] is None
    assert "dataset_threshold" in report["classes"]["road"] and "threshold" not in report["classes"]["road"]
    differs = []
    for name, (pred, p, _) in zip(setup["names"], setup["images"]):
        _, own = ref_thresholds([(pred, p, None)])
        labels = read_png(pseudo_label_path(out, name))[1]
        np.testing.assert_array_equal(labels, ref_labels(pred, p, own))
        differs.append(not np.array_equal(labels, read_png(pseudo_label_path(out_dataset, name))[1]))
    assert differs[0] and differs[1]  # images whose building confidences sit below / above the set's median
    kept = sum((read_png(pseudo_label_path(out, n))[1] == SPLIT_CLASS).sum() for n in setup["names"])
    assert result["quality"]["classes"][CLASS_NAMES[SPLIT_CLASS]]["kept_pixels"] == kept


def test_mixed_image_sizes_in_one_batch_and_upsampled_logits(tmp_path):
    sizes = [(H, W), (H, W), (12, 24), (12, 24), (H, W)]
    images = design(5, seed=3, sizes=sizes)
    root = tmp_path / "cityscapes"
    names = write_tree(root, images)
    dataset = CityscapesDataset(root, split="train", transform=eval_transform((8, 16)), labeled=False)
    native = [F.interpolate(logits_of(pred, p)[None], size=(8, 16), mode="nearest")[0] for pred, p, _ in images]
    model = FakeModel(native, dataset.normalization)
    out = tmp_path / "pseudo"
    with pytest.warns(UserWarning):
        result = pl.generate_pseudo_labels(model, dataset, out, batch_size=3, writer_threads=2)
    thresholds = np.array(result["thresholds"]["thresholds"])
    assert result["quality"]["ground_truth"] is False
    for name, size, table in zip(names, sizes, native):
        labels = read_png(pseudo_label_path(out, name))[1]
        assert labels.shape == size
        probs = F.interpolate(table[None], size=size, mode="bilinear", align_corners=False).softmax(1)[0]
        conf, pred = probs.max(0)
        conf16 = conf.numpy().astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(labels, ref_labels(pred.numpy(), conf16, thresholds))


def test_test_time_augmentation_averages_softmax(setup):
    out = setup["tmp"] / "tta"
    scales = (1.0, 0.5)
    result = generate(setup, out, scales=scales, flip=True)
    tables = setup["model"].table
    views = []
    for scale in scales:
        small = (round(H * scale), round(W * scale))
        table = tables if scale == 1.0 else F.interpolate(tables, size=small, mode="nearest")
        upsampled = F.interpolate(table, size=(H, W), mode="bilinear", align_corners=False)
        views += [upsampled.softmax(1), upsampled.softmax(1).flip(-1)]  # the model ignores flips; TTA unflips
    conf, pred = (sum(views) / len(views)).max(1)
    conf16 = conf.numpy().astype(np.float16).astype(np.float64)
    medians = [np.median(conf16[pred.numpy() == c]) if (pred == c).any() else np.nan for c in range(C)]
    expected = np.where(np.isnan(medians), 0.0, np.minimum(medians, MAX_THRESHOLD))
    np.testing.assert_allclose(result["thresholds"]["thresholds"], expected, rtol=0, atol=1e-3)
    assert result["thresholds"]["identity"]["scales"] == [1.0, 0.5] and result["thresholds"]["identity"]["flip"]


def test_resume_after_interruption_is_byte_identical(setup, monkeypatch):
    reference = setup["tmp"] / "reference"
    generate(setup, reference)
    expected = folder_digest(reference)
    assert {".histogram.pt", THRESHOLDS_FILE, pl.QUALITY_FILE, pl.COMPLETE_FILE} <= set(expected)

    # Stopped in pass 2 after three images (mid-batch: batches are [0, 1], [2, 3], [4]).
    out = setup["tmp"] / "interrupted"
    real_write = pl_files.write_label_files
    count = {"n": 0}

    def failing_write(*args):
        count["n"] += 1
        if count["n"] > 3:
            raise KeyboardInterrupt("simulated interruption")
        real_write(*args)

    monkeypatch.setattr(pl_files, "write_label_files", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate(setup, out)
    monkeypatch.setattr(pl_files, "write_label_files", real_write)
    assert not (out / pl.COMPLETE_FILE).exists() and (out / THRESHOLDS_FILE).exists()
    (out / "aachen" / ".stale.png.abc123.tmp").write_bytes(b"half a file")  # what a kill -9 leaves
    model = setup["model"]
    model.calls = 0
    result = generate(setup, out, resume=True)
    assert result["written"] == 2 and result["reused"] == 3
    assert model.calls == 2  # no pass 1; pass 2 predicts only batches [2, 3] and [4]
    assert folder_digest(out) == expected

    # Files deleted from a finished folder come back identical; the rest is not rewritten.
    for name in setup["names"][1:4:2]:
        pseudo_label_path(out, name).unlink()
    pseudo_color_path(out, setup["names"][4]).unlink()
    (out / pl.QUALITY_FILE).unlink()
    assert generate(setup, out, resume=True, batch_size=1)["written"] == 3
    assert folder_digest(out) == expected


def test_interruption_in_pass_one_then_resume_and_clean_rerun(setup):
    out = setup["tmp"] / "pass1"
    failing = FakeModel(list(setup["model"].table), setup["dataset"].normalization, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        generate(setup, out, model=failing)
    assert not (out / pl.HISTOGRAM_FILE).exists() and not (out / THRESHOLDS_FILE).exists()
    generate(setup, out, resume=True)  # nothing to resume: starts over
    expected = folder_digest(out)
    stale = pseudo_label_path(out, "zurich/zurich_000000_000000")  # a label of an image not in the split
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    generate(setup, out)  # a run without --resume replaces everything
    assert folder_digest(out) == expected


def test_resume_refuses_another_model_or_other_settings(setup):
    out = setup["tmp"] / "pseudo"
    generate(setup, out)
    other = FakeModel(list(setup["model"].table.flip(0)), setup["dataset"].normalization)
    with pytest.raises(pl.PseudoLabelError, match=r"\.histogram\.pt.*model_sha256"):
        generate(setup, out, model=other, resume=True)
    with pytest.raises(pl.PseudoLabelError, match="max_threshold"):
        generate(setup, out, resume=True, max_threshold=0.8)
    with pytest.raises(pl.PseudoLabelError, match="mode"):
        generate(setup, out, resume=True, per_image=True)
    image = setup["dataset"].image_paths[0]  # the data regenerated in place (same names)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10 ** 9))
    with pytest.raises(pl.PseudoLabelError, match="files_sha256"):
        generate(setup, out, resume=True)


def _distributed_worker(rank, world_size, init_file, root, out):
    torch.set_num_threads(1)  # as DataLoader's forked workers do: OpenMP state does not survive fork
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        images = design(sum(CITIES.values()))
        dataset = CityscapesDataset(root, split="train", transform=eval_transform(None), labeled=True)
        model = FakeModel([logits_of(pred, p) for pred, p, _ in images], dataset.normalization)
        pl.generate_pseudo_labels(model, dataset, out, batch_size=1, writer_threads=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_processes_write_the_same_folder_as_one(setup):
    single = setup["tmp"] / "single"
    generate(setup, single, batch_size=1)
    sharded = setup["tmp"] / "sharded"
    # Forked, not spawned: the children start with everything imported (spawn re-imports for ~10 s).
    mp.start_processes(_distributed_worker, args=(2, str(setup["tmp"] / "init"), str(setup["root"]), str(sharded)),
                       nprocs=2, start_method="fork")
    assert folder_digest(sharded) == folder_digest(single)


# ------------------------------------------------------------------------------------- the script
def test_script_with_a_real_checkpoint_then_resume(setup, capsys):
    torch.manual_seed(0)
    network = build_bisenet("resnet18", C, "none").eval()
    checkpoint = setup["tmp"] / "model.pth"
    torch.save({"format": CHECKPOINT_FORMAT, **bisenet_checkpoint_entry(network, "imagenet")}, checkpoint)
    out = setup["tmp"] / "script"
    argv = ["--checkpoint", str(checkpoint), "--target-root", str(setup["root"]), "--target-size", f"{W}x{H}",
            "--eval-size", f"{W // 2}x{H // 2}", "--output-dir", str(out), "--workers", "0", "--no-progress",
            "--device", "cpu", "--batch-size", "5"]
    args = createpseudolabels.get_args(argv)
    assert args.input_convention is None and args.scales == [1.0] and not args.tta_flip and args.split == "train"
    result = createpseudolabels.main(args)
    printed = capsys.readouterr().out
    assert "input convention: imagenet (recorded in the checkpoint)" in printed and "kept acc%" in printed
    assert result["quality"]["ground_truth"]
    report = json.loads((out / THRESHOLDS_FILE).read_text())
    assert report["source"]["checkpoint"] == str(checkpoint) and report["source"]["eval_size"] == [H // 2, W // 2]
    expected = folder_digest(out)
    pseudo_label_path(out, setup["names"][0]).unlink()
    createpseudolabels.main(createpseudolabels.get_args(argv + ["--resume"]))
    assert "resuming" in capsys.readouterr().out
    assert folder_digest(out) == expected
    CityscapesDataset(setup["root"], split="train", pseudo_label_dir=out)


def test_script_flags():
    base = ["--checkpoint", "x.pth", "--output-dir", "out"]
    args = createpseudolabels.get_args(base + ["--scales", "0.75", "1", "1.25", "--flip", "--per-image",
                                               "--max-threshold", "0.8", "--network", "teacher"])
    assert args.scales == [0.75, 1.0, 1.25] and args.tta_flip and args.per_image and args.max_threshold == 0.8
    assert not args.flip and args.crop_size is None  # no training augmentation when labelling
    for bad in (["--max-threshold", "1.5"], ["--scales", "0"], ["--skip-bad"], ["--network", "student"]):
        with pytest.raises(SystemExit):
            createpseudolabels.get_args(base + bad)
    assert math.isclose(createpseudolabels.get_args(base).max_threshold, MAX_THRESHOLD)
