"""Pseudo labels for the unlabeled target set: two passes over the data, memory independent of N.

The method (BDL, as the report defines it): every pixel of every target image gets
``pred = argmax softmax`` and ``conf = max softmax``; class ``c``'s threshold is the median of
``conf`` over all pixels of the whole set predicted as ``c``, capped at ``MAX_THRESHOLD`` (0 for a
class never predicted); a pixel below its class threshold becomes ``IGNORE_INDEX``.

* Pass 1 (``collect_statistics``) predicts every image and adds it to a per-class histogram of
  float16 confidences (``uda.pseudolabel_stats``): exact ``np.median`` in a fixed 2.3 MB table,
  whatever the number of images. With ground truth (the synthetic benchmark's hidden target
  labels) it also fills the confusion matrix of the raw predictions.
* Pass 2 (``write_pseudo_labels``) predicts again and writes, per image, a trainId PNG (mode "L",
  255 = ignore) at the image's full resolution where ``dataset.paths.pseudo_label_path`` says
  (what ``CityscapesDataset(pseudo_label_dir=...)`` reads) and a palette-coloured copy at
  ``pseudo_color_path``. Predicting twice costs a second forward pass but nothing grows with N.

``per_image=True`` is the variant seen in course code: thresholds from each image alone (same
median/cap/zero rule). It still runs pass 1, for the dataset-wide pixel counts (and, for
comparison, the dataset-wide thresholds) reported next to it.

Images are inferred at the dataset's transform size and the logits upsampled bilinearly to the
image's full size (read from the file header) before the softmax, as ``engine.evaluate`` does;
optional test-time augmentation averages the softmax over ``scales`` x (flip) views.

The output folder, written atomically file by file (``utils.files.atomic_write``):

* ``.histogram.pt``: pass 1's state, with an identity of the model and data (weights hash, image
  list, transform, precision, TTA) so that ``resume=True`` reuses it only for the same job;
* ``thresholds.json``: after pass 1, before any label; per class threshold, median, pixel count,
  kept fraction;
* the label and colour PNGs (pass 2; with ``resume=True`` images whose two files exist are not
  written again);
* ``quality.json``: kept pixels per class measured on the written labels and, with ground truth,
  the accuracy of the raw predictions and of the kept pixels;
* ``complete.json``: written last; its presence means the folder is whole.

Everything written is a pure function of (model, data, settings): no time stamps, no paths of the
output folder, deterministic PNG encoding and cuDNN in deterministic mode, so an interrupted and
resumed run leaves a folder byte-identical to an uninterrupted one. A run without ``resume`` first
deletes every file of a previous run in the folder, so stale labels can never be mixed in.

Under torchrun each rank predicts its shard (``engine.data.ShardedEvalSampler``), the histograms and
confusion matrices are summed over ranks, every rank writes its own images and rank 0 writes the
JSON files.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset.common import read_label_ids
from dataset.labels import IGNORE_INDEX, LUT_SIZE, NUM_CLASSES
from dataset.paths import THRESHOLDS_FILE, pseudo_color_path, pseudo_label_path
from utils.checkpoint import atomic_torch_save
from engine.data import ShardedEvalSampler
from utils.distributed import barrier, broadcast_object, is_distributed, is_main_process
from engine.evaluate import eval_mode, predict_logits
from utils.logger import write_json
from engine.metrics import ConfusionMatrix
from uda.pseudolabel_files import (COMPLETE_FILE, DEFAULT_WRITER_THREADS, HISTOGRAM_FILE, QUALITY_FILE, STATE_FORMAT,
                                   LabelWriter, PseudoLabelError, prediction_identity, prepare_output_dir,
                                   quality_report, thresholds_report)
from uda.pseudolabel_stats import (MAX_THRESHOLD, ConfidenceHistogram, apply_thresholds,
                                     per_image_thresholds)

MODES = ("dataset", "per-image")


def image_size(path):
    """(height, width) of an image file, from its header only (PIL opens lazily)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError as error:
        raise PseudoLabelError(f"cannot read the size of image {path}: {error}") from error
    return height, width


