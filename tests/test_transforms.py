"""Paired transforms: hand-checked cases and a property test that image and label stay aligned."""
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dataset.labels import IGNORE_INDEX, NUM_CLASSES
from dataset.normalization import get_normalization
from dataset.transforms import (Compose, RandomCrop, RandomHorizontalFlip, RandomScale, Resize, ToTensorNormalize,
                                eval_transform, train_transform)

LABEL_VALUES = np.array(list(range(NUM_CLASSES)) + [IGNORE_INDEX], dtype=np.uint8)
MARK = 200  # green value of every real (not padded) pixel


def encoded_pair(label):
    """An image whose pixels encode the label: R = label, G = MARK, B = 255 - label."""
    label = np.asarray(label, dtype=np.uint8)
    image = np.stack([label, np.full_like(label, MARK), 255 - label], axis=-1)
    return Image.fromarray(image), Image.fromarray(label)


def random_label(rng, height, width):
    return rng.choice(LABEL_VALUES, size=(height, width))


def arrays(image, label):
    return np.asarray(image), (np.asarray(label) if label is not None else None)


def test_flip_flips_image_and_label():
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image, label_img = encoded_pair(label)
    out_image, out_label = arrays(*RandomHorizontalFlip(p=1.0)(image, label_img))
    np.testing.assert_array_equal(out_label, label[:, ::-1])
    np.testing.assert_array_equal(out_image[..., 0], label[:, ::-1])
    out_image, out_label = arrays(*RandomHorizontalFlip(p=0.0)(image, label_img))
    np.testing.assert_array_equal(out_label, label)
    np.testing.assert_array_equal(out_image[..., 0], label)


def test_crop_pads_label_with_ignore_and_image_with_zero():
    label = np.full((4, 6), 7, dtype=np.uint8)
    image, label_img = encoded_pair(label)
    out_image, out_label = arrays(*RandomCrop((8, 9))(image, label_img))
    assert out_image.shape == (8, 9, 3) and out_label.shape == (8, 9)
    # Padding goes right and bottom; the crop of an 8x9 padded image at 8x9 is the whole of it.
    np.testing.assert_array_equal(out_label[:4, :6], 7)
    np.testing.assert_array_equal(out_image[:4, :6, 1], MARK)
    padded = np.ones((8, 9), dtype=bool)
    padded[:4, :6] = False
    assert (out_label[padded] == IGNORE_INDEX).all()
    assert (out_image[padded] == 0).all()


