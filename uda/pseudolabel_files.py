"""The files of a pseudo-label folder: label PNGs written on a few threads, the identity that lets
a run resume only for the same job, the folder's preparation, and the JSON/Markdown reports.

The method itself (two passes, thresholds) is ``uda.pseudolabels``; see its docstring for the
folder's layout and why everything written is a pure function of (model, data, settings).
"""
import hashlib
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from dataset.labels import CLASS_NAMES, NUM_CLASSES, flat_palette
from dataset.paths import PSEUDO_COLOR_DIR, PSEUDO_LABEL_SUFFIX, THRESHOLDS_FILE, pseudo_color_path, pseudo_label_path
from uda.pseudolabel_stats import HISTOGRAM_FORMAT
from utils.checkpoint import CheckpointError, load_checkpoint_file
from utils.files import atomic_write
from utils.errors import UserError

# Files of a pseudo-label folder besides the labels (the loader's names are in dataset.paths).
QUALITY_FILE = "quality.json"
COMPLETE_FILE = "complete.json"
HISTOGRAM_FILE = ".histogram.pt"
TEMP_PATTERN = ".*.tmp"  # what utils.files.atomic_write leaves behind if killed mid-write
STATE_FORMAT = "uda-bisenet/pseudo-labels/1"
DEFAULT_WRITER_THREADS = 2  # PNG encoding releases the GIL: overlap it with inference
PENDING_WRITES_PER_THREAD = 4  # bounds the labels waiting in memory to be written


class PseudoLabelError(UserError, ValueError):
    """An output folder or input that cannot be used as asked; the message names the file."""


def class_names(num_classes=NUM_CLASSES):
    return CLASS_NAMES if num_classes == NUM_CLASSES else tuple(f"class_{c}" for c in range(num_classes))


def write_label_files(output_dir, name, labels):
    """One image's pseudo label (uint8 HxW trainIds): colour copy, then the label, each atomically.

    The label goes last, so its presence means both files are whole. PNG encoding is
    deterministic (no time stamps), which makes resumed folders byte-identical.
    """
    color = Image.fromarray(labels)
    color.putpalette(flat_palette())  # mode "P": the trainIds with the Cityscapes palette
    atomic_write(pseudo_color_path(output_dir, name), lambda handle: color.save(handle, format="PNG"))
    label = Image.fromarray(labels)  # mode "L"
    atomic_write(pseudo_label_path(output_dir, name), lambda handle: label.save(handle, format="PNG"))


class LabelWriter:
    """Writes label files on a few threads with a bounded queue; errors surface in the caller."""

    def __init__(self, threads=DEFAULT_WRITER_THREADS):
        self.executor = ThreadPoolExecutor(threads) if threads > 0 else None
        self.max_pending = max(1, threads) * PENDING_WRITES_PER_THREAD
        self.pending = deque()

    def submit(self, output_dir, name, labels):
        if self.executor is None:
            write_label_files(output_dir, name, labels)
            return
        self.pending.append(self.executor.submit(write_label_files, output_dir, name, labels))
        while len(self.pending) > self.max_pending:
            self.pending.popleft().result()

    def drain(self):
        while self.pending:
            self.pending.popleft().result()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if kind is None:
                self.drain()
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True, cancel_futures=True)


def state_dict_sha256(model):
    """Hash of a network's weights and buffers (names, dtypes, shapes, bytes), device-independent."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_sha256(paths):
    """Hash of the names, sizes and modification times of files: notices data regenerated in place."""
    digest = hashlib.sha256()
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prediction_identity(model, dataset, precision=None, scales=(1.0,), flip=False, num_classes=NUM_CLASSES):
    """Everything pass 1's result depends on, as plain JSON values (checked before reusing it)."""
    root = getattr(dataset, "root", None)
    label_paths = [path for path in getattr(dataset, "label_paths", []) if path is not None]
    normalization = getattr(dataset, "normalization", None)
    return {
        "model_sha256": state_dict_sha256(model),
        "num_classes": int(num_classes),
        "dataset": type(dataset).__name__,
        "root": str(Path(root).resolve()) if root is not None else None,
        "split": getattr(dataset, "split", None),
        "images": len(dataset),
        "names_sha256": hashlib.sha256("\n".join(dataset.names).encode()).hexdigest(),
        "files_sha256": files_sha256([*dataset.image_paths, *label_paths]),
        "transform": repr(getattr(dataset, "transform", None)),
        "normalization": getattr(normalization, "name", repr(normalization)),
        "precision": precision.mode if precision is not None else "off",
        "scales": [float(scale) for scale in scales],
        "flip": bool(flip),
        "histogram_format": HISTOGRAM_FORMAT,
    }


