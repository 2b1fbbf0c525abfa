"""GTA5 (the labeled source domain): ``root/images/*.png`` and ``root/labels/*.png``.

Labels are id PNGs (GTA5 ships them as palette PNGs whose indices are the Cityscapes ids) and
are mapped to trainIds by lookup table. A split is either every image (``split=None``/``"all"``),
the list ``root/<split>.txt``, or an explicit ``list_file``; list lines name image files
(``00001.png``, ``images/00001.png`` or ``00001``). A sample's ``name`` is the file's path
relative to ``root/images`` without extension (``00001``).

Known fault of the real data: a few label files are not the size of their image. They are resized
NEAREST to the image's size and counted in ``stats["resized_labels"]``.
"""
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.common import (DatasetError, DatasetWarning, SegmentationDataset, describe_files, list_entries,
                            read_label_ids, read_list_file)

SPLITS = (None, "all", "train", "val")
EXTENSION = ".png"


def _relative_image_path(line):
    """A list line -> image path relative to ``root/images`` (lenient about prefix and extension)."""
    line = line.replace("\\", "/")
    while line.startswith("./"):
        line = line[2:]
    if line.startswith("images/"):
        line = line[len("images/"):]
    if not line.endswith(EXTENSION):
        line += EXTENSION
    return line


class GTA5Dataset(SegmentationDataset):
    domain = "gta5"
    label_size_must_match = False

    def __init__(self, root, split=None, list_file=None, transform=None, normalization=None, skip_bad=False):
        if split not in SPLITS:
            raise ValueError(f"unknown GTA5 split {split!r}; expected one of {SPLITS}")
        if list_file is not None and split is not None:
            raise ValueError(f"give either split ({split!r}) or list_file ({list_file}), not both")
        super().__init__(transform=transform, normalization=normalization, skip_bad=skip_bad)
        self.root = Path(root)
        self.split = split
        images_dir, labels_dir = self.root / "images", self.root / "labels"
        if not (images_dir.is_dir() and labels_dir.is_dir()):
            raise DatasetError(f"GTA5 root {self.root}: looked for the folders {images_dir} and {labels_dir}; "
                               f"found in {self.root}: {list_entries(self.root)}")
        if split in ("train", "val"):
            list_file = self.root / f"{split}.txt"
            if not list_file.is_file():
                raise DatasetError(f"GTA5 split {split!r} needs the list {list_file}; found in {self.root}: "
                                   f"{list_entries(self.root)}")
        self.list_file = Path(list_file) if list_file is not None else None

        if self.list_file is not None:
            relative = [_relative_image_path(line) for line in read_list_file(self.list_file)]
            unique = sorted(set(relative))
            if len(unique) != len(relative):
                warnings.warn(f"{self.list_file}: {len(relative) - len(unique)} duplicate lines ignored",
                              DatasetWarning, stacklevel=2)
            source = f"list {self.list_file}"
        else:
            unique = sorted(p.name for p in images_dir.glob(f"*{EXTENSION}"))
            source = f"folder {images_dir}"
        if not unique:
            raise DatasetError(f"GTA5 split {split or 'all'!r} is empty: no images in {source}")

        self.image_paths = [images_dir / rel for rel in unique]
        self.label_paths = [labels_dir / rel for rel in unique]
        self.names = [rel[:-len(EXTENSION)] for rel in unique]
        missing_images = [p for p in self.image_paths if not p.is_file()]
        missing_labels = [p for p in self.label_paths if not p.is_file()]
        problems = []
        if missing_images:
            problems.append(describe_files(missing_images, "missing image"))
        if missing_labels:
            problems.append(f"{describe_files(missing_labels, 'missing label')} (a label has its image's "
                            f"file name, in {labels_dir})")
        if problems:
            raise DatasetError(f"GTA5 {source}: " + "; ".join(problems))
        if not skip_bad:
            self.check_first_sample()

    def _read_label(self, index, image):
        path = self.label_paths[index]
        ids = read_label_ids(path)
        if ids.shape != (image.height, image.width):
            self.count("resized_labels")
            self._warn_once("resized_labels", f"label {path} is {ids.shape[0]}x{ids.shape[1]} but its image "
                                              f"{self.image_paths[index]} is {image.height}x{image.width} (HxW); "
                                              f"labels of another size are resized NEAREST to their image")
            ids = np.asarray(Image.fromarray(ids).resize(image.size, Image.Resampling.NEAREST))
        return Image.fromarray(self.ids_to_train_ids(ids, path))
