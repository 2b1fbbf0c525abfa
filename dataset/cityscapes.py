"""Cityscapes (the target domain), in either of the two layouts users have.

* official: ``root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with labels
  ``root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``;
  ``name`` = ``<city>/<city>_<seq>_<frame>``.
* flat (the course subset): ``root/images/*.png``, ``root/labels/*.png`` and the split lists
  ``root/train.txt``, ``root/val.txt`` naming image files (``x_leftImg8bit.png``, a path relative
  to ``root/images``, optionally prefixed ``images/``). A label has the image's file name or
  ``_gtFine_labelIds`` in place of ``_leftImg8bit``. ``name`` = the path relative to
  ``root/images`` without ``.png`` and ``_leftImg8bit``.

The official layout wins when a root has both. Label sources: ``labeled=True`` reads the id PNGs
and maps them to trainIds; ``labeled=False`` neither needs nor reads any label file (the
unlabeled target split; samples have no "label" key); ``pseudo_label_dir`` reads trainId PNGs
from ``paths.pseudo_label_path(pseudo_label_dir, name)`` unchanged (whatever ``labeled`` says:
the ground truth is then never read). Cityscapes labels never legitimately differ in size from
their image, so a mismatch is an error, not a repair.
"""
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.common import (VALID_TRAIN_ID, DatasetError, SegmentationDataset, describe_files, list_entries,
                            read_label_ids, read_list_file)
from dataset.labels import IGNORE_INDEX, NUM_CLASSES
from dataset.paths import pseudo_label_path

IMAGE_SUFFIX = "_leftImg8bit"
LABEL_SUFFIX = "_gtFine_labelIds"
EXTENSION = ".png"
LAYOUTS = ("official", "flat")


def _strip_suffix(stem):
    return stem[:-len(IMAGE_SUFFIX)] if stem.endswith(IMAGE_SUFFIX) else stem


def _flat_line_candidates(line, images_dir):
    """Where a flat-layout list line may point, most literal first."""
    line = line.replace("\\", "/")
    while line.startswith("./"):
        line = line[2:]
    relatives = [line]
    if line.startswith("images/"):
        relatives.append(line[len("images/"):])
    candidates = []
    for rel in relatives:
        if rel.endswith(EXTENSION):
            candidates.append(images_dir / rel)
        else:
            candidates += [images_dir / f"{rel}{IMAGE_SUFFIX}{EXTENSION}", images_dir / f"{rel}{EXTENSION}"]
    return candidates


