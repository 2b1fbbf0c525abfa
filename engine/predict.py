"""Inference on a user's own images and videos: find the inputs, batch them, predict, write results.

Images of any size are padded on the right and bottom to a multiple of ``PAD_MULTIPLE`` with
black (as training crops are padded) and the prediction cropped back; or resized to a fixed size
(BILINEAR, as ``eval.py`` resizes) with their logits upsampled to the original size before the
argmax, exactly as ``engine.evaluate`` scores. Consecutive images of one size share a batch, so a
folder of mixed sizes needs no resizing and every image's result is that of its own pixels.
"""
import glob
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.common import DatasetError, DatasetWarning, describe_files, list_entries, read_image
from dataset.labels import colorize, train_ids_to_ids
from dataset.transforms import IMAGE_FILL, eval_transform
from engine.evaluate import predict_logits
from utils.logger import write_png
from dataset.video import VIDEO_SUFFIXES, VideoWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
PAD_MULTIPLE = 32  # BiSeNet's deepest stride: every feature map of a padded image aligns with the input
OUTPUT_KINDS = ("color", "overlay", "labels")
VIDEO_OUTPUT_KINDS = ("color", "overlay")  # label frames as PNGs only when asked for
ID_CHOICES = ("train", "cityscapes")  # trainIds 0..18 (255 ignore) or Cityscapes label ids
GLOB_CHARACTERS = "*?["


def check_output_dir(path):
    """The output folder as a Path; ``DatasetError`` if it is a file (before any work starts)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DatasetError(f"--output-dir {path} is a file; expected a folder (new or existing)")
    return path


def _is_image(path):
    return path.suffix.lower() in IMAGE_SUFFIXES


def _image_list(paths, base, exclude):
    """(path, name) pairs: ``name`` is the path relative to ``base`` without its suffix."""
    exclude = exclude.resolve() if exclude is not None else None
    pairs = []
    for path in sorted(paths):
        if path.is_file() and _is_image(path) and (exclude is None or exclude not in path.resolve().parents):
            pairs.append((path, path.relative_to(base).with_suffix("").as_posix()))
    by_name = {}
    for path, name in pairs:
        by_name.setdefault(name, []).append(path)
    clashes = [paths for paths in by_name.values() if len(paths) > 1]
    if clashes:  # e.g. photo.png and photo.jpg: their results would overwrite each other
        raise DatasetError(f"inputs that differ only in their suffix would write the same result files: "
                           f"{describe_files(clashes[0], 'file')}; rename or move one of them")
    return pairs


def find_inputs(text, exclude=None):
    """``("video", path)`` or ``("images", [(path, name), ...])`` for --input ``text``.

    ``text`` is an image, a video, a folder (searched recursively for images; files under
    ``exclude``, the output folder, are left out) or a glob pattern.
    """
    path = Path(text)
    suffixes = ", ".join(IMAGE_SUFFIXES)
    if path.is_dir():
        images = _image_list(path.rglob("*"), path, exclude)
        if not images:
            raise DatasetError(f"--input {path}: no image files ({suffixes}) in the folder; it holds "
                               f"{list_entries(path)}")
        return "images", images
    if path.is_file():
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return "video", path
        if not _is_image(path):
            raise DatasetError(f"--input {path} is neither an image ({suffixes}) nor a video "
                               f"({', '.join(VIDEO_SUFFIXES)}) by its suffix")
        return "images", [(path, path.stem)]
    if any(character in str(text) for character in GLOB_CHARACTERS):
        paths = (Path(found) for found in glob.glob(str(text), recursive=True))
        images = _image_list(paths, _glob_base(text), exclude)
        if not images:
            raise DatasetError(f"--input {text!r} matches no image files ({suffixes})")
        return "images", images
    raise DatasetError(f"--input {text}: no such file or folder")


def _glob_base(pattern):
    """The folder part of a glob pattern before its first wildcard: output names are relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if any(character in part for character in GLOB_CHARACTERS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def prepare_image(array, size_hw=None):
    """(network input uint8 tensor HxWx3, original uint8 tensor HxWx3) of an RGB array or PIL image.

    With ``size_hw`` the input is resized BILINEAR by PIL, as ``eval.py``'s transform does.
    """
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    original = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    if size_hw is None:
        return original, original
    resized, _ = eval_transform(size_hw)(image)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()), original


