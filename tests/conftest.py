"""Shared fixtures: a tiny dataset tree in the real GTA5 / Cityscapes layouts, built with PIL."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Cityscapes ids used by the tiny scenes: sky, building, road, sidewalk, car.
SKY, BUILDING, ROAD, SIDEWALK, CAR = 23, 11, 7, 8, 26
_COLOURS = {SKY: (70, 130, 180), BUILDING: (70, 70, 70), ROAD: (128, 64, 128), SIDEWALK: (244, 35, 232), CAR: (0, 0, 142)}


def tiny_scene(rng, height, width, tint=0):
    """A label map of ids with a car at a random place, and an image coloured from it plus noise."""
    label = np.full((height, width), SKY, np.uint8)
    label[height // 3:] = BUILDING
    label[height // 2:] = ROAD
    label[height // 2:, : width // 6] = SIDEWALK
    x = int(rng.integers(0, width - width // 4))
    label[height // 2: height // 2 + height // 5, x: x + width // 4] = CAR
    image = np.zeros((height, width, 3), np.float64)
    for class_id, colour in _COLOURS.items():
        image[label == class_id] = colour
    image = np.clip(image + tint + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    return image, label


def write_tiny_tree(root, num_source=8, num_target_train=6, num_target_val=3, seed=0,
                    source_hw=(36, 64), target_hw=(32, 64)):
    root = Path(root)
    rng = np.random.default_rng(seed)
    for folder in ("GTA5/images", "GTA5/labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(1, num_source + 1):
        image, label = tiny_scene(rng, *source_hw)
        Image.fromarray(image).save(root / f"GTA5/images/{index:05d}.png")
        Image.fromarray(label).save(root / f"GTA5/labels/{index:05d}.png")
    for split, count in (("train", num_target_train), ("val", num_target_val)):
        images = root / "Cityscapes/leftImg8bit" / split / "city"
        labels = root / "Cityscapes/gtFine" / split / "city"
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, label = tiny_scene(rng, *target_hw, tint=-40)
            Image.fromarray(image).save(images / f"city_{index:06d}_000019_leftImg8bit.png")
            Image.fromarray(label).save(labels / f"city_{index:06d}_000019_gtFine_labelIds.png")
    return root


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """GTA5/ (8 images 64x36) and Cityscapes/ (6 train + 3 val, 64x32) in the official layouts."""
    return write_tiny_tree(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it: two threads per process on two shared
    cores spin against each other, and one is several times faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
