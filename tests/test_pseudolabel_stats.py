"""Pseudo-label thresholds from the float16 histogram against a plain numpy reference.

The references below loop over classes on purpose: they are the obviously-correct version of what
uda/pseudolabel_stats.py does with bincount and searchsorted.
"""
import io

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from dataset.labels import IGNORE_INDEX, NUM_CLASSES
from uda.pseudolabel_stats import (
    MAX_THRESHOLD,
    NUM_BINS,
    ConfidenceHistogram,
    apply_thresholds,
    confidence_bits,
    device_threshold_bins,
    per_image_thresholds,
    quantize_confidence,
    softmax_confidence,
    threshold_bins,
)

SEEDS = range(6)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Roles of classes in the synthetic data set.
CAPPED_CLASS = 3      # every confidence in [0.95, 1]: median above the cap
TIED_CLASS = 4        # confidences from three values: medians land on ties
ONE_PIXEL_CLASS = 5
TWO_PIXEL_CLASS = 6   # even count: median is the mean of two float16 values
ABSENT_CLASS = 7
TIE_VALUES = (0.25, 0.5, 0.75)


# ----------------------------------------------------------------------------------- references
def ref_quantize(conf):
    return np.clip(np.asarray(conf, dtype=np.float32), 0.0, 1.0).astype(np.float16).astype(np.float64)


def ref_thresholds(pred, conf, num_classes=NUM_CLASSES, cap=MAX_THRESHOLD):
    pred = np.asarray(pred).reshape(-1)
    conf16 = ref_quantize(conf).reshape(-1)
    thresholds = np.zeros(num_classes)
    for c in range(num_classes):
        values = conf16[pred == c]
        if values.size:
            thresholds[c] = min(np.median(values), cap)
    return thresholds


def ref_apply(pred, conf, thresholds, ignore_index=IGNORE_INDEX):
    pred = np.asarray(pred).astype(np.int64)
    conf16 = ref_quantize(conf)
    valid = (pred >= 0) & (pred < len(thresholds)) & (pred != ignore_index)
    keep = valid & (conf16 >= np.asarray(thresholds)[np.where(valid, pred, 0)])
    return np.where(keep, pred, ignore_index).astype(np.uint8)


# ----------------------------------------------------------------------------------- data
def synthetic_dataset(seed, images=5, height=17, width=23):
    """(pred int64 [N, H, W], conf float32 [N, H, W]) with every edge case of the threshold rule."""
    rng = np.random.default_rng(seed)
    n = images * height * width
    regular = [c for c in range(NUM_CLASSES)
               if c not in (ONE_PIXEL_CLASS, TWO_PIXEL_CLASS, ABSENT_CLASS)]
    pred = rng.choice(regular, size=n)
    conf = rng.random(n, dtype=np.float32)
    conf[pred == CAPPED_CLASS] = rng.uniform(0.95, 1.0, size=(pred == CAPPED_CLASS).sum())
    conf[pred == TIED_CLASS] = rng.choice(TIE_VALUES, size=(pred == TIED_CLASS).sum())
    slots = rng.permutation(n)
    pred[slots[0]] = ONE_PIXEL_CLASS
    conf[slots[0]] = 0.37  # below the cap, so its threshold is its own confidence
    pred[slots[1:3]] = TWO_PIXEL_CLASS
    conf[slots[1:3]] = (0.3, 0.301)  # distinct float16 values whose mean is not a float16
    conf[slots[3:13]] = 1.0
    conf[slots[13:23]] = 0.0
    pred[slots[23:40]] = IGNORE_INDEX  # skipped by the histogram
    return (torch.from_numpy(pred.reshape(images, height, width)),
            torch.from_numpy(conf.astype(np.float32).reshape(images, height, width)))


def histogram_of(pred, conf, device="cpu", chunk=1):
    hist = ConfidenceHistogram(device=device)
    for start in range(0, len(pred), chunk):
        hist.update(pred[start:start + chunk], conf[start:start + chunk])
    return hist