# ---------------------------------------------------------------------------------- data loading
class PredictionSamples(Dataset):
    """A dataset's samples plus ``full_size`` (H, W of the image file), for full-resolution labels.

    For the indices in ``stored`` the pseudo label already written to ``stored_dir`` is attached as
    ``stored`` (uint8 HxW), so a resumed pass 2 can score it without predicting it again.
    """

    def __init__(self, dataset, stored_dir=None, stored=()):
        self.dataset = dataset
        self.stored_dir = stored_dir
        self.stored = frozenset(stored)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        own = sample["index"]  # the dataset's own index (it differs if a bad sample was skipped)
        sample["full_size"] = image_size(self.dataset.image_paths[own])
        if own in self.stored:
            path = pseudo_label_path(self.stored_dir, sample["name"])
            stored = read_label_ids(path)
            if stored.shape != sample["full_size"]:
                raise PseudoLabelError(f"pseudo label {path} is {stored.shape} but its image is "
                                       f"{sample['full_size']} (HxW); rerun without resume")
            sample["stored"] = torch.from_numpy(stored.copy())  # PIL's buffer is read-only
        return sample


def collate_samples(samples):
    """Stack the (equally resized) images; keep full-resolution labels as lists, sizes may differ."""
    shapes = {tuple(sample["image"].shape) for sample in samples}
    if len(shapes) > 1:
        raise PseudoLabelError(f"images {[s['name'] for s in samples]} differ in size at inference {sorted(shapes)}: "
                               f"give the dataset a resize (an eval size) or use batch size 1")
    batch = {"image": torch.stack([s["image"] for s in samples]), "name": [s["name"] for s in samples],
             "index": [s["index"] for s in samples], "full_size": [s["full_size"] for s in samples]}
    for key in ("label", "stored"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch


def shard_batches(length, batch_size):
    """This rank's batches (lists of dataset indices), in order; the same in both passes."""
    indices = ShardedEvalSampler(length).indices
    return [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]


def prediction_loader(dataset, batches, num_workers=0, pin_memory=False):
    """DataLoader over ``PredictionSamples(dataset)`` (or a ready one) with fixed ``batches``."""
    if not isinstance(dataset, PredictionSamples):
        dataset = PredictionSamples(dataset)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate_samples)


