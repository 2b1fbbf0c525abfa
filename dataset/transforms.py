"""Paired transforms on ``(image, label)``, in the style of torchvision's references/segmentation.

``image`` is a PIL RGB image and ``label`` a PIL "L" image of trainIds (255 = ignore), or ``None``
for an unlabeled sample; every transform returns the same pair types. Geometry is applied to both
with the same parameters: the image is resampled BILINEAR, the label NEAREST (a label is a class
map, so no new values may appear), and padding fills the image with 0 and the label with 255.

Randomness comes from torch only: an explicit ``torch.Generator`` when one is given, otherwise
torch's global RNG, which ``DataLoader`` workers (and ``engine.data.SeededSamples``) seed. Python's
``random`` is never used. A generator passed here is copied into every DataLoader worker with the
same state, so every worker would draw the same parameters: leave it ``None`` for training.
"""
import numpy as np
import torch
from PIL import Image

from dataset.labels import IGNORE_INDEX

IMAGE_FILL = 0


def _size_hw(size, what="size_hw"):
    """Validate a ``(height, width)`` pair of positive ints."""
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (height, width) pair, got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return height, width


def _check_pair(image, label):
    if label is not None and label.size != image.size:
        raise ValueError(
            f"image and label sizes differ (image {image.size[1]}x{image.size[0]}, label "
            f"{label.size[1]}x{label.size[0]}, HxW); geometric transforms need them aligned"
        )


def _uniform(low, high, generator):
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high, generator):
    """An int in [0, high] inclusive."""
    return int(torch.randint(high + 1, (), generator=generator).item())


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label=None):
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label

    def __repr__(self):
        body = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"{type(self).__name__}([{body}\n])"


class Resize:
    """Resize to a fixed ``(height, width)``; ``resize_label=False`` leaves the label untouched.

    The latter is the evaluation protocol: infer at a reduced size, score at the label's full
    resolution (predictions are upsampled to the label's size).
    """

    def __init__(self, size_hw, resize_label=True, interpolation=Image.Resampling.BILINEAR):
        self.size_hw = _size_hw(size_hw)
        self.resize_label = resize_label
        self.interpolation = interpolation

    def __call__(self, image, label=None):
        height, width = self.size_hw
        if label is not None and self.resize_label:
            _check_pair(image, label)
            label = label.resize((width, height), Image.Resampling.NEAREST)
        return image.resize((width, height), self.interpolation), label

    def __repr__(self):
        return f"{type(self).__name__}(size_hw={self.size_hw}, resize_label={self.resize_label})"


class RandomScale:
    """Scale jitter: resize both by a factor drawn uniformly from ``[min_scale, max_scale]``."""

    def __init__(self, min_scale, max_scale, interpolation=Image.Resampling.BILINEAR, generator=None):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.interpolation = interpolation
        self.generator = generator

    def __call__(self, image, label=None):
        _check_pair(image, label)
        scale = _uniform(self.min_scale, self.max_scale, self.generator)
        width, height = image.size
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, self.interpolation)
        if label is not None:
            label = label.resize(size, Image.Resampling.NEAREST)
        return image, label

    def __repr__(self):
        return f"{type(self).__name__}(min_scale={self.min_scale}, max_scale={self.max_scale})"


def _pad_to(image, height, width, fill):
    """Pad on the right and bottom (torchvision references style) to at least height x width."""
    if image.size[0] >= width and image.size[1] >= height:
        return image
    canvas = Image.new(image.mode, (max(width, image.size[0]), max(height, image.size[1])), fill)
    canvas.paste(image, (0, 0))
    return canvas


class RandomCrop:
    """Crop ``(height, width)`` at a random position, padding first if the image is smaller."""

    def __init__(self, size_hw, pad_if_needed=True, generator=None):
        self.size_hw = _size_hw(size_hw)
        self.pad_if_needed = pad_if_needed
        self.generator = generator

    def __call__(self, image, label=None):
        _check_pair(image, label)
        crop_h, crop_w = self.size_hw
        width, height = image.size
        if crop_h > height or crop_w > width:
            if not self.pad_if_needed:
                raise ValueError(f"crop {crop_h}x{crop_w} is larger than the image {height}x{width} "
                                 f"(HxW) and pad_if_needed=False")
            image = _pad_to(image, crop_h, crop_w, (IMAGE_FILL,) * len(image.getbands()))
            if label is not None:
                label = _pad_to(label, crop_h, crop_w, IGNORE_INDEX)
            width, height = image.size
        top = _randint(height - crop_h, self.generator)
        left = _randint(width - crop_w, self.generator)
        box = (left, top, left + crop_w, top + crop_h)
        return image.crop(box), (label.crop(box) if label is not None else None)

    def __repr__(self):
        return f"{type(self).__name__}(size_hw={self.size_hw}, pad_if_needed={self.pad_if_needed})"


class RandomHorizontalFlip:
    def __init__(self, p=0.5, generator=None):
        self.p = p
        self.generator = generator

    def __call__(self, image, label=None):
        _check_pair(image, label)
        if torch.rand((), generator=self.generator).item() < self.p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if label is not None:
                label = label.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image, label

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


class ToTensorNormalize:
    """PIL pair -> (float32 CxHxW tensor normalized by ``normalization``, int64 HxW label or None)."""

    def __init__(self, normalization):
        self.normalization = normalization

    def __call__(self, image, label=None):
        tensor = self.normalization(np.array(image.convert("RGB"), dtype=np.uint8))
        if label is not None:
            label = torch.from_numpy(np.array(label, dtype=np.int64))
        return tensor, label

    def __repr__(self):
        return f"{type(self).__name__}({getattr(self.normalization, 'name', self.normalization)!r})"


def train_transform(crop_size_hw, resize_hw=None, scale_range=None, flip=True, generator=None):
    """Optional fixed resize, optional scale jitter, random crop (padded with 0/255), random flip.

    ``crop_size_hw=None`` skips the crop (then samples keep their own size). Normalization is not
    part of it: the datasets apply their ``normalization`` last.
    """
    steps = []
    if resize_hw is not None:
        steps.append(Resize(resize_hw))
    if scale_range is not None:
        steps.append(RandomScale(*scale_range, generator=generator))
    if crop_size_hw is not None:
        steps.append(RandomCrop(crop_size_hw, generator=generator))
    if flip:
        steps.append(RandomHorizontalFlip(generator=generator))
    return Compose(steps)


def eval_transform(size_hw=None):
    """Resize the image only, to the inference size; the label stays at full resolution."""
    return Compose([Resize(size_hw, resize_label=False)] if size_hw is not None else [])