class CityscapesDataset(SegmentationDataset):
    domain = "cityscapes"

    def __init__(self, root, split="train", transform=None, normalization=None, labeled=True,
                 pseudo_label_dir=None, skip_bad=False):
        super().__init__(transform=transform, normalization=normalization, skip_bad=skip_bad)
        self.root = Path(root)
        self.split = split
        self.pseudo_label_dir = Path(pseudo_label_dir) if pseudo_label_dir is not None else None
        self.label_source = "pseudo" if self.pseudo_label_dir is not None else ("gtFine" if labeled else None)

        if (self.root / "leftImg8bit").is_dir():
            self.layout = "official"
            images, gt_labels = self._scan_official()
        elif (self.root / "images").is_dir():
            self.layout = "flat"
            images, gt_labels = self._scan_flat()
        else:
            raise DatasetError(
                f"Cityscapes root {self.root} is in neither layout: looked for {self.root / 'leftImg8bit'} "
                f"(official layout, labels in gtFine/) or {self.root / 'images'} (flat layout with "
                f"train.txt/val.txt); found in {self.root}: {list_entries(self.root)}")

        self.image_paths = [path for path, _ in images]
        self.names = [name for _, name in images]
        if self.label_source == "pseudo":
            if not self.pseudo_label_dir.is_dir():
                raise DatasetError(f"pseudo-label folder {self.pseudo_label_dir} does not exist")
            self.label_paths = [pseudo_label_path(self.pseudo_label_dir, name) for name in self.names]
            missing = [p for p in self.label_paths if not p.is_file()]
            if missing:
                raise DatasetError(f"pseudo labels of split {split!r} in {self.pseudo_label_dir}: "
                                   f"{describe_files(missing, 'missing file')}")
        elif self.label_source == "gtFine":
            self.label_paths = gt_labels
        else:
            self.label_paths = [None] * len(self.image_paths)
        if not skip_bad:
            self.check_first_sample()

    # ---- layouts -------------------------------------------------------------------------------
    def _labels_required_error(self, folder):
        return DatasetError(f"labeled Cityscapes split {self.split!r} needs the label folder {folder} "
                            f"(found in {folder.parent}: {list_entries(folder.parent)}); pass labeled=False "
                            f"for unlabeled target images")

    def _scan_official(self):
        split_dir = self.root / "leftImg8bit" / self.split
        if not split_dir.is_dir():
            raise DatasetError(f"Cityscapes (official layout): no split folder {split_dir}; found splits: "
                               f"{list_entries(self.root / 'leftImg8bit')}")
        paths = sorted(split_dir.glob(f"*/*{IMAGE_SUFFIX}{EXTENSION}"))
        if not paths:
            raise DatasetError(f"Cityscapes split {self.split!r} is empty: no <city>/*{IMAGE_SUFFIX}{EXTENSION} "
                               f"in {split_dir} (found there: {list_entries(split_dir)})")
        images = [(p, f"{p.parent.name}/{_strip_suffix(p.stem)}") for p in paths]
        if self.label_source != "gtFine":
            return images, None
        label_dir = self.root / "gtFine" / self.split
        if not label_dir.is_dir():
            raise self._labels_required_error(label_dir)
        labels = [label_dir / f"{name}{LABEL_SUFFIX}{EXTENSION}" for _, name in images]
        missing = [p for p in labels if not p.is_file()]
        if missing:
            raise DatasetError(f"Cityscapes split {self.split!r}: {describe_files(missing, 'missing label')}")
        return images, labels

    def _scan_flat(self):
        images_dir, labels_dir = self.root / "images", self.root / "labels"
        list_file = self.root / f"{self.split}.txt"
        if not list_file.is_file():
            raise DatasetError(f"Cityscapes (flat layout) split {self.split!r} needs the list {list_file}; "
                               f"found in {self.root}: {list_entries(self.root)}")
        found, missing = {}, []
        for line in read_list_file(list_file):
            candidates = _flat_line_candidates(line, images_dir)
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                missing.append(f"{line} (looked in {images_dir})")
                continue
            rel = path.relative_to(images_dir)
            found[rel.with_name(_strip_suffix(rel.stem)).as_posix()] = path
        if missing:
            raise DatasetError(f"{list_file} names {describe_files(missing, 'missing image')}")
        if not found:
            raise DatasetError(f"Cityscapes split {self.split!r} is empty: {list_file} names no images")
        images = [(found[name], name) for name in sorted(found)]
        if self.label_source != "gtFine":
            return images, None
        if not labels_dir.is_dir():
            raise self._labels_required_error(labels_dir)
        labels, missing = [], []
        for path, name in images:
            rel_dir = path.parent.relative_to(images_dir)
            candidates = [labels_dir / rel_dir / f"{Path(name).name}{LABEL_SUFFIX}{EXTENSION}",
                          labels_dir / rel_dir / path.name]
            label = next((c for c in candidates if c.is_file()), None)
            if label is None:
                missing.append(" or ".join(str(c) for c in dict.fromkeys(candidates)))
            labels.append(label)
        if missing:
            raise DatasetError(f"Cityscapes split {self.split!r}: {describe_files(missing, 'missing label')}")
        return images, labels

    # ---- reading -------------------------------------------------------------------------------
    def _size_mismatch_error(self, index, label_hw, image_hw):
        error = super()._size_mismatch_error(index, label_hw, image_hw)
        if self.label_source == "pseudo":
            error = DatasetError(f"{error}: pseudo labels must be at their image's full size; were they made for "
                                 f"another dataset or size? Regenerate {self.pseudo_label_dir} with createpseudolabels.py")
        return error

    def _read_label(self, index, image):
        path = self.label_paths[index]
        values = read_label_ids(path)
        if values.shape != (image.height, image.width):
            raise self._size_mismatch_error(index, values.shape, (image.height, image.width))
        if self.label_source == "pseudo":
            invalid = ~VALID_TRAIN_ID[values]
            if invalid.any():
                raise DatasetError(f"pseudo label {path} holds values {np.unique(values[invalid]).tolist()[:10]}; "
                                   f"expected trainIds 0..{NUM_CLASSES - 1} or {IGNORE_INDEX}")
            return Image.fromarray(values)
        return Image.fromarray(self.ids_to_train_ids(values, path))
