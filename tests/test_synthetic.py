"""The built-in synthetic benchmark: layout, determinism, caching, class coverage and a measurable shift."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import synthetic
from dataset.labels import ID_TO_TRAINID, IGNORE_INDEX, NUM_CLASSES, SHORT_NAMES
from tests.helpers import folder_digest
from dataset.synthetic import (MARKER_NAME, SOURCE_SIZE, SOURCE_SUBDIR, TARGET_SIZE, TARGET_SUBDIR, TRAIN_CITIES,
                               VAL_CITIES, ensure_synthetic_benchmark, generate_benchmark, render_sample)

COUNTS = dict(num_source=6, num_target_train=4, num_target_val=4)
TINY = dict(num_source=2, num_target_train=1, num_target_val=1)
TRAIN_ID = {name: index for index, name in enumerate(SHORT_NAMES)}
LARGE = ("road", "building", "sky", "vegetation")
RARE = ("rider", "train", "motorcycle", "bicycle")


def all_files(root):
    return folder_digest(root, exclude={synthetic.LOCK_NAME})


def mtimes(root):
    return {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "bench"
    generate_benchmark(out, seed=0, workers=1, progress=False, **COUNTS)
    return out


def read(path):
    return np.asarray(Image.open(path))


def test_source_layout(bench):
    gta = bench / SOURCE_SUBDIR
    names = [f"{i:05d}.png" for i in range(1, COUNTS["num_source"] + 1)]
    assert sorted(p.name for p in (gta / "images").iterdir()) == names
    assert sorted(p.name for p in (gta / "labels").iterdir()) == names
    train = (gta / "train.txt").read_text().splitlines()
    val = (gta / "val.txt").read_text().splitlines()
    assert train + val == names and len(val) >= 1 and names[-1] in val  # val = the last ~10 %
    for name in names:
        image, label = read(gta / "images" / name), read(gta / "labels" / name)
        assert image.shape == SOURCE_SIZE + (3,) and image.dtype == np.uint8
        assert label.shape == SOURCE_SIZE and label.dtype == np.uint8


def test_target_layout(bench):
    cs = bench / TARGET_SUBDIR
    for split, count, cities in (("train", COUNTS["num_target_train"], TRAIN_CITIES),
                                 ("val", COUNTS["num_target_val"], VAL_CITIES)):
        images = sorted((cs / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        labels = sorted((cs / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))
        assert len(images) == len(labels) == count
        assert {p.parent.name for p in images} <= set(cities)
        for image_path in images:
            city = image_path.parent.name
            stem = image_path.name[:-len("_leftImg8bit.png")]
            parts = stem.split("_")
            assert parts[0] == city and len(parts) == 3 and all(len(p) == 6 and p.isdigit() for p in parts[1:])
            label_path = cs / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            image, label = read(image_path), read(label_path)
            assert image.shape == TARGET_SIZE + (3,) and label.shape == TARGET_SIZE


def test_labels_are_cityscapes_ids(bench):
    labels = list(bench.rglob("labels/*.png")) + list(bench.rglob("gtFine/*/*/*.png"))
    valid = set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    for path in labels:
        ids = np.unique(read(path))
        assert set(ID_TO_TRAINID[ids].tolist()) <= valid
        assert ID_TO_TRAINID[ids].min() < NUM_CLASSES  # ids, not trainIds: something maps to a class


def test_marker_and_no_leftovers(bench):
    marker = json.loads((bench / MARKER_NAME).read_text())
    assert marker["seed"] == 0 and marker["num_source"] == COUNTS["num_source"]
    assert marker["source_size"] == list(SOURCE_SIZE) and marker["target_size"] == list(TARGET_SIZE)
    assert (bench / synthetic.OWNER_NAME).is_file()
    assert not [p for p in bench.rglob("*.tmp")]  # atomic writes leave no temporaries


def test_same_seed_identical_any_workers(bench, tmp_path):
    again = tmp_path / "again"
    generate_benchmark(again, seed=0, workers=2, progress=False, **COUNTS)
    assert all_files(again) == all_files(bench)


def test_different_seed_differs(bench, tmp_path):
    other = tmp_path / "other"
    generate_benchmark(other, seed=1, workers=1, progress=False, **COUNTS)
    a, b = all_files(bench), all_files(other)
    assert a.keys() == b.keys()
    differing = [name for name in a if name.endswith(".png") and a[name] != b[name]]
    assert len(differing) == sum(name.endswith(".png") for name in a)


def test_ensure_generates_then_reuses(tmp_path, capsys):
    root = tmp_path / "cache"
    assert ensure_synthetic_benchmark(root, workers=1, progress=False, **TINY) == root
    assert "[synthetic] generating the built-in benchmark" in capsys.readouterr().out
    before = mtimes(root)
    assert ensure_synthetic_benchmark(root, workers=1, progress=False, **TINY) == root
    assert capsys.readouterr().out == ""
    assert mtimes(root) == before  # reused: nothing rewritten

    (root / MARKER_NAME).unlink()  # an interrupted generation looks like this
    ensure_synthetic_benchmark(root, workers=1, progress=False, **TINY)
    assert "(incomplete)" in capsys.readouterr().out and (root / MARKER_NAME).exists()

    ensure_synthetic_benchmark(root, workers=1, progress=False, **dict(TINY, num_source=1))  # parameters changed
    assert "parameters changed" in capsys.readouterr().out
    assert sorted(p.name for p in (root / SOURCE_SUBDIR / "images").iterdir()) == ["00001.png"]  # no stale files


def test_ensure_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(synthetic.ENV_DIR, str(tmp_path / "env"))
    assert ensure_synthetic_benchmark(workers=1, progress=False, **TINY) == tmp_path / "env"
    assert (tmp_path / "env" / MARKER_NAME).is_file()


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / SOURCE_SUBDIR / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        generate_benchmark(tmp_path, workers=1, progress=False, **TINY)
    assert (tmp_path / SOURCE_SUBDIR / "images").is_dir()


def test_command_line(tmp_path):
    assert "--num-target-val" in synthetic.get_args_parser().format_help()
    synthetic.main(["--out", str(tmp_path / "cli"), "--num-source", "1", "--num-target-train", "1",
                    "--num-target-val", "1", "--workers", "1", "--quiet"])
    assert (tmp_path / "cli" / MARKER_NAME).is_file()


def class_pixels(domain, split, count, seed=0):
    """Pixels per trainId and images containing it, over ``count`` images of a split with its schedule."""
    schedule = synthetic.rare_schedule(seed, domain, split, count)
    pixels, images = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    for index in range(count):
        _, label = render_sample(domain, seed, split, index, dict(zip(synthetic.EVENT_NAMES, schedule[index])))
        per_class = np.bincount(ID_TO_TRAINID[label].ravel(), minlength=256)[:NUM_CLASSES]
        pixels += per_class
        images += per_class > 0
    return pixels, images


@pytest.mark.parametrize("domain,split", [("target", "val"), ("source", "all")])
def test_every_class_with_realistic_imbalance(domain, split):
    pixels, images = class_pixels(domain, split, 40)
    missing = [SHORT_NAMES[c] for c in range(NUM_CLASSES) if images[c] == 0]
    assert not missing
    for rare in RARE:
        assert images[TRAIN_ID[rare]] >= 3  # present in several images, not one lucky one
        for large in LARGE:
            assert pixels[TRAIN_ID[large]] > 5 * pixels[TRAIN_ID[rare]]


def test_target_has_ignored_ego_vehicle():
    _, label = render_sample("target", 0, "val", 0)
    assert (ID_TO_TRAINID[label[-1]] == IGNORE_INDEX).all()  # the bonnet covers the bottom row
    _, label = render_sample("source", 0, "all", 0)
    assert (ID_TO_TRAINID[label] != IGNORE_INDEX).all()


def shift_statistics(domain, split, count=12):
    road, colourfulness, sky_detail = [], [], []
    for index in range(count):
        image, label = render_sample(domain, 0, split, index)
        pixels = image.astype(np.float64)
        road.append(pixels[label == synthetic.ROAD].mean(0))
        colourfulness.append((pixels.max(-1) - pixels.min(-1)).mean())
        laplacian = np.abs(4 * pixels[1:-1, 1:-1] - pixels[:-2, 1:-1] - pixels[2:, 1:-1]
                           - pixels[1:-1, :-2] - pixels[1:-1, 2:]).mean(-1)
        sky_detail.append(np.median(laplacian[label[1:-1, 1:-1] == synthetic.SKY]))
    return np.mean(road, 0), np.mean(colourfulness), np.mean(sky_detail)


def test_domain_shift_is_measurable():
    road_s, colour_s, noise_s = shift_statistics("source", "all")
    road_t, colour_t, noise_t = shift_statistics("target", "val")
    assert np.linalg.norm(road_s - road_t) > 25  # different road colour (0..255 units)
    assert colour_s > 1.5 * colour_t             # saturated game vs desaturated camera
    assert noise_t > 1.3 * noise_s               # sensor noise / JPEG on smooth sky


def test_render_sample_deterministic():
    a_image, a_label = render_sample("target", 3, "train", 7, {"train": True})
    b_image, b_label = render_sample("target", 3, "train", 7, {"train": True})
    assert np.array_equal(a_image, b_image) and np.array_equal(a_label, b_label)
    assert (a_label == synthetic.TRAIN).any()


# Two scenes with every rare event on (together: all 19 classes, walls, fences, every vehicle kind,
# riders and the ego bonnet), as the single-module generator drew them before dataset.synthetic
# became a package. The label map must match exactly. The image is compared as the mean level of a
# 4x8 grid of blocks (RGB averaged) and of each channel, to 0.05 of a level: a CPU whose numpy or
# libjpeg rounds a few pixels the other way moves a block by ~0.001, a changed colour, texture,
# shadow or camera effect by far more. A deliberate change of the pictures bumps GENERATOR_VERSION
# and updates these values.
GOLDEN_SCENES = {
    ("source", "all"): (
        "b27a4825067cead2777a7f8c03f6197d3b204e1099d04ea094a85a2741b83f03",
        [[70.48, 59.88, 115.08, 171.08, 167.62, 138.92, 124.69, 78.09],
         [69.44, 68.25, 74.94, 110.51, 110.42, 81.69, 114.69, 87.78],
         [71.91, 72.88, 101.87, 90.33, 84.03, 82.1, 130.57, 115.64],
         [56.23, 62.48, 77.12, 75.12, 80.69, 76.71, 82.68, 76.79]],
        [97.53, 101.89, 80.03]),
    ("target", "val"): (
        "faf060f4aa6b15aa509b7ef7bec631328782a12203e485478b7090a2ff889e6b",
        [[81.97, 122.08, 104.1, 131.96, 112.54, 105.15, 96.2, 74.41],
         [65.4, 98.06, 109.56, 137.32, 120.28, 81.33, 82.91, 82.92],
         [134.1, 84.01, 79.32, 106.46, 103.85, 88.07, 76.69, 78.71],
         [92.09, 79.93, 83.23, 86.17, 86.07, 82.27, 84.47, 86.51]],
        [98.35, 94.66, 91.81]),
}


@pytest.mark.parametrize("domain,split", list(GOLDEN_SCENES))
def test_scene_drawn_as_before(domain, split):
    label_sha256, block_means, channel_means = GOLDEN_SCENES[domain, split]
    image, label = render_sample(domain, 0, split, 0, dict.fromkeys(synthetic.EVENT_NAMES, True))
    assert hashlib.sha256(label.tobytes()).hexdigest() == label_sha256
    height, width = label.shape
    blocks = image.reshape(4, height // 4, 8, width // 8, 3).astype(np.float64).mean((1, 3, 4))
    np.testing.assert_allclose(blocks, block_means, rtol=0, atol=0.05)
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), channel_means, rtol=0, atol=0.05)


def test_default_root_is_the_repository_data_folder(monkeypatch):
    monkeypatch.delenv(synthetic.ENV_DIR, raising=False)
    assert synthetic.default_root() == Path(__file__).resolve().parents[1] / "data" / "synthetic"


def test_module_entry_point(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "dataset.synthetic", "--out", str(out), "--num-source", "1",
                             "--num-target-train", "0", "--num-target-val", "0", "--workers", "1", "--quiet"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / MARKER_NAME).read_text())["num_source"] == 1
    assert sorted(p.name for p in (out / SOURCE_SUBDIR / "images").iterdir()) == ["00001.png"]
