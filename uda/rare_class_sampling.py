"""Rare-class sampling (RCS) of the source images (Hoyer et al., DAFormer, CVPR 2022).

A self-trained model learns rare classes late or never; RCS shows them more often. With ``f_c``
the share of class ``c`` among the labelled source pixels, a class is drawn with probability
``P(c) = softmax((1 - f_c) / T)`` (temperature ``T``: small favours rare classes strongly, large
tends to uniform over classes), then an image uniformly among those that hold enough of it (at
least ``MIN_PIXEL_SHARE`` of their pixels: DAFormer's 3000 pixels of a 1914x1052 GTA5 label;
classes no image holds are never drawn).

The per-image class pixel counts come from the label files once (at their stored resolution)
and are cached beside the dataset (``rcs_class_stats_<split>.json``) or, when the dataset folder
is read-only, in the run folder; a cache is used only when it was computed from the same label
files (names and sizes) and number of classes. Writes are atomic.

The sampler is ``engine.data.EpochSampler`` with another epoch order: an "epoch" has as many
batches as a shuffled epoch, its draws come from a generator seeded by (seed, epoch), and it is
sharded and seeded per sample like every stream, so runs stay resumable and torchrun-ready.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from dataset.common import DatasetError, read_label_ids
from dataset.labels import ID_TO_TRAINID, LUT_SIZE
from engine.data import EpochSampler
from utils.distributed import is_main_process
from utils.logger import write_json

STATS_FORMAT = "uda-bisenet/rcs-class-stats/1"
MIN_PIXEL_SHARE = 3000 / (1914 * 1052)  # DAFormer's rcs_min_pixels on a full-size GTA5 label


def count_class_pixels(label_paths, num_classes, to_train_ids=ID_TO_TRAINID):
    """int64 [N, K] pixels of each train class in each label file, and int64 [N] pixels per file."""
    counts = np.zeros((len(label_paths), num_classes), dtype=np.int64)
    pixels = np.zeros(len(label_paths), dtype=np.int64)
    for row, path in enumerate(label_paths):
        train_ids = to_train_ids[read_label_ids(path)]
        counts[row] = np.bincount(train_ids.ravel(), minlength=LUT_SIZE)[:num_classes]
        pixels[row] = train_ids.size
    return counts, pixels


def class_frequencies(counts):
    """``f_c``: class pixels over all labelled (non-ignore) pixels, float64 [K]."""
    totals = counts.sum(0).astype(np.float64)
    return totals / max(totals.sum(), 1.0)


def class_probabilities(frequencies, temperature, available):
    """``softmax((1 - f) / T)`` over the ``available`` classes, 0 elsewhere (float64 [K])."""
    logits = np.where(available, (1.0 - frequencies) / temperature, -np.inf)
    logits = logits - logits[available].max()
    weights = np.exp(logits)
    return weights / weights.sum()


def _files_digest(label_paths, num_classes):
    digest = hashlib.sha256(f"{num_classes}\n".encode())
    for path in label_paths:
        digest.update(f"{Path(path).name}\t{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def _read_cache(path, digest):
    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if stored.get("format") != STATS_FORMAT or stored.get("files_digest") != digest:
        return None
    return np.asarray(stored["pixel_counts"], dtype=np.int64), np.asarray(stored["pixels"], dtype=np.int64)


def _writable(folder):
    return Path(folder).is_dir() and os.access(folder, os.W_OK)


def cached_class_pixels(dataset, num_classes, fallback_dir, log=print):
    """(counts [N, K], pixels [N]) of the dataset's label files: from a valid cache beside the dataset
    or in ``fallback_dir``, else counted once and cached (beside the dataset when writable)."""
    if not dataset.labeled:
        raise DatasetError(f"--rare-class-sampling needs a labelled source dataset; {dataset.root} has no labels")
    filename = f"rcs_class_stats_{getattr(dataset, 'split', None) or 'all'}.json"
    candidates = [Path(dataset.root) / filename, Path(fallback_dir) / filename]
    digest = _files_digest(dataset.label_paths, num_classes)
    for path in candidates:
        cached = _read_cache(path, digest)
        if cached is not None:
            log(f"[rcs] class statistics from {path}")
            return cached
    log(f"[rcs] counting the class pixels of {len(dataset.label_paths)} source labels (once; cached)")
    counts, pixels = count_class_pixels(dataset.label_paths, num_classes)
    if is_main_process():
        path = candidates[0] if _writable(dataset.root) else candidates[1]
        record = {"format": STATS_FORMAT, "files_digest": digest, "num_classes": num_classes,
                  "names": [Path(p).name for p in dataset.label_paths],
                  "pixel_counts": counts.tolist(), "pixels": pixels.tolist()}
        try:
            write_json(path, record)
        except OSError as error:  # a read-only place after all: the statistics still serve this run
            if path == candidates[1]:
                raise
            path = candidates[1]
            log(f"[rcs] cannot write beside the dataset ({error}); caching in the run folder")
            write_json(path, record)
        log(f"[rcs] class statistics cached in {path}")
    return counts, pixels


class RareClassSampler(EpochSampler):
    """``EpochSampler`` whose epoch order is drawn by rare-class sampling (see the module docstring)."""

    def __init__(self, counts, pixels, temperature, batch_size, seed=0, rank=None, world_size=None):
        super().__init__(len(counts), batch_size, seed=seed, shuffle=True, rank=rank, world_size=world_size)
        self.temperature = temperature
        self.frequencies = class_frequencies(counts)
        holds = (counts > 0) & (counts >= MIN_PIXEL_SHARE * pixels[:, None])        # [N, K]
        available = holds.any(0)
        if not available.any():
            raise DatasetError("--rare-class-sampling: no source label holds any class")
        self.probabilities = torch.from_numpy(class_probabilities(self.frequencies, temperature, available))
        # Images holding each class, class after class: class c's are images[offsets[c]:offsets[c] + sizes[c]].
        class_index, image_index = np.nonzero(holds.T)
        self.images = torch.from_numpy(image_index)
        self.sizes = torch.from_numpy(holds.sum(0))
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes

    def _epoch_order(self):
        generator = self.epoch_generator()
        draws = self.dataset_length  # at least the samples an epoch uses
        classes = torch.multinomial(self.probabilities, draws, replacement=True, generator=generator)
        within = (torch.rand(draws, generator=generator, dtype=torch.float64) * self.sizes[classes]).long()
        within = torch.minimum(within, self.sizes[classes] - 1)
        return self.images[self.offsets[classes] + within]


def rare_class_sampler(args, dataset, fallback_dir):
    """The source stream's sampler for ``--rare-class-sampling T`` (None when the flag is off)."""
    if args.rare_class_sampling is None:
        return None
    counts, pixels = cached_class_pixels(dataset, args.num_classes, fallback_dir)
    return RareClassSampler(counts, pixels, args.rare_class_sampling, args.batch_size, seed=args.seed)