# ------------------------------------------------------------------------------------ prediction
def predict_probabilities(model, images, output_size, precision=None, scales=(1.0,), flip=False):
    """Mean softmax over the test-time views, at ``output_size``: float32 [B, C, H, W].

    A view rescales the (already normalised) input by ``scale`` and optionally flips it; its
    logits are upsampled bilinearly to ``output_size`` (``predict_logits``), flipped back and
    softmaxed in float32. With one view this is ``softmax(upsampled logits)``, the evaluation
    protocol, and ``probs.max(1)`` is ``pseudolabel_stats.softmax_confidence`` of those logits.
    """
    height, width = images.shape[-2:]
    total, views = None, 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(images, size=size, mode="bilinear",
                                                                      align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits = predict_logits(model, scaled.flip(-1) if flipped else scaled, output_size, precision)
            probs = (logits.flip(-1) if flipped else logits).softmax(dim=1)
            total = probs if total is None else total.add_(probs)
            views += 1
    return total if views == 1 else total.div_(views)


@dataclass
class Prediction:
    """Predictions for images of one full size: ``pred`` int64 and ``conf`` float32 [B, H, W]."""
    names: list
    indices: list
    pred: torch.Tensor
    conf: torch.Tensor
    label: torch.Tensor = None  # ground-truth trainIds [B, H, W] when the dataset is labeled


def predict_batch(model, batch, device, precision=None, scales=(1.0,), flip=False, num_classes=None):
    """Yield a ``Prediction`` per group of equally sized images of a collated batch.

    ``num_classes``, when given, is checked against the model's output channels.
    """
    images = batch["image"].to(device, non_blocking=True)
    groups = {}
    for position, size in enumerate(batch["full_size"]):
        groups.setdefault(tuple(size), []).append(position)
    for size, positions in groups.items():
        group = images if len(positions) == len(images) else images[positions]
        probs = predict_probabilities(model, group, size, precision, scales, flip)
        if num_classes is not None and probs.shape[1] != num_classes:
            raise PseudoLabelError(f"the model predicts {probs.shape[1]} classes, expected {num_classes}")
        conf, pred = probs.max(dim=1)
        label = None
        if "label" in batch:
            label = torch.stack([batch["label"][p] for p in positions]).to(device, non_blocking=True)
        yield Prediction([batch["name"][p] for p in positions], [batch["index"][p] for p in positions],
                         pred, conf, label)


def _progress(loader, progress, description):
    return tqdm(loader, desc=description, disable=not (progress and is_main_process()), leave=False)


@torch.no_grad()
def predict_confidences(model, loader, device, precision=None, scales=(1.0,), flip=False, progress=False,
                        description="predict", num_classes=None):
    """Generator of ``Prediction``s (names, indices, pred, conf, label) over a ``prediction_loader``.

    Eval mode, no gradients, cuDNN deterministic: the same image gives the same bits every pass.
    """
    with eval_mode(model), deterministic_cudnn():
        for batch in _progress(loader, progress, description):
            yield from predict_batch(model, batch, device, precision, scales, flip, num_classes)


def deterministic_cudnn():
    """cuDNN in deterministic mode, no autotuning (restored afterwards); harmless on the CPU."""
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True)


def threshold_predictions(pred, conf, thresholds=None, num_classes=NUM_CLASSES, max_threshold=MAX_THRESHOLD):
    """uint8 pseudo labels [B, H, W]: dataset-wide ``thresholds`` [C], or per image when None."""
    if thresholds is not None:
        return apply_thresholds(pred, conf, thresholds)
    per_image = per_image_thresholds(pred, conf, num_classes, max_threshold)
    return torch.stack([apply_thresholds(p, c, t) for p, c, t in zip(pred, conf, per_image)])


# ---------------------------------------------------------------------------------------- pass 1
@dataclass
class PassOneStats:
    histogram: ConfidenceHistogram
    confusion: ConfusionMatrix = None  # ground truth x raw prediction, when the dataset is labeled
    images: int = 0


def _all_reduce_count(value, device):
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return int(tensor.item())


def collect_statistics(model, loader, device, num_classes=NUM_CLASSES, ground_truth=False, precision=None,
                       scales=(1.0,), flip=False, progress=False):
    """Pass 1: confidence histogram (and raw-prediction confusion) over all ranks' images."""
    stats = PassOneStats(ConfidenceHistogram(num_classes, device=device),
                         ConfusionMatrix(num_classes, device=device) if ground_truth else None)
    for prediction in predict_confidences(model, loader, device, precision, scales, flip, progress,
                                          "pseudo labels, pass 1/2 (statistics)", num_classes):
        stats.histogram.update(prediction.pred, prediction.conf)
        if stats.confusion is not None:
            stats.confusion.update(prediction.label, prediction.pred)
        stats.images += len(prediction.names)
    stats.histogram.all_reduce_()
    if stats.confusion is not None:
        stats.confusion.all_reduce_()
    stats.images = _all_reduce_count(stats.images, device)
    return stats


# ---------------------------------------------------------------------------------------- pass 2


