"""The self-training methods of uda/ (DACS, FDA, entropy minimisation, rare-class sampling), each
against an independent reference: hand-built labels and spectra, the papers' formulas, brute force."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dataset.gta5 import GTA5Dataset
from dataset.labels import IGNORE_INDEX, LABELS
from dataset.normalization import Normalization
from uda import rare_class_sampling
from uda.dacs import (DACS, blur_kernel_size, classmix_masks, colour_jitter, confident_share, ema_decay_at, ema_update,
                      gaussian_blur, match_size, weighted_segmentation_loss)
from uda.entropy import entropy_loss, normalized_entropy
from uda.fda import FourierStyleTransfer, low_frequency_window, swap_low_frequency_amplitude
from uda.rare_class_sampling import RareClassSampler, cached_class_pixels, class_probabilities
from engine.precision import Precision
from tests.helpers import host_reads

IDENTITY = Normalization("identity", bgr=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
NUM_CLASSES = 19


def _generator(seed=0):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------- ClassMix
def test_classmix_masks_select_exactly_half_of_the_present_classes():
    labels = torch.full((3, 4, 6), IGNORE_INDEX)
    labels[0, :, :2], labels[0, :, 2:4], labels[0, :, 4:] = 2, 5, 7        # 3 classes -> 2 chosen
    labels[1, :2], labels[1, 2:] = 0, 18                                     # 2 classes -> 1 chosen
    labels[2, 0, 0] = 4                                                      # 1 class (rest ignore) -> 1
    for seed in range(5):
        mask, chosen = classmix_masks(labels, NUM_CLASSES, _generator(seed))
        for image, present in enumerate(({2, 5, 7}, {0, 18}, {4})):
            picked = set(torch.nonzero(chosen[image]).flatten().tolist())
            assert picked <= present and len(picked) == math.ceil(len(present) / 2)
            expected = torch.isin(labels[image], torch.tensor(sorted(picked)))
            assert torch.equal(mask[image], expected)
        assert not mask[labels == IGNORE_INDEX].any()
    drawn = {tuple(torch.nonzero(classmix_masks(labels, NUM_CLASSES, _generator(s))[1][0]).flatten().tolist())
             for s in range(20)}
    assert len(drawn) == 3  # every pair of {2, 5, 7} comes up: the choice is random, not the first classes


class ConstantTeacher(nn.Module):
    """Logits that say class 18 everywhere: confidently on the left half (~1), weakly on the right (~0.13)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        batch, _, height, width = images.shape
        logits = torch.zeros(batch, NUM_CLASSES, height, width)
        logits[:, 18, :, : width // 2] = 30.0
        logits[:, 18, :, width // 2:] = 1.0
        return logits + 0 * self.anchor


def test_mixed_labels_follow_the_pixels_and_weights_are_one_or_the_confident_share():
    # Source 6x8 labels varying by row and column, pixel value = 10 x label + 5; cropped to the
    # target's 4x8, so a crop applied to the image and not the label (or shifted) breaks the match.
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij")
    source_labels = ((rows + cols // 4) % 4).expand(2, 6, 8).clone()
    source_images = (10.0 * source_labels + 5.0)[:, None].expand(2, 3, 6, 8).clone()
    target_images = torch.full((2, 3, 4, 8), 200.0)
    dacs = DACS(ConstantTeacher(), NUM_CLASSES, IDENTITY, IDENTITY, augment=False)
    for seed in range(4):
        images, labels, weights, share = dacs.mixed_batch(source_images, source_labels, target_images,
                                                          _generator(seed), Precision(torch.device("cpu"), "off"))
        assert images.shape == (2, 3, 4, 8) and labels.shape == (2, 4, 8)
        pasted = labels != 18
        assert pasted.any() and (~pasted).any()
        assert torch.equal(images[:, 0][pasted], 10.0 * labels[pasted] + 5.0)
        assert (images[:, 0][~pasted] == 200.0).all()
        assert share.item() == pytest.approx(0.5)  # the left half is confident
        assert (weights[pasted] == 1.0).all() and (weights[~pasted] == 0.5).all()


def test_source_crop_is_the_slice_at_the_drawn_offsets_without_reading_them_on_the_host():
    images = torch.arange(2 * 3 * 7 * 9, dtype=torch.float32).view(2, 3, 7, 9)
    labels = torch.arange(2 * 7 * 9).view(2, 7, 9)
    with host_reads() as reads:
        crops = [match_size(images, labels, (4, 5), _generator(seed)) for seed in range(6)]
    assert reads == []  # on a GPU each read would wait for the device
    offsets = set()
    for seed, (cropped_images, cropped_labels) in enumerate(crops):
        generator = _generator(seed)  # the same two draws, read here as plain numbers
        top, left = (int(torch.randint(high, (), generator=generator)) for high in (7 - 4 + 1, 9 - 5 + 1))
        assert torch.equal(cropped_images, images[..., top:top + 4, left:left + 5])
        assert torch.equal(cropped_labels, labels[..., top:top + 4, left:left + 5])
        offsets.add((top, left))
    assert len(offsets) > 1


def test_dacs_weight_is_the_share_of_confident_pixels():
    confidence = torch.tensor([[[0.99, 0.968, 0.5], [0.2, 0.97, 0.9679]]])
    assert confident_share(confidence, 0.968).item() == pytest.approx(3 / 6)  # >= as in DACS
    assert confident_share(confidence, 0.999).item() == 0.0


def test_weighted_loss_is_the_mean_of_weighted_pixel_cross_entropies():
    logits = torch.randn(1, 3, 2, 2, generator=_generator())
    labels = torch.tensor([[[0, 1], [IGNORE_INDEX, 2]]])
    weights = torch.tensor([[[1.0, 0.25], [0.25, 0.25]]])
    log_p = torch.log_softmax(logits, 1)[0]
    expected = -(1.0 * log_p[0, 0, 0] + 0.25 * log_p[1, 0, 1] + 0.25 * log_p[2, 1, 1]) / 4  # ignore counts 0
    assert weighted_segmentation_loss(logits, labels, weights).item() == pytest.approx(expected.item(), rel=1e-6)


def test_augmentations_are_seeded_and_keep_the_pixel_range():
    assert [blur_kernel_size(height) for height in (512, 128, 40, 20)] == [51, 13, 3, 1]  # DACS' odd ~H/10
    images = torch.rand(6, 3, 40, 48, generator=_generator(1)) * 255
    first = gaussian_blur(colour_jitter(images, _generator(7)), _generator(8))
    again = gaussian_blur(colour_jitter(images, _generator(7)), _generator(8))
    assert torch.equal(first, again)
    assert first.min() >= 0 and first.max() <= 255 + 1e-3
    always = gaussian_blur(images, _generator(3), probability=1.0)
    assert always.std() < images.std()  # blurred: noise averaged out
    assert torch.equal(gaussian_blur(images, _generator(3), probability=0.0), images)
    constant = torch.full((1, 3, 8, 8), 100.0)
    assert torch.allclose(gaussian_blur(constant, _generator(0), probability=1.0), constant)  # kernel sums to 1


# ---------------------------------------------------------------------------- EMA teacher
def _network(seed):
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    network(torch.randn(2, 3, 6, 6))  # train-mode forward: running statistics and counter move
    return network


def test_ema_update_follows_the_formula_and_copies_batchnorm_counters():
    teacher, student = _network(0), _network(1)
    student(torch.randn(2, 3, 6, 6))  # the student's counter is 2, the teacher's 1
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    decay = 0.9
    ema_update(teacher, student, decay)
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert value.item() == student_state[name].item() == 2
        else:
            expected = decay * before[name] + (1 - decay) * student_state[name]
            assert torch.allclose(value, expected, atol=1e-7), name
    assert "1.running_var" in before  # the running statistics were among the averaged entries


def test_ema_decay_warms_up_as_in_dacs():
    assert ema_decay_at(0, 0.99) == 0.0        # the teacher starts as a copy of the student
    assert ema_decay_at(1, 0.99) == 0.5
    assert ema_decay_at(9, 0.99) == pytest.approx(0.9)
    assert ema_decay_at(10_000, 0.99) == 0.99


# ---------------------------------------------------------------------------- entropy
def test_normalized_entropy_matches_the_formula():
    logits = torch.zeros(1, 4, 1, 3)
    logits[0, 0, 0, 1] = 100.0                          # one-hot
    logits[0, :2, 0, 2] = 100.0                         # two of four equal: log 2 / log 4 = 0.5
    entropy = normalized_entropy(logits)[0, 0]
    assert entropy.tolist() == pytest.approx([1.0, 0.0, 0.5], abs=1e-6)
    assert entropy_loss(logits).item() == pytest.approx(1.5 / 3, abs=1e-6)


# ---------------------------------------------------------------------------- FDA
def _cosines(components, height=16, width=16):
    """Sum of amplitude * cos(2 pi (f_y y / H + f_x x / W) + phase) over (f_y, f_x, amplitude, phase)."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    return sum(amplitude * torch.cos(2 * math.pi * (fy * y / height + fx * x / width) + phase)
               for fy, fx, amplitude, phase in components)


def test_fda_keeps_the_phase_and_swaps_only_the_centred_window():
    # 16x16, beta 0.15: b = floor(16 * 0.15) = 2, the window is |f_y| <= 2 and |f_x| <= 2.
    source = _cosines([(0, 0, 10.0, 0.0), (1, 0, 3.0, 0.7), (0, 2, 1.0, -0.4), (0, 3, 2.0, 0.3), (5, 5, 2.0, 1.1)])
    target = _cosines([(0, 0, 50.0, 0.0), (1, 0, 7.0, -2.0), (0, 2, 4.0, 2.5), (0, 3, 9.0, 0.0), (5, 5, 9.0, 0.5)])
    # Expected: inside the window (DC, (1, 0) and (0, 2): the edge +b is swapped too) the target's
    # amplitudes with the source's phases; outside ((0, 3), (5, 5)) the source unchanged.
    expected = _cosines([(0, 0, 50.0, 0.0), (1, 0, 7.0, 0.7), (0, 2, 4.0, -0.4), (0, 3, 2.0, 0.3), (5, 5, 2.0, 1.1)])
    restyled = swap_low_frequency_amplitude(source[None, None], target[None, None], 0.15)[0, 0]
    assert torch.allclose(restyled.double(), expected, atol=1e-3)


def test_fda_window_is_symmetric_and_centred():
    window = low_frequency_window(12, 20, 0.25)  # b = 3
    assert window.sum().item() == 7 * 7
    flipped = torch.roll(window.flip(0).flip(1), shifts=(1, 1), dims=(0, 1))  # mask[-f]
    assert torch.equal(window, flipped)
    assert window[0, 0] and window[3, 3] and window[-3, -3] and not window[4, 0] and not window[0, -4]


def test_fourier_style_transfer_works_in_pixel_space_and_keeps_shapes():
    source_norm = Normalization("s", bgr=False, mean=(100.0, 100.0, 100.0), std=(50.0, 50.0, 50.0))
    target_norm = Normalization("t", bgr=True, mean=(10.0, 20.0, 30.0), std=(1.0, 1.0, 1.0))
    source_pixels = 100 + torch.rand(2, 3, 16, 16, generator=_generator(1)) * 20
    target_pixels = torch.full((1, 3, 8, 8), 40.0)  # flat grey: a DC term only, resized to 16x16
    restyle = FourierStyleTransfer(0.05, source_norm, target_norm)  # b = floor(16 * 0.05) = 0: the DC term only
    restyled = restyle(source_norm.normalize_tensor(source_pixels), target_norm.normalize_tensor(target_pixels),
                       _generator())
    assert restyled.shape == (2, 3, 16, 16)
    # In pixel space the target's mean replaces the source's, the rest of the source is kept.
    expected = source_pixels - source_pixels.mean(dim=(2, 3), keepdim=True) + 40.0
    assert torch.allclose(source_norm.to_pixels(restyled), expected, atol=1e-3)


# ---------------------------------------------------------------------------- rare-class sampling
def _brute_force_counts(dataset):
    train_id = {label.id: label.train_id for label in LABELS}
    counts = np.zeros((len(dataset.label_paths), NUM_CLASSES), np.int64)
    for row, path in enumerate(dataset.label_paths):
        values, numbers = np.unique(np.array(Image.open(path)), return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            if train_id.get(value, IGNORE_INDEX) != IGNORE_INDEX:
                counts[row, train_id[value]] += number
    return counts


def _private_source_tree(tiny_data_root, tmp_path):
    """A copy of the tiny GTA5 tree: the cache written beside it must not reach the shared fixture."""
    return Path(shutil.copytree(tiny_data_root / "GTA5", tmp_path / "GTA5"))


def test_rcs_frequencies_match_a_brute_force_count_and_are_cached(tiny_data_root, tmp_path, monkeypatch):
    source_root = _private_source_tree(tiny_data_root, tmp_path)
    dataset = GTA5Dataset(source_root, split="all")
    counts, pixels = cached_class_pixels(dataset, NUM_CLASSES, tmp_path / "run", log=lambda message: None)
    expected = _brute_force_counts(dataset)
    assert np.array_equal(counts, expected)
    assert (pixels == 36 * 64).all()
    sampler = RareClassSampler(counts, pixels, 0.5, batch_size=2, seed=0, rank=0, world_size=1)
    assert np.allclose(sampler.frequencies, expected.sum(0) / expected.sum())
    # The cache sits beside the dataset and is read back without counting again.
    cache = source_root / "rcs_class_stats_all.json"
    assert json.loads(cache.read_text())["pixel_counts"] == expected.tolist()
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(rare_class_sampling, "count_class_pixels", lambda *a, **k: pytest.fail("counted again"))
    again, _ = cached_class_pixels(dataset, NUM_CLASSES, tmp_path / "run", log=lambda message: None)
    assert np.array_equal(again, expected)


def test_rcs_caches_in_the_run_folder_when_the_dataset_is_read_only(tiny_data_root, tmp_path, monkeypatch):
    source_root = _private_source_tree(tiny_data_root, tmp_path)
    dataset = GTA5Dataset(source_root, split="all")
    monkeypatch.setattr(rare_class_sampling, "_writable", lambda folder: False)  # tests may run as root
    cached_class_pixels(dataset, NUM_CLASSES, tmp_path / "run", log=lambda message: None)
    assert (tmp_path / "run" / "rcs_class_stats_all.json").is_file()
    assert not (source_root / "rcs_class_stats_all.json").exists()


def test_rcs_probabilities_and_draws():
    # 4 images, 3 classes; class 2 is rare and only image 3 holds it; nobody holds class 1.
    counts = np.array([[90, 0, 0], [100, 0, 0], [80, 0, 0], [70, 0, 10]])
    pixels = counts.sum(1)
    frequencies = np.array([340, 0, 10]) / 350
    probabilities = class_probabilities(frequencies, 0.1, np.array([True, False, True]))
    reference = np.exp(np.array([1 - frequencies[0], 1 - frequencies[2]]) / 0.1)
    assert probabilities[1] == 0 and probabilities[[0, 2]] == pytest.approx(reference / reference.sum())
    sampler = RareClassSampler(counts, pixels, 0.1, batch_size=1, seed=0, rank=0, world_size=1)
    draws = torch.cat([sampler._epoch_order() for sampler.epoch in range(500)])
    share_of_image_3 = (draws == 3).double().mean().item()
    # Image 3 comes with class 2 (always) and with class 0 (a quarter of the time).
    expected = probabilities[2] + probabilities[0] / 4
    assert share_of_image_3 == pytest.approx(expected, abs=0.03)
    sampler.epoch = 7
    assert torch.equal(sampler._epoch_order(), sampler._epoch_order())  # a pure function of (seed, epoch)


# ---------------------------------------------------------------------------- layering
def test_nothing_below_the_method_layer_imports_it():
    """Imports flow scripts -> uda -> utils/model/dataset: a module under utils/, model/ or dataset/
    that imported uda would make the layers circular."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders, scanned = [], 0
    for package in ("utils", "model", "dataset"):
        for path in sorted((root / package).glob("*.py")):
            scanned += 1
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(root)}:{node.lineno}" for name in names
                              if name == "uda" or name.startswith("uda.")]
    assert scanned > 20 and offenders == []
