"""dataset/normalization.py against published constants, typed here rather than read from the code.

* ImageNet (this project's convention, what torchvision's pretrained ResNets expect): RGB in [0, 1],
  mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225): the constants of torchvision's
  ``IMAGENET1K_V1`` weights, also checked through torchvision's own transform below.
* The course convention (what the course repository's checkpoints expect): BGR order, values kept in
  0..255, a per-channel mean subtracted, no division by a std. Its means, per its arguments file (as
  quoted in dataset/normalization.py): 128 for GTA5, and for Cityscapes the BGR mean
  (73.15835921, 82.90891754, 72.39239876) that public Cityscapes loaders document as
  "bgr_mean" (e.g. in their dataset docstrings); the code keeps it to two decimals.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models import ResNet18_Weights

from dataset.normalization import get_normalization

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
COURSE_CITYSCAPES_BGR_MEAN = (73.15835921, 82.90891754, 72.39239876)  # B, G, R
COURSE_GTA5_MEAN = 128.0
COURSE_ROUNDING = 0.005  # two decimals

PIXEL_RGB = (200, 100, 50)


def _image(rgb=PIXEL_RGB, size=(2, 3)):
    return np.full((*size, 3), rgb, np.uint8)


def test_torchvision_weights_use_the_published_imagenet_constants():
    transform = ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert tuple(transform.mean) == IMAGENET_MEAN and tuple(transform.std) == IMAGENET_STD


def test_imagenet_normalization_is_rgb_scaled_then_standardised():
    out = get_normalization("imagenet", "cityscapes")(_image())
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    expected = [(value / 255 - mean) / std for value, mean, std in zip(PIXEL_RGB, IMAGENET_MEAN, IMAGENET_STD)]
    # red: (200/255 - 0.485) / 0.229 = 1.3070; green: (100/255 - 0.456) / 0.224 = -0.2850;
    # blue: (50/255 - 0.406) / 0.225 = -0.9330
    assert expected == pytest.approx([1.3070, -0.2850, -0.9330], abs=1e-4)
    assert out[:, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)
    # The same as torchvision's to_tensor + normalize on a random image, and the same for both domains.
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    reference = TF.normalize(TF.to_tensor(Image.fromarray(image)), IMAGENET_MEAN, IMAGENET_STD)
    for domain in ("cityscapes", "gta5"):
        torch.testing.assert_close(get_normalization("imagenet", domain)(image), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("domain, bgr_mean", [("cityscapes", COURSE_CITYSCAPES_BGR_MEAN),
                                              ("gta5", (COURSE_GTA5_MEAN,) * 3)])
def test_course_normalization_is_bgr_minus_the_mean_without_std(domain, bgr_mean):
    out = get_normalization("course", domain)(_image())
    red, green, blue = PIXEL_RGB
    expected = [blue - bgr_mean[0], green - bgr_mean[1], red - bgr_mean[2]]  # channel 0 is blue
    assert out[:, 1, 2].tolist() == pytest.approx(expected, abs=COURSE_ROUNDING)
    # No std: a step of one grey level is a step of exactly 1 in every channel.
    brighter = get_normalization("course", domain)(_image(tuple(value + 1 for value in PIXEL_RGB)))
    assert torch.allclose(brighter - out, torch.ones_like(out), atol=1e-4)


@pytest.mark.parametrize("convention", ["imagenet", "course"])
@pytest.mark.parametrize("domain", ["cityscapes", "gta5"])
def test_denormalize_gives_back_the_rgb_image(convention, domain):
    image = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    normalization = get_normalization(convention, domain)
    assert np.array_equal(normalization.denormalize(normalization(image)), image)