def output_files(output_dir):
    """Every file a run may have left in ``output_dir`` (labels, colours, JSON, state, temporaries)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    named = [output_dir / name for name in (COMPLETE_FILE, QUALITY_FILE, THRESHOLDS_FILE, HISTOGRAM_FILE)]
    files = [path for path in named if path.is_file()]
    files += sorted(output_dir.rglob(f"*{PSEUDO_LABEL_SUFFIX}"))
    files += sorted((output_dir / PSEUDO_COLOR_DIR).rglob("*_color.png"))
    return files + sorted(output_dir.rglob(TEMP_PATTERN))


def _remove(paths):
    for path in paths:
        path.unlink(missing_ok=True)
    return len(paths)


def load_pass_one(output_dir, identity):
    """The saved pass-1 state if it exists, raising if it belongs to another model or dataset."""
    path = Path(output_dir) / HISTOGRAM_FILE
    if not path.is_file():
        return None
    try:
        state = load_checkpoint_file(path)
    except CheckpointError as error:
        raise PseudoLabelError(f"cannot resume from {path}: {error}; rerun without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PseudoLabelError(f"{path} is not a pass-1 state of format {STATE_FORMAT!r}; rerun without --resume")
    stored = state.get("identity", {})
    differing = sorted(key for key in set(stored) | set(identity) if stored.get(key) != identity.get(key))
    if differing:
        details = "; ".join(f"{key}: {stored.get(key)!r} there, {identity.get(key)!r} now" for key in differing)
        raise PseudoLabelError(f"cannot resume: {path} was computed for another model, dataset or setting "
                               f"({details}); rerun without --resume to start over")
    return state


def check_settings(output_dir, settings):
    """Refuse to resume pass 2 with other thresholding settings than the labels already written."""
    path = Path(output_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PseudoLabelError(f"cannot read {path} to resume: {error}; rerun without --resume") from None
    differing = {key: written.get(key) for key, value in settings.items() if written.get(key) != value}
    if differing:
        raise PseudoLabelError(f"cannot resume: the labels in {path.parent} were made with {differing} "
                               f"(now {settings}); rerun without --resume to start over")


def prepare_output_dir(output_dir, identity, settings, resume=False, log=print):
    """Make the folder ready (rank 0): the reusable pass-1 state, or None after clearing old output.

    ``resume`` keeps pass 1's state and the labels already written when they belong to this job;
    otherwise (or when there is nothing to resume) every file of a previous run is deleted.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise PseudoLabelError(f"output folder {output_dir} exists and is not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_pass_one(output_dir, identity)
        if state is not None:
            check_settings(output_dir, settings)
            _remove([output_dir / COMPLETE_FILE, output_dir / QUALITY_FILE, *output_dir.rglob(TEMP_PATTERN)])
            log(f"[pseudo] resuming in {output_dir}: pass 1 reused from {HISTOGRAM_FILE}")
            return state
        log(f"[pseudo] nothing to resume in {output_dir} (no {HISTOGRAM_FILE}): starting from scratch")
    removed = _remove(output_files(output_dir))
    if removed:
        log(f"[pseudo] removed {removed} files of a previous run from {output_dir}")
    return None


def _number(value):
    """JSON-safe float (None for NaN)."""
    value = float(value)
    return None if value != value else value


def thresholds_report(histogram, settings, identity=None, metadata=None):
    """thresholds.json: per class threshold, median, pixel count, kept fraction (pass 1 only)."""
    per_image = settings["mode"] == "per-image"
    pixels = histogram.pixel_counts().cpu()
    medians = histogram.medians().cpu()
    thresholds = histogram.thresholds(settings["max_threshold"]).cpu()
    kept = histogram.kept_counts(thresholds).cpu()
    fraction = kept.double() / pixels.double()
    names = class_names(histogram.num_classes)
    threshold_key = "dataset_threshold" if per_image else "threshold"
    classes = {
        name: {"train_id": c, "pixels": int(n), "median": _number(m), threshold_key: float(t),
               "kept_pixels": None if per_image else int(k), "kept_fraction": None if per_image else _number(f)}
        for c, (name, n, m, t, k, f) in enumerate(zip(names, pixels.tolist(), medians.tolist(), thresholds.tolist(),
                                                      kept.tolist(), fraction.tolist()))}
    return {
        "format": STATE_FORMAT, **settings,
        "thresholds": None if per_image else [float(t) for t in thresholds.tolist()],
        "pixels": int(pixels.sum()),
        "never_predicted": [name for name, n in zip(names, pixels.tolist()) if n == 0],
        "classes": classes,
        "source": metadata or {},
        "identity": identity or {},
    }


def quality_report(histogram, label_stats, raw_confusion=None, settings=None):
    """quality.json: kept pixels per class on the written labels and, with ground truth, accuracy.

    ``accuracy_all``: share of the pixels predicted as ``c`` (with a ground-truth label) that are
    ``c``; ``accuracy_kept``: the same over the pixels the thresholds kept. Both come from
    confusion matrices (rows truth, columns prediction) built with bincount.
    """
    names = class_names(histogram.num_classes)
    pixels = histogram.pixel_counts().cpu().double()
    kept = label_stats.kept.cpu().double()
    columns = {"pixels": pixels.long().tolist(), "kept_pixels": kept.long().tolist(),
               "kept_fraction": (kept / pixels).tolist()}
    overall = {"pixels": int(pixels.sum()), "kept_pixels": int(kept.sum()),
               "kept_fraction": _number(kept.sum() / pixels.sum())}
    if label_stats.confusion is not None and raw_confusion is not None:
        raw = raw_confusion.cpu().double()
        pseudo = label_stats.confusion.matrix.cpu().double()
        columns.update({"labeled_pixels": raw.sum(0).long().tolist(),
                        "accuracy_all": (raw.diag() / raw.sum(0)).tolist(),
                        "labeled_kept_pixels": pseudo.sum(0).long().tolist(),
                        "accuracy_kept": (pseudo.diag() / pseudo.sum(0)).tolist()})
        overall.update({"labeled_pixels": int(raw.sum()), "accuracy_all": _number(raw.diag().sum() / raw.sum()),
                        "labeled_kept_pixels": int(pseudo.sum()),
                        "accuracy_kept": _number(pseudo.diag().sum() / pseudo.sum())})
    classes = {name: {key: (_number(values[c]) if isinstance(values[c], float) else values[c])
                      for key, values in columns.items()}
               for c, name in enumerate(names)}
    return {"format": STATE_FORMAT, **(settings or {}), "images": label_stats.images,
            "ground_truth": label_stats.confusion is not None, "overall": overall, "classes": classes}


def format_report(thresholds, quality):
    """Console table: per class threshold, pixels, kept share and (with ground truth) accuracies."""
    def percent(value):
        return "   n/a" if value is None else f"{100 * value:6.1f}"

    gt = quality["ground_truth"]
    per_image = thresholds["mode"] == "per-image"
    width = max(len(name) for name in thresholds["classes"])
    header = f"{'class':<{width}}  {'thresh':>7}  {'pixels':>11}  {'kept%':>6}"
    header += f"  {'acc%':>6}  {'kept acc%':>9}" if gt else ""
    lines = [header + ("   (threshold: dataset-wide, for comparison)" if per_image else "")]
    rows = [("overall", None, quality["overall"])] + [
        (name, thresholds["classes"][name], quality["classes"][name]) for name in thresholds["classes"]]
    for name, entry, row in rows:
        threshold = "" if entry is None else f"{entry['dataset_threshold' if per_image else 'threshold']:.4f}"
        line = f"{name:<{width}}  {threshold:>7}  {row['pixels']:>11}  {percent(row['kept_fraction'])}"
        if gt:
            line += f"  {percent(row['accuracy_all'])}  {percent(row['accuracy_kept']):>9}"
        lines.append(line)
    if gt:
        lines.append("acc%: accuracy of all pixels predicted as the class; kept acc%: of the pixels kept "
                     "(against the ground truth)")
    return "\n".join(lines)