class ImageFiles(torch.utils.data.Dataset):
    """Reads the images of ``find_inputs``; an unreadable file gives its error, not an exception,
    so the caller decides between stopping and skipping (DataLoader workers cannot)."""

    def __init__(self, images, size_hw=None):
        self.images = images
        self.size_hw = size_hw

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        path, name = self.images[index]
        try:
            image, original = prepare_image(read_image(path), self.size_hw)
        except DatasetError as error:
            return {"name": name, "path": path, "error": str(error)}
        return {"name": name, "path": path, "image": image, "original": original, "error": None}


def same_size_batches(items, batch_size, skip_bad=False, skipped=None):
    """Lists of up to ``batch_size`` consecutive readable items whose images have one size.

    An unreadable item first lets the batch before it through (so everything read before it is
    written), then raises ``DatasetError`` naming its file, or with ``skip_bad`` is listed in
    ``skipped`` and left out.
    """
    batch = []
    for item in items:
        if item["error"] is not None or (batch and item["image"].shape != batch[0]["image"].shape):
            if batch:
                yield batch
            batch = []
        if item["error"] is not None:
            if not skip_bad:
                raise DatasetError(f"{item['error']} (pass --skip-bad to skip unreadable files)")
            skipped.append(str(item["path"]))
            warnings.warn(f"skipping unreadable input: {item['error']}", DatasetWarning, stacklevel=2)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class Predictor:
    """trainId maps (uint8 HxW arrays, at each image's original size) of a batch of same-size images."""

    def __init__(self, model, normalization, device, precision=None, channels_last=False, pad=True):
        self.model = model
        self.normalization = normalization
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.pad = pad

    @torch.no_grad()
    def __call__(self, images, original_hw):
        """``images``: uint8 tensors HxWx3 of one size; ``original_hw``: the size to predict at."""
        batch = torch.stack(images)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # uint8 (B, 3, H, W)
        height, width = batch.shape[-2:]
        if self.pad:
            padded = (-height % PAD_MULTIPLE, -width % PAD_MULTIPLE)
            batch = F.pad(batch, (0, padded[1], 0, padded[0]), value=IMAGE_FILL)
        batch = self.normalization.normalize_tensor(batch)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        resized = (height, width) != tuple(original_hw)
        logits = predict_logits(self.model, batch, None, self.precision)[..., :height, :width]
        if resized:
            logits = F.interpolate(logits, size=tuple(original_hw), mode="bilinear", align_corners=False)
        return list(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())


def overlay(image, color, alpha):
    """``image`` blended with its colour mask: (1 - alpha) * image + alpha * mask, as uint8."""
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def label_image(train_ids, ids):
    """The label PNG's content: trainIds as predicted, or Cityscapes label ids (``ids``)."""
    return train_ids if ids == "train" else train_ids_to_ids(train_ids)


class ResultWriter:
    """Writes ``<output_dir>/<kind>/<name>.png`` for each kind of ``OUTPUT_KINDS`` asked for."""

    def __init__(self, output_dir, kinds, ids="train", alpha=0.5):
        self.output_dir = Path(output_dir)
        self.kinds = tuple(dict.fromkeys(kinds))  # each once, in the order given
        self.ids = ids
        self.alpha = alpha
        self.written = 0

    def images(self, image, train_ids):
        """{kind: uint8 array} of one prediction (``image``: the original RGB uint8 array)."""
        color = colorize(train_ids)
        made = {"color": lambda: color, "overlay": lambda: overlay(image, color, self.alpha),
                "labels": lambda: label_image(train_ids, self.ids)}
        return {kind: made[kind]() for kind in self.kinds}

    def write(self, name, image, train_ids):
        for kind, array in self.images(image, train_ids).items():
            write_png(self.output_dir / kind / f"{name}.png", array)
        self.written += 1