class LabelStats:
    """What pass 2 measures on the labels it writes (or finds): kept pixels, confusion with truth."""

    def __init__(self, num_classes=NUM_CLASSES, device="cpu", ground_truth=False):
        self.num_classes = num_classes
        self.kept = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.confusion = ConfusionMatrix(num_classes, device=device) if ground_truth else None
        self.images = 0

    def update(self, labels, truth=None):
        """``labels`` uint8 pseudo labels and ``truth`` trainIds, same shape (any leading dims)."""
        labels = labels.to(self.kept.device).to(torch.int64)
        self.kept += torch.bincount(labels.reshape(-1), minlength=LUT_SIZE)[:self.num_classes]
        if self.confusion is not None:
            # Score kept pixels only: ignored ones get an ignored truth, which ConfusionMatrix skips.
            truth = truth.to(labels.device)
            self.confusion.update(torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, truth), labels)
        self.images += labels.shape[0] if labels.dim() == 3 else 1

    def all_reduce_(self):
        if is_distributed():
            dist.all_reduce(self.kept)
        if self.confusion is not None:
            self.confusion.all_reduce_()
        self.images = _all_reduce_count(self.images, self.kept.device)
        return self


@torch.no_grad()
def write_pseudo_labels(model, loader, output_dir, device, thresholds=None, num_classes=NUM_CLASSES,
                        max_threshold=MAX_THRESHOLD, ground_truth=False, precision=None, scales=(1.0,), flip=False,
                        progress=False, writer_threads=DEFAULT_WRITER_THREADS, keep_existing=()):
    """Pass 2: predict, threshold (``thresholds`` [C], or per image when None) and write each image.

    Batches carrying ``stored`` labels (a resumed run) are only scored; images whose index is in
    ``keep_existing`` are predicted (they share a batch with missing ones) but not rewritten.
    Returns (``LabelStats`` of this rank, number of images written).
    """
    stats = LabelStats(num_classes, device, ground_truth)
    keep_existing = frozenset(keep_existing)
    written = 0
    with eval_mode(model), deterministic_cudnn(), LabelWriter(writer_threads) as writer:
        for batch in _progress(loader, progress, "pseudo labels, pass 2/2 (writing)"):
            if "stored" in batch:
                for position, stored in enumerate(batch["stored"]):
                    stats.update(stored, batch["label"][position] if ground_truth else None)
                continue
            for prediction in predict_batch(model, batch, device, precision, scales, flip, num_classes):
                labels = threshold_predictions(prediction.pred, prediction.conf, thresholds, num_classes,
                                               max_threshold)
                stats.update(labels, prediction.label)
                for name, index, array in zip(prediction.names, prediction.indices, labels.cpu().numpy()):
                    if index not in keep_existing:
                        writer.submit(output_dir, name, array)
                        written += 1
    return stats, written


# ------------------------------------------------------------------------------- output folder


def _existing_labels(dataset, output_dir, batches):
    """Indices (of this rank's batches) whose label and colour files both exist."""
    return {index for batch in batches for index in batch
            if pseudo_label_path(output_dir, dataset.names[index]).is_file()
            and pseudo_color_path(output_dir, dataset.names[index]).is_file()}


# --------------------------------------------------------------------------------------- reports