# ----------------------------------------------------------------------------------- quantization
def test_quantization_bits_are_monotone_and_cover_0_to_1():
    conf = torch.tensor([-0.5, -0.0, 0.0, 1e-8, 0.5, 0.9, 1.0, 1.5, float("nan")])
    bits = confidence_bits(quantize_confidence(conf))
    assert bits.tolist()[:3] == [0, 0, 0]
    assert bits[6] == bits[7] == NUM_BINS - 1
    assert bits[8] == 0  # NaN counts as zero confidence
    every = torch.arange(NUM_BINS, dtype=torch.int16).view(torch.float16).float()
    assert torch.all(every.diff() > 0)
    assert torch.equal(confidence_bits(quantize_confidence(every)), torch.arange(NUM_BINS))


# ----------------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
def test_thresholds_match_numpy_median(seed, device):
    pred, conf = synthetic_dataset(seed)
    hist = histogram_of(pred, conf, device=device, chunk=1 + seed % 3)
    expected = ref_thresholds(pred.numpy(), conf.numpy())
    thresholds = hist.thresholds().cpu()

    assert thresholds.dtype == torch.float64
    np.testing.assert_array_equal(thresholds.numpy(), expected)  # exact, not approximate
    assert thresholds[ABSENT_CLASS] == 0
    assert thresholds[CAPPED_CLASS] == MAX_THRESHOLD
    assert thresholds[TIED_CLASS].item() in TIE_VALUES
    one_pixel = conf[pred == ONE_PIXEL_CLASS]
    assert thresholds[ONE_PIXEL_CLASS] == quantize_confidence(one_pixel).double().item()
    pair = quantize_confidence(conf[pred == TWO_PIXEL_CLASS]).double()
    assert thresholds[TWO_PIXEL_CLASS] == pair.mean()
    assert not torch.isin(thresholds[TWO_PIXEL_CLASS].half().double(), pair)

    medians = hist.medians().cpu()
    assert torch.isnan(medians[ABSENT_CLASS])
    assert torch.equal(hist.pixel_counts().cpu(),
                       torch.bincount(pred[pred != IGNORE_INDEX], minlength=NUM_CLASSES))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-0.25, 1.25, width=32)), min_size=1, max_size=40))
def test_thresholds_match_numpy_median_property(pixels):
    pred = np.array([p for p, _ in pixels], dtype=np.int64)
    conf = np.array([c for _, c in pixels], dtype=np.float32)
    hist = ConfidenceHistogram(num_classes=4)
    hist.update(torch.from_numpy(pred), torch.from_numpy(conf))
    np.testing.assert_array_equal(hist.thresholds().numpy(), ref_thresholds(pred, conf, num_classes=4))


def test_custom_cap():
    pred = torch.zeros(3, dtype=torch.long)
    hist = ConfidenceHistogram().update(pred, torch.tensor([0.6, 0.7, 0.8]))
    assert hist.thresholds(max_threshold=0.5)[0] == 0.5
    assert hist.thresholds(max_threshold=1.0)[0] == quantize_confidence(torch.tensor(0.7)).double()


# ----------------------------------------------------------------------------------- state
def test_merge_equals_single_histogram_and_state_dict_round_trips():
    pred, conf = synthetic_dataset(seed=11)
    whole = histogram_of(pred, conf)
    first, second = histogram_of(pred[:2], conf[:2]), histogram_of(pred[2:], conf[2:])
    assert torch.equal(ConfidenceHistogram().merge(first).merge(second).counts, whole.counts)
    first += second
    assert torch.equal(first.counts, whole.counts)

    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    restored = ConfidenceHistogram().load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.counts, whole.counts)
    assert torch.equal(restored.thresholds(), whole.thresholds())

    with pytest.raises(ValueError):
        ConfidenceHistogram(num_classes=4).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError):
        whole.merge(ConfidenceHistogram(num_classes=4))