def skipped_report(skipped):
    return f"{describe_files(skipped, 'unreadable file')} skipped (--skip-bad)" if skipped else None


def _as_is(item):
    return item  # a module-level function: workers started by "spawn" (macOS, Windows) pickle it


def predict_images(predictor, images, writer, batch_size=1, size_hw=None, workers=0, skip_bad=False,
                   progress=True):
    """Predict and write every image of ``find_inputs``; return the counts and the images/s."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(ImageFiles(images, size_hw), batch_size=None, num_workers=workers,
                                         collate_fn=_as_is)
    skipped = []
    start = time.perf_counter()
    with tqdm(total=len(images), desc="predict", unit="img", disable=not progress, leave=False) as bar:
        for batch in same_size_batches(loader, batch_size, skip_bad, skipped):
            predictions = predictor([item["image"] for item in batch], batch[0]["original"].shape[:2])
            for item, train_ids in zip(batch, predictions):
                writer.write(item["name"], item["original"].numpy(), train_ids)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    if not writer.written:
        raise DatasetError(f"none of the {len(images)} input images could be read ({skipped_report(skipped)})")
    return {"images": writer.written, "skipped": skipped, "seconds": seconds,
            "images_per_s": writer.written / seconds if seconds > 0 else None}


def _frame_items(frames, size_hw):
    for frame in frames:
        image, original = prepare_image(frame, size_hw)
        yield {"image": image, "original": original, "error": None}


def video_output_paths(output_dir, stem, kinds):
    """{kind: path} of the MP4s a video gives (colour mask and overlay)."""
    return {kind: Path(output_dir) / f"{stem}_{kind}.mp4" for kind in kinds if kind in VIDEO_OUTPUT_KINDS}


def predict_video(predictor, reader, writer, batch_size=1, size_hw=None, progress=True):
    """Predict every frame of ``reader`` (a ``VideoReader``) into MP4s at its frame rate.

    ``writer``'s colour and overlay kinds become ``<stem>_<kind>.mp4``; its ``labels`` kind, PNGs
    ``labels/<stem>/<frame>.png``. Returns the counts and the frames/s (decoding, inference and
    encoding together). The MP4s appear only once whole.
    """
    from tqdm import tqdm

    stem = reader.path.stem
    videos = {kind: VideoWriter(path, reader.rate, reader.width, reader.height)
              for kind, path in video_output_paths(writer.output_dir, stem, writer.kinds).items()}
    frames = 0
    start = time.perf_counter()
    try:
        with tqdm(total=reader.frame_count, desc="predict", unit="frame", disable=not progress, leave=False) as bar:
            for batch in same_size_batches(_frame_items(reader.frames(), size_hw), batch_size):
                predictions = predictor([item["image"] for item in batch], batch[0]["original"].shape[:2])
                for item, train_ids in zip(batch, predictions):
                    outputs = writer.images(item["original"].numpy(), train_ids)
                    for kind, video in videos.items():
                        video.write(outputs[kind])
                    if "labels" in outputs:
                        write_png(writer.output_dir / "labels" / stem / f"{frames:06d}.png", outputs["labels"])
                    frames += 1
                bar.update(len(batch))
        if frames == 0:
            raise DatasetError(f"video {reader.path} holds no frames")
        for video in videos.values():
            video.close()
    except BaseException:
        for video in videos.values():
            video.abort()
        raise
    seconds = time.perf_counter() - start
    return {"frames": frames, "frame_rate": float(reader.rate), "width": reader.width, "height": reader.height,
            "videos": {kind: str(video.path) for kind, video in videos.items()}, "seconds": seconds,
            "frames_per_s": frames / seconds if seconds > 0 else None}
