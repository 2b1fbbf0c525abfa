"""Reading helpers and the base class shared by the GTA5 and Cityscapes loaders.

Every failure to use a file raises ``DatasetError`` naming that file. Label PNGs hold ids (GTA5
and Cityscapes share the Cityscapes ids) and are mapped to trainIds with the 256-entry lookup
table of ``dataset.labels``; pseudo labels already hold trainIds and are only validated.

``dataset.stats`` counts the events met while loading (skipped samples, resized labels, unknown
ids) over every process that loads from the dataset: the counters live in a small shared-memory
tensor, one row per DataLoader worker, so a run can report them at its end (``data_report``).
"""
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.labels import ID_TO_TRAINID, IGNORE_INDEX, LABELS, LUT_SIZE, NUM_CLASSES
from dataset.normalization import get_normalization
from dataset.transforms import ToTensorNormalize
from utils.errors import UserError

# What PIL raises on missing, truncated or corrupt files (truncated PNGs: OSError; broken chunks:
# SyntaxError; bad zlib streams: zlib.error or ValueError).
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)
_SINGLE_CHANNEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
MAX_LISTED = 5  # how many offending files an error message names before giving the count
MAX_CONSECUTIVE_SKIPS = 16  # with skip_bad, more failures in a row than this mean a broken setup
STAT_KEYS = ("resized_labels", "unknown_ids", "unknown_id_samples", "skipped")
# Counter rows: 0 = the main process, 1 + worker id = a DataLoader worker (ids past the table share
# rows modulo its size; each process only ever adds to its own row, so no lock is needed).
STAT_ROWS = 65

KNOWN_ID = np.zeros(LUT_SIZE, dtype=bool)
KNOWN_ID[[label.id for label in LABELS]] = True
VALID_TRAIN_ID = np.zeros(LUT_SIZE, dtype=bool)
VALID_TRAIN_ID[:NUM_CLASSES] = True
VALID_TRAIN_ID[IGNORE_INDEX] = True
for _table in (KNOWN_ID, VALID_TRAIN_ID):
    _table.flags.writeable = False


class DatasetError(UserError, ValueError):
    """A dataset folder, list or file that cannot be used as asked; the message names it."""


class DatasetWarning(UserWarning):
    """A data fault that the loader repaired or skipped (resized label, unknown ids, bad sample)."""


def describe_files(paths, what="file"):
    """'3 missing files: a, b, c' with at most MAX_LISTED names."""
    paths = [str(p) for p in paths]
    shown = ", ".join(paths[:MAX_LISTED])
    more = f", ... ({len(paths) - MAX_LISTED} more)" if len(paths) > MAX_LISTED else ""
    plural = "s" if len(paths) != 1 else ""
    return f"{len(paths)} {what}{plural}: {shown}{more}"


def list_entries(folder, limit=20):
    """Sorted top-level entries of ``folder`` (folders end with '/') for error messages."""
    folder = Path(folder)
    if not folder.is_dir():
        return "nothing: the folder does not exist" if not folder.exists() else "a file, not a folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return "an empty folder"
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def read_list_file(path):
    """Non-empty, non-comment lines of a split list, stripped."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read split list {path}: {error}") from error
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _colour_label_error(path, mode, bands):
    return DatasetError(
        f"label file {path} has {len(bands)} channels (mode {mode}): expected a "
        f"single-channel id PNG (e.g. *_gtFine_labelIds.png), not a colour-coded label "
        f"(e.g. *_gtFine_color.png)"
    )


def _read_header(path, kind):
    """(mode, (width, height)) from a file's header only; ``DatasetError`` naming it if unreadable."""
    try:
        with Image.open(path) as image:
            mode, size, bands = image.mode, image.size, image.getbands()
    except _READ_ERRORS as error:
        raise DatasetError(f"cannot read {kind} file {path}: {error}") from error
    if kind == "label" and mode not in _SINGLE_CHANNEL_MODES:
        raise _colour_label_error(path, mode, bands)
    return mode, size


def _open_fully(path, kind):
    """Open and decode a whole image file, so truncation shows up here and not later."""
    try:
        with Image.open(path) as image:
            image.load()
    except _READ_ERRORS as error:
        raise DatasetError(f"cannot read {kind} file {path}: {error}") from error
    return image