def test_memory_does_not_grow_with_updates():
    hist = ConfidenceHistogram()
    shape, storage = hist.counts.shape, hist.counts.data_ptr()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        pred = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=generator)
        hist.update(pred, torch.rand(2, 64, 64, generator=generator))
    assert hist.counts.shape == shape == (NUM_CLASSES, NUM_BINS)
    assert hist.counts.data_ptr() == storage  # updated in place
    assert hist.pixel_counts().sum() == 50 * 2 * 64 * 64


def test_update_skips_ignored_and_out_of_range_and_checks_shapes():
    hist = ConfidenceHistogram(num_classes=4)
    hist.update(torch.tensor([0, 4, -1, IGNORE_INDEX, 3], dtype=torch.long), torch.full((5,), 0.5))
    assert hist.pixel_counts().tolist() == [1, 0, 0, 1]
    hist.update(torch.tensor([[1, IGNORE_INDEX]], dtype=torch.uint8), torch.tensor([[0.5, 0.5]]))
    assert hist.pixel_counts().tolist() == [1, 1, 0, 1]
    with pytest.raises(ValueError):
        hist.update(torch.zeros(3, dtype=torch.long), torch.zeros(4))
    with pytest.raises(TypeError):
        hist.update(torch.zeros(3), torch.zeros(3))


def test_all_reduce_is_a_no_op_without_distributed():
    pred, conf = synthetic_dataset(seed=1)
    hist = histogram_of(pred, conf)
    before = hist.counts.clone()
    assert hist.all_reduce_() is hist
    assert torch.equal(hist.counts, before)


def _all_reduce_worker(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pred, conf = synthetic_dataset(seed=21)
        hist = histogram_of(pred[rank::world_size], conf[rank::world_size])
        hist.all_reduce_()
        if rank == 0:
            torch.save(hist.thresholds(), result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_all_reduce_across_two_processes_matches_single_process(tmp_path):
    result_file = tmp_path / "thresholds.pt"
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(result_file)), nprocs=2)
    pred, conf = synthetic_dataset(seed=21)
    assert torch.equal(torch.load(result_file, weights_only=True), histogram_of(pred, conf).thresholds())


# ----------------------------------------------------------------------------------- applying
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
def test_apply_thresholds_matches_numpy(seed, device):
    pred, conf = synthetic_dataset(seed)
    hist = histogram_of(pred, conf)
    thresholds = hist.thresholds()
    labels = apply_thresholds(pred.to(device), conf.to(device), thresholds).cpu()

    assert labels.dtype == torch.uint8 and labels.shape == pred.shape
    assert set(labels.unique().tolist()) <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    np.testing.assert_array_equal(labels.numpy(), ref_apply(pred.numpy(), conf.numpy(), thresholds.numpy()))
    assert torch.all(labels[pred == IGNORE_INDEX] == IGNORE_INDEX)
    # The histogram predicts exactly how many pixels the labels keep.
    kept = torch.bincount(labels[labels != IGNORE_INDEX].long(), minlength=NUM_CLASSES)
    assert torch.equal(hist.kept_counts(thresholds), kept)
    assert torch.equal(hist.kept_counts(), kept)
    fraction = hist.kept_fraction()
    assert torch.isnan(fraction[ABSENT_CLASS])
    assert fraction[ONE_PIXEL_CLASS] == 1.0
    assert fraction[TWO_PIXEL_CLASS] == 0.5  # the lower of two pixels is below their mean