def test_crop_without_padding_refuses_a_larger_crop():
    image, label = encoded_pair(np.zeros((4, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match="larger than the image"):
        RandomCrop((5, 6), pad_if_needed=False)(image, label)
    out_image, out_label = RandomCrop((4, 6), pad_if_needed=False)(image, label)
    assert out_image.size == out_label.size == (6, 4)


def test_crop_takes_a_window_of_the_input():
    rng = np.random.default_rng(0)
    label = random_label(rng, 10, 12)
    image, label_img = encoded_pair(label)
    out_image, out_label = arrays(*RandomCrop((4, 5), generator=torch.Generator().manual_seed(3))(image, label_img))
    windows = [(t, l) for t in range(7) for l in range(8) if (label[t:t + 4, l:l + 5] == out_label).all()]
    assert windows, "the crop is not a window of the label"
    np.testing.assert_array_equal(out_image[..., 0], out_label)


def test_resize_uses_nearest_for_labels():
    rng = np.random.default_rng(1)
    label = rng.choice(np.array([0, 13, 255], dtype=np.uint8), size=(9, 13))
    image, label_img = encoded_pair(label)
    for size in [(4, 5), (17, 31), (9, 26)]:
        out_image, out_label = arrays(*Resize(size)(image, label_img))
        assert out_image.shape[:2] == out_label.shape == size
        assert set(np.unique(out_label)) <= {0, 13, 255}
    # The image is resampled bilinearly, so it does get new values.
    out_image, _ = arrays(*Resize((17, 31))(image, label_img))
    assert not set(np.unique(out_image[..., 0])) <= {0, 13, 255}


def test_eval_transform_keeps_label_at_full_resolution():
    image, label = encoded_pair(np.zeros((16, 32), dtype=np.uint8))
    out_image, out_label = eval_transform((8, 16))(image, label)
    assert out_image.size == (16, 8) and out_label.size == (32, 16)
    out_image, out_label = eval_transform(None)(image, label)
    assert out_image.size == out_label.size == (32, 16)


def test_unlabeled_samples_pass_through_every_transform():
    image, _ = encoded_pair(np.zeros((16, 32), dtype=np.uint8))
    out_image, out_label = train_transform((8, 8), resize_hw=(12, 24), scale_range=(0.5, 1.5))(image, None)
    assert out_label is None and out_image.size == (8, 8)
    tensor, label = ToTensorNormalize(get_normalization())(out_image, None)
    assert label is None and tensor.shape == (3, 8, 8)


def test_random_scale_stays_in_range():
    image, label = encoded_pair(np.zeros((20, 40), dtype=np.uint8))
    torch.manual_seed(0)
    for _ in range(20):
        out_image, out_label = RandomScale(0.5, 1.5)(image, label)
        assert out_image.size == out_label.size
        assert 10 <= out_image.size[1] <= 30 and 20 <= out_image.size[0] <= 60


def test_mismatched_pair_is_refused():
    image = Image.new("RGB", (8, 4))
    label = Image.new("L", (8, 5))
    with pytest.raises(ValueError, match="sizes differ"):
        RandomCrop((2, 2))(image, label)


def test_randomness_comes_from_torch_not_python_random():
    rng = np.random.default_rng(2)
    image, label = encoded_pair(random_label(rng, 20, 30))
    transform = train_transform((8, 8), scale_range=(0.5, 2.0))
    outputs = []
    for python_seed in (1, 2):
        random.seed(python_seed)
        torch.manual_seed(123)
        outputs.append(arrays(*transform(image, label)))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    # An explicit generator gives the same draws for the same seed, whatever the global state.
    explicit = [arrays(*train_transform((8, 8), scale_range=(0.5, 2.0), generator=torch.Generator().manual_seed(5))(
        image, label)) for _ in range(2)]
    np.testing.assert_array_equal(explicit[0][1], explicit[1][1])


def test_to_tensor_normalize_types():
    image, label = encoded_pair(np.full((3, 5), 7, dtype=np.uint8))
    normalization = get_normalization("imagenet", "cityscapes")
    tensor, label_tensor = ToTensorNormalize(normalization)(image, label)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 3, 5)
    assert label_tensor.dtype == torch.int64 and label_tensor.shape == (3, 5)
    assert (label_tensor == 7).all()
    torch.testing.assert_close(tensor, normalization(np.array(image)))


def test_train_transform_output_size():
    image, label = encoded_pair(np.zeros((16, 32), dtype=np.uint8))
    transform = train_transform((12, 20), resize_hw=(8, 16), scale_range=(0.75, 1.5))
    assert isinstance(transform, Compose)
    for _ in range(5):
        out_image, out_label = transform(image, label)
        assert out_image.size == out_label.size == (20, 12)


@settings(max_examples=50, deadline=None)
@given(
    height=st.integers(1, 40), width=st.integers(1, 40),
    crop_h=st.integers(1, 48), crop_w=st.integers(1, 48),
    min_scale=st.floats(0.25, 2.0), extra_scale=st.floats(0.0, 1.0),
    resize=st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 40))),
    flip=st.booleans(), seed=st.integers(0, 2 ** 31 - 1), nearest_image=st.booleans(), one_class=st.booleans(),
)
def test_transforms_keep_image_and_label_aligned(height, width, crop_h, crop_w, min_scale, extra_scale, resize,
                                                 flip, seed, nearest_image, one_class):
    rng = np.random.default_rng(seed)
    label = np.full((height, width), rng.choice(LABEL_VALUES)) if one_class else random_label(rng, height, width)
    image, label_img = encoded_pair(label)
    interpolation = Image.Resampling.NEAREST if nearest_image else Image.Resampling.BILINEAR
    steps = []
    if resize is not None:
        steps.append(Resize(resize, interpolation=interpolation))
    steps += [RandomScale(min_scale, min_scale + extra_scale, interpolation=interpolation),
              RandomCrop((crop_h, crop_w)), RandomHorizontalFlip(p=1.0 if flip else 0.0)]
    torch.manual_seed(seed)
    out_image, out_label = arrays(*Compose(steps)(image, label_img))

    assert out_label.shape == (crop_h, crop_w) and out_image.shape == (crop_h, crop_w, 3)
    assert set(np.unique(out_label)) <= set(LABEL_VALUES.tolist())
    # Geometry is shared: green is constant before padding, so it marks the real pixels exactly
    # even after bilinear resampling, and padding is 0 in the image and 255 in the label.
    real = out_image[..., 1] == MARK
    assert ((out_image[..., 1] == 0) | real).all()
    assert (out_label[~real] == IGNORE_INDEX).all() and (out_image[~real] == 0).all()
    if nearest_image:
        # Same resampling for both: every real pixel decodes to its label.
        np.testing.assert_array_equal(out_image[..., 0][real], out_label[real])
        np.testing.assert_array_equal(out_image[..., 2][real], 255 - out_label[real])
    elif one_class:
        # Bilinear image of a single class: interpolation cannot change it, so it still decodes.
        np.testing.assert_array_equal(out_image[..., 0][real], out_label[real])