def read_image(path):
    """The image at ``path`` as a PIL RGB image; ``DatasetError`` naming the file if unreadable."""
    image = _open_fully(path, "image")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_label_ids(path):
    """A single-channel label PNG as a uint8 HxW array of its stored values (ids or trainIds).

    Palette ("P") PNGs, as GTA5 ships its labels, are read as their palette indices, which are the
    ids. Colour-coded labels (RGB, e.g. *_gtFine_color.png) are refused: colours are not ids.
    """
    image = _open_fully(path, "label")
    if image.mode not in _SINGLE_CHANNEL_MODES:
        raise _colour_label_error(path, image.mode, image.getbands())
    ids = np.asarray(image)
    if ids.dtype != np.uint8:
        if ids.size and (ids.min() < 0 or ids.max() >= LUT_SIZE):
            raise DatasetError(f"label file {path} holds values outside 0..{LUT_SIZE - 1} "
                               f"(min {ids.min()}, max {ids.max()}): expected 8-bit label ids")
        ids = ids.astype(np.uint8)
    return ids


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of the loaders: a sorted list of (image, label-or-None, name) and the sample pipeline.

    Subclasses fill ``image_paths``, ``label_paths`` and ``names`` and implement ``_read_label``.
    A sample is ``{"image": float CxHxW, "label": int64 HxW trainIds (absent when unlabeled),
    "name": str, "index": int}``; with ``skip_bad`` an unreadable sample is replaced by the next
    readable one, whose own ``name`` and ``index`` are returned.
    """

    domain = None
    label_size_must_match = True  # GTA5 resizes a label of another size instead (a known data fault)

    def __init__(self, transform=None, normalization=None, skip_bad=False):
        self.transform = transform
        self.normalization = normalization if normalization is not None else get_normalization("imagenet", self.domain)
        self.to_tensor = ToTensorNormalize(self.normalization)
        self.skip_bad = skip_bad
        self.image_paths = []
        self.label_paths = []
        self.names = []
        self._counts = torch.zeros(STAT_ROWS, len(STAT_KEYS), dtype=torch.int64).share_memory_()
        self._warned = set()

    def __len__(self):
        return len(self.image_paths)

    @property
    def labeled(self):
        return bool(self.label_paths) and self.label_paths[0] is not None

    @property
    def stats(self):
        """Counts of this dataset's loading events, summed over the main process and its workers."""
        return dict(zip(STAT_KEYS, self._counts.sum(0).tolist()))

    def count(self, key, amount=1):
        """Add to counter ``key`` (one of ``STAT_KEYS``) from whichever process is loading."""
        worker = torch.utils.data.get_worker_info()
        row = 0 if worker is None else 1 + worker.id % (STAT_ROWS - 1)
        self._counts[row, STAT_KEYS.index(key)] += amount

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message + " (warning once per dataset; see dataset.stats)", DatasetWarning, stacklevel=3)

    def ids_to_train_ids(self, ids, path):
        """Map ids by lookup table, counting the pixels whose id is not in the table (-> 255)."""
        unknown = int(np.count_nonzero(~KNOWN_ID[ids]))
        if unknown:
            self.count("unknown_ids", unknown)
            self.count("unknown_id_samples")
            values = np.unique(ids[~KNOWN_ID[ids]]).tolist()
            self._warn_once("unknown_ids", f"label file {path} holds ids not in the label table "
                                           f"{values[:10]}; mapped to {IGNORE_INDEX}")
        return ID_TO_TRAINID[ids]

    def _read_label(self, index, image):
        """PIL "L" image of trainIds, the size of ``image``, for sample ``index``."""
        raise NotImplementedError

    def _size_mismatch_error(self, index, label_hw, image_hw):
        return DatasetError(f"label {self.label_paths[index]} is {label_hw[0]}x{label_hw[1]} but its image "
                            f"{self.image_paths[index]} is {image_hw[0]}x{image_hw[1]} (HxW)")

    def check_first_sample(self):
        """Read the headers of the first image and label, so that a systematic fault (a folder of
        colour-coded labels, labels of another size, files that are not images) stops the run at
        start-up, before any network is built, instead of at its first batch."""
        if not len(self):
            return
        _, (width, height) = _read_header(self.image_paths[0], "image")
        if self.label_paths[0] is None:
            return
        _, (label_width, label_height) = _read_header(self.label_paths[0], "label")
        if self.label_size_must_match and (label_height, label_width) != (height, width):
            raise self._size_mismatch_error(0, (label_height, label_width), (height, width))

    def load(self, index):
        """Read and transform sample ``index`` (no skipping)."""
        image = read_image(self.image_paths[index])
        label = self._read_label(index, image) if self.label_paths[index] is not None else None
        if self.transform is not None:
            image, label = self.transform(image, label)
        if not isinstance(image, Image.Image):
            raise TypeError(f"{type(self).__name__}: transform must return PIL images (got "
                            f"{type(image).__name__}); the dataset normalizes with its `normalization`")
        image, label = self.to_tensor(image, label)
        sample = {"image": image, "name": self.names[index], "index": index}
        if label is not None:
            sample["label"] = label
        return sample

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        if not self.skip_bad:
            return self.load(index)
        errors = []
        for attempt in range(min(len(self), MAX_CONSECUTIVE_SKIPS + 1)):
            current = (index + attempt) % len(self)
            try:
                return self.load(current)
            except DatasetError as error:
                errors.append(error)
                self.count("skipped")
                warnings.warn(f"skipping unreadable sample {self.names[current]!r}: {error}", DatasetWarning,
                              stacklevel=2)
        raise DatasetError(f"{len(errors)} consecutive unreadable samples from index {index} "
                           f"(skip_bad=True); the first: {errors[0]}") from errors[0]

    def __repr__(self):
        return (f"{type(self).__name__}({len(self)} samples, domain={self.domain!r}, "
                f"labeled={self.labeled}, normalization={self.normalization.name!r})")


def data_report(dataset, name=None):
    """One line on what loading ``dataset`` met (skipped samples, repaired labels), or None if nothing.

    Counts are summed over the DataLoader workers and count every load: a bad sample met in two
    epochs counts twice.
    """
    stats = dataset.stats
    parts = []
    if stats["skipped"]:
        parts.append(f"{stats['skipped']} unreadable sample(s) skipped (--skip-bad; the warnings above name them)")
    if stats["resized_labels"]:
        parts.append(f"{stats['resized_labels']} label(s) of another size than their image resized NEAREST")
    if stats["unknown_ids"]:
        parts.append(f"{stats['unknown_ids']} pixel(s) in {stats['unknown_id_samples']} label(s) held ids outside "
                     f"the label table and were mapped to {IGNORE_INDEX}")
    if not parts:
        return None
    if name is None:
        split = getattr(dataset, "split", None)
        name = f"{dataset.domain} {getattr(dataset, 'root', '')}" + (f" ({split})" if split else "")
    return f"[data] {name}: " + "; ".join(parts)