# ------------------------------------------------------------------------------------ everything
def generate_pseudo_labels(model, dataset, output_dir, device="cpu", *, num_classes=NUM_CLASSES, per_image=False,
                           max_threshold=MAX_THRESHOLD, precision=None, scales=(1.0,), flip=False, batch_size=1,
                           num_workers=0, resume=False, progress=False, writer_threads=DEFAULT_WRITER_THREADS,
                           metadata=None, log=print):
    """Both passes over ``dataset`` into ``output_dir``; returns {"thresholds", "quality", "written", "reused"}.

    ``dataset``: a ``SegmentationDataset`` (``names``, ``image_paths``, resize-only transform); with
    labels (``dataset.labeled``) the quality against them is measured. ``model`` is moved
    nowhere: put it on ``device`` first. ``metadata`` (plain JSON values, e.g. the checkpoint
    path) is recorded in thresholds.json.
    """
    if not 0.0 <= max_threshold <= 1.0:
        raise ValueError(f"max_threshold must be in [0, 1], got {max_threshold}")
    if not scales or any(scale <= 0 for scale in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    device = torch.device(device)
    output_dir = Path(output_dir)
    say = log if is_main_process() else (lambda message: None)
    settings = {"mode": MODES[1] if per_image else MODES[0], "max_threshold": float(max_threshold)}
    ground_truth = bool(getattr(dataset, "labeled", False))
    identity = prediction_identity(model, dataset, precision, scales, flip, num_classes)
    options = dict(precision=precision, scales=tuple(scales), flip=flip, progress=progress)
    pin_memory = device.type == "cuda"

    state = prepare_output_dir(output_dir, identity, settings, resume, say) if is_main_process() else None
    state = broadcast_object(state)
    barrier()
    batches = shard_batches(len(dataset), batch_size)

    if state is None:
        loader = prediction_loader(dataset, batches, num_workers, pin_memory)
        stats = collect_statistics(model, loader, device, num_classes, ground_truth, **options)
        if stats.images != len(dataset):
            raise PseudoLabelError(f"pass 1 predicted {stats.images} images of {len(dataset)}")
        state = {"format": STATE_FORMAT, "identity": identity, "images": stats.images,
                 "histogram": stats.histogram.state_dict(),
                 "confusion": stats.confusion.matrix.cpu() if stats.confusion is not None else None}
        if is_main_process():
            atomic_torch_save(state, output_dir / HISTOGRAM_FILE)
    histogram = ConfidenceHistogram(num_classes).load_state_dict(state["histogram"])
    thresholds = None if per_image else histogram.thresholds(max_threshold)
    report = thresholds_report(histogram, settings, identity, metadata)
    if report["never_predicted"] and is_main_process():
        warnings.warn(f"pseudo labels: class(es) {', '.join(report['never_predicted'])} never predicted on the "
                      f"{len(dataset)} images: threshold 0, no pixel of them to keep "
                      f"(see {output_dir / THRESHOLDS_FILE})",
                      stacklevel=2)
    if is_main_process():
        write_json(output_dir / THRESHOLDS_FILE, report)
    barrier()

    existing = _existing_labels(dataset, output_dir, batches) if resume else set()
    done = [batch for batch in batches if all(index in existing for index in batch)]
    todo = [batch for batch in batches if not all(index in existing for index in batch)]
    # Finished batches are only loaded to score their stored labels against the ground truth.
    stored = {index for batch in done for index in batch}
    loaded = sorted(todo + (done if ground_truth else []), key=lambda batch: batch[0])
    loader = prediction_loader(PredictionSamples(dataset, output_dir, stored if ground_truth else ()), loaded,
                               num_workers, pin_memory)
    label_stats, written = write_pseudo_labels(model, loader, output_dir, device, thresholds, num_classes,
                                               max_threshold, ground_truth, writer_threads=writer_threads,
                                               keep_existing=existing, **options)
    if not ground_truth:  # finished batches were not loaded: count their labels from the files
        for index in sorted(stored):
            stored_labels = read_label_ids(pseudo_label_path(output_dir, dataset.names[index]))
            label_stats.update(torch.from_numpy(stored_labels.copy()))
    label_stats.all_reduce_()
    written = _all_reduce_count(written, device)
    if thresholds is not None and not torch.equal(label_stats.kept.cpu(), histogram.kept_counts(thresholds).cpu()):
        warnings.warn("pseudo labels: the kept pixels of pass 2 differ from pass 1's histogram; inference "
                      "was not deterministic between the passes (thresholds are still exact for pass 1)",
                      stacklevel=2)
    quality = quality_report(histogram, label_stats, state["confusion"], settings)
    if is_main_process():
        write_json(output_dir / QUALITY_FILE, quality)
        write_json(output_dir / COMPLETE_FILE, {"format": STATE_FORMAT, **settings, "images": len(dataset),
                                                "files": [THRESHOLDS_FILE, QUALITY_FILE]})
        say(f"[pseudo] wrote {written} label files ({len(dataset) - written} kept from before) to {output_dir}")
    barrier()
    return {"thresholds": report, "quality": quality, "written": written, "reused": len(dataset) - written}
