"""Input conventions: how an RGB uint8 image becomes the network's input tensor.

Two conventions exist in the wild for this project's checkpoints:

* ``imagenet`` (this project's own): RGB order, scaled to [0, 1], ImageNet mean/std.
* ``course`` (the old course repository, whose checkpoints need it): BGR order, values kept in
  0..255, a per-channel mean subtracted and no division by std. The mean depends on the domain:
  128 for GTA5 and (73.16, 82.91, 72.39) (BGR) for Cityscapes, as in its arguments file.

Checkpoints record the convention they were trained with, so evaluation can reproduce it.
"""
from dataclasses import dataclass

import numpy as np
import torch

CONVENTIONS = ("imagenet", "course")
DOMAINS = ("gta5", "cityscapes")


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine map applied after optional RGB->BGR reordering, in 0..255 units."""

    name: str
    bgr: bool
    mean: tuple  # in the channel order of the output tensor, 0..255 units
    std: tuple   # idem

    def __call__(self, image):
        """uint8 HxWx3 RGB array (or CxHxW uint8/float tensor in 0..255) -> float32 CxHxW tensor."""
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return self.normalize_tensor(image)

    def normalize_tensor(self, image):
        """Float or uint8 tensor (..., 3, H, W) in RGB 0..255 -> normalized float32 tensor.

        Works on a batch on any device, so augmentation and normalization can run on a GPU.
        """
        image = image.float()
        if self.bgr:
            image = image.flip(-3)
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device).view(3, 1, 1)
        return (image - mean) / std

    def to_pixels(self, tensor):
        """Inverse of ``normalize_tensor``: a normalized (..., 3, H, W) tensor -> float RGB in 0..255
        units (not clamped nor rounded), on the tensor's device; for batch augmentations in pixel space."""
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
        image = tensor * std + mean
        return image.flip(-3) if self.bgr else image

    def denormalize(self, tensor):
        """Inverse of ``__call__`` for one image: CxHxW tensor -> uint8 HxWx3 RGB array."""
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
        image = tensor * std + mean
        if self.bgr:
            image = image.flip(-3)
        return image.clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()


_IMAGENET = Normalization(
    "imagenet", bgr=False,
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255), std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
)
_COURSE = {
    "gta5": Normalization("course-gta5", bgr=True, mean=(128.0, 128.0, 128.0), std=(1.0, 1.0, 1.0)),
    "cityscapes": Normalization("course-cityscapes", bgr=True, mean=(73.16, 82.91, 72.39), std=(1.0, 1.0, 1.0)),
}


def get_normalization(convention="imagenet", domain="cityscapes"):
    """The Normalization for an input convention (``imagenet`` or ``course``) and a data domain."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown input convention {convention!r}; expected one of {CONVENTIONS}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return _IMAGENET if convention == "imagenet" else _COURSE[domain]