def test_pixel_exactly_at_threshold_is_kept():
    conf = torch.tensor([0.2, 0.3, 0.4, 0.61, 0.62, 0.95])
    pred = torch.tensor([0, 0, 0, 1, 1, 2])
    thresholds = ConfidenceHistogram(num_classes=3).update(pred, conf).thresholds()
    labels = apply_thresholds(pred, conf, thresholds)
    # Class 0: median 0.3 keeps itself; class 1: mean of two keeps only the upper; class 2: capped.
    assert labels.tolist() == [IGNORE_INDEX, 0, 0, IGNORE_INDEX, 1, 2]
    # float32 or a Python list of thresholds gives the same labels as float64.
    assert torch.equal(apply_thresholds(pred, conf, thresholds.float()), labels)
    assert torch.equal(apply_thresholds(pred, conf, thresholds.tolist()), labels)


def test_threshold_bins_edges():
    bins = threshold_bins(torch.tensor([-1.0, 0.0, 1.0, 1.5], dtype=torch.float64))
    assert bins.tolist() == [0, 0, NUM_BINS - 1, NUM_BINS]
    with pytest.raises(ValueError):
        threshold_bins(torch.tensor([float("nan")]))



def test_device_threshold_bins_equal_the_host_bins_and_keep_nothing_for_nan():
    # Exact bin values (a pixel at its class median is kept), values between two bins, both ends.
    edges = torch.tensor([-1.0, 0.0, 1.0, 1.5, 0.9, MAX_THRESHOLD], dtype=torch.float64)
    between = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    on_bins = torch.arange(0, NUM_BINS, 97, dtype=torch.int16).view(torch.float16).to(torch.float64)
    for thresholds in (edges, between, on_bins, on_bins.float()):
        assert torch.equal(device_threshold_bins(thresholds), threshold_bins(thresholds))
    assert device_threshold_bins(torch.tensor([float("nan")], dtype=torch.float64)).tolist() == [NUM_BINS]

# ----------------------------------------------------------------------------------- per image
def test_per_image_equals_dataset_wide_for_one_image_and_reference_for_many():
    pred, conf = synthetic_dataset(seed=5)
    for image in range(len(pred)):
        single = per_image_thresholds(pred[image:image + 1], conf[image:image + 1])
        assert single.shape == (1, NUM_CLASSES)
        assert torch.equal(single[0], histogram_of(pred[image:image + 1], conf[image:image + 1]).thresholds())
    batch = per_image_thresholds(pred, conf)
    expected = np.stack([ref_thresholds(p, c) for p, c in zip(pred.numpy(), conf.numpy())])
    np.testing.assert_array_equal(batch.numpy(), expected)


def test_per_image_differs_from_dataset_wide_where_distributions_differ():
    # Class 0 is unsure in image 0 (0.2-0.4) and sure in image 1 (0.7-0.85).
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    conf = torch.stack((torch.linspace(0.2, 0.4, 16), torch.linspace(0.7, 0.85, 16))).view(2, 4, 4)
    per_image = per_image_thresholds(pred, conf)[:, 0]
    dataset_wide = ConfidenceHistogram().update(pred, conf).thresholds()[0]
    np.testing.assert_array_equal(per_image.numpy(), [ref_thresholds(pred[i], conf[i])[0] for i in range(2)])
    assert per_image[0] < 0.4 < dataset_wide < 0.7 < per_image[1]
    # Dataset-wide, the unsure image loses all its class-0 pixels; per image, it keeps half.
    assert (apply_thresholds(pred[0], conf[0], dataset_wide.view(1)) == IGNORE_INDEX).all()
    assert (apply_thresholds(pred[0], conf[0], per_image[:1]) == 0).sum() == 8


# ----------------------------------------------------------------------------------- softmax
def test_softmax_confidence():
    logits = torch.randn(2, NUM_CLASSES, 5, 7, generator=torch.Generator().manual_seed(0)).half()
    pred, conf = softmax_confidence(logits)
    probs = logits.float().softmax(1)
    assert pred.shape == conf.shape == (2, 5, 7)
    assert conf.dtype == torch.float32 and pred.dtype == torch.int64
    assert torch.equal(pred, probs.argmax(1))
    assert torch.allclose(conf, probs.amax(1))
