"""Class-wise confidence thresholds for max-probability pseudo labels (BDL style), in fixed memory.

The method: over the whole unlabeled target set, every pixel gets ``pred = argmax softmax`` and
``conf = max softmax``. Class ``c``'s threshold is the median of ``conf`` over all pixels predicted
as ``c``, capped at ``MAX_THRESHOLD``; a class never predicted gets 0. A pixel predicted as ``c``
with ``conf < threshold[c]`` becomes ``IGNORE_INDEX``.

The reference implementation keeps every confidence of the dataset in RAM (~25 GB for Cityscapes
train) to sort it. Here the confidence is rounded to float16 *everywhere* (for the median and for
the comparison that applies it), and the statistics are a per-class histogram over the float16 bit
patterns. Why float16:

* Non-negative float16 values in [0, 1] have bit patterns 0 .. 0x3C00 that are monotone in the
  value, so a histogram with one bin per bit pattern loses nothing: medians computed from it are
  *exactly* ``np.median`` of the float16 confidences, from a fixed 19 x 15361 int64 table (2.3 MB)
  whatever the dataset size.
* Its relative spacing near 1 is 2^-11 (~5e-4), below the noise of AMP inference, so rounding does
  not change which pixels a sensible threshold keeps in any way that matters.
* Using the *same* rounded value for the median and for the comparison keeps the rule
  self-consistent: a pixel exactly at its class median is kept, and ``kept_counts`` computed from
  the histogram alone equals the count of surviving pixels in the labels written.

The histogram also sums across processes (``all_reduce_``) and merges/resumes exactly, because it
is integer counts.
"""
import functools

import torch
import torch.distributed as dist

from dataset.labels import IGNORE_INDEX, NUM_CLASSES

MAX_THRESHOLD = 0.9  # BDL's cap: a class never needs more than 0.9 confidence to be kept

# float16 1.0 is 0x3C00; every float16 in [0, 1] has a bit pattern in [0, 0x3C00].
FLOAT16_ONE_BITS = 0x3C00
NUM_BINS = FLOAT16_ONE_BITS + 1

# Value of every bin, exactly (float16 -> float64 is exact). Ascending, because the bit patterns of
# non-negative floats are ordered like their values.
BIN_VALUES = torch.arange(NUM_BINS, dtype=torch.int16).view(torch.float16).to(torch.float64)

HISTOGRAM_FORMAT = "float16-bits/1"  # bump if the quantization or bin layout ever changes
LABEL_DTYPE_MAX = 255  # labels are written as uint8


def quantize_confidence(conf):
    """Confidence as used everywhere in this module: clamp to [0, 1], round to float16.

    Goes through float32 first so that float64 inputs round once, exactly like the float32 softmax
    output of a model (and like ``np.float32(x).astype(np.float16)``). NaN becomes 0 (an unusable
    prediction should never be the reason a pixel is kept). ``abs`` turns a -0.0 (which ``clamp``
    leaves alone) into +0.0, whose bit pattern is 0 rather than 0x8000.
    """
    conf = torch.nan_to_num(conf.to(torch.float32), nan=0.0)
    return conf.clamp(0.0, 1.0).abs().to(torch.float16)


def confidence_bits(conf16):
    """Bit patterns (int64, 0 .. 0x3C00) of float16 confidences from ``quantize_confidence``."""
    if conf16.dtype != torch.float16:
        raise TypeError(f"expected a float16 tensor from quantize_confidence, got {conf16.dtype}")
    return conf16.view(torch.int16).to(torch.int64)


def _bin_index(pred, conf, num_classes, ignore_index):
    """Flat ``class * NUM_BINS + bits`` per pixel; skipped pixels get the extra slot ``C * NUM_BINS``.

    Routing skipped pixels to one spare bin (dropped afterwards) instead of boolean-masking them
    keeps shapes static, so nothing waits on the device to learn how many pixels survived.
    """
    if pred.shape != conf.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and conf {tuple(conf.shape)} differ in shape")
    if pred.is_floating_point() or pred.is_complex() or pred.dtype == torch.bool:
        raise TypeError(f"pred must hold integer class ids, got {pred.dtype}")
    pred = pred.to(torch.int64)
    valid = (pred >= 0) & (pred < num_classes) & (pred != ignore_index)
    index = pred * NUM_BINS + confidence_bits(quantize_confidence(conf))
    return torch.where(valid, index, num_classes * NUM_BINS)


def _medians_from_counts(counts):
    """``np.median`` per histogram row: counts [..., NUM_BINS] -> float64 [...] (NaN if empty).

    The k-th smallest value (0-based) lies in the first bin whose cumulative count reaches k + 1;
    one ``searchsorted`` finds both middle ranks of every row at once.
    """
    cumulative = counts.cumsum(-1)
    total = cumulative[..., -1]
    # Middle ranks: equal for an odd count, n//2 - 1 and n//2 for an even one.
    low_rank = (total - 1).clamp(min=0) // 2
    high_rank = total // 2
    ranks = torch.stack((low_rank, high_rank), dim=-1) + 1
    bins = torch.searchsorted(cumulative.contiguous(), ranks.contiguous())
    bins = bins.clamp(max=NUM_BINS - 1)  # empty rows search past the end; masked below
    values = BIN_VALUES.to(counts.device)[bins]
    # Mean of two float16 values is exact in float64: same result as np.median's (a + b) / 2.
    medians = (values[..., 0] + values[..., 1]) / 2
    return torch.where(total > 0, medians, torch.full_like(medians, float("nan")))


def _thresholds_from_counts(counts, max_threshold):
    medians = _medians_from_counts(counts)
    capped = medians.clamp(max=max_threshold)
    return torch.where(counts.sum(-1) > 0, capped, torch.zeros_like(capped))


def threshold_bins(thresholds):
    """Lowest float16 bit pattern whose value is >= each threshold (int64, same device).

    ``conf16 >= t`` is equivalent to ``bits(conf16) >= threshold_bins(t)`` because bins are in
    value order, so applying thresholds is an integer lookup on any device and agrees, by
    construction, with ``ConfidenceHistogram.kept_counts``. A threshold above 1 maps to
    ``NUM_BINS`` (nothing kept), one at or below 0 to 0 (everything kept).
    """
    if not torch.is_tensor(thresholds):
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    device = thresholds.device
    thresholds = thresholds.detach().to("cpu", torch.float64)
    if torch.isnan(thresholds).any():
        raise ValueError("thresholds contain NaN; use ConfidenceHistogram.thresholds() (0 for unseen classes)")
    return device_threshold_bins(thresholds).to(device)


class ConfidenceHistogram:
    """Per-class histogram of float16 confidences: exact medians in fixed memory.

    ``counts[c, b]`` is the number of pixels predicted as class ``c`` whose float16 confidence has
    bit pattern ``b``. Its size never depends on how many pixels were added.
    """

    def __init__(self, num_classes=NUM_CLASSES, device="cpu"):
        if not 0 < num_classes <= LABEL_DTYPE_MAX:
            raise ValueError(f"num_classes must be in [1, {LABEL_DTYPE_MAX}], got {num_classes}")
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, NUM_BINS, dtype=torch.int64, device=device)

    @property
    def device(self):
        return self.counts.device

    def update(self, pred, conf, ignore_index=IGNORE_INDEX):
        """Add pixels: ``pred`` integer class ids (any shape), ``conf`` their max softmax (same shape).

        Pixels whose ``pred`` is ``ignore_index`` or outside ``[0, num_classes)`` are skipped.
        """
        pred = pred.to(self.device)
        conf = conf.to(self.device)
        index = _bin_index(pred, conf, self.num_classes, ignore_index).reshape(-1)
        size = self.num_classes * NUM_BINS
        # One bincount over the whole batch; the last (spare) bin holds the skipped pixels.
        binned = torch.bincount(index, minlength=size + 1)[:size]
        self.counts += binned.view(self.num_classes, NUM_BINS)
        return self

    def merge(self, other):
        """Add another histogram's counts (e.g. from another shard of the dataset)."""
        if not isinstance(other, ConfidenceHistogram):
            raise TypeError(f"cannot merge {type(other).__name__} into ConfidenceHistogram")
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"histogram shapes differ: {tuple(self.counts.shape)} vs {tuple(other.counts.shape)}")
        self.counts += other.counts.to(self.device)
        return self

    def __iadd__(self, other):
        return self.merge(other)

    def all_reduce_(self):
        """Sum counts over all ranks when torch.distributed is initialised (no-op otherwise).

        Integer SUM is exact and order-independent, so every rank then holds the histogram a single
        process would have built over the whole dataset, and derives the same thresholds. The
        counts must live where the backend expects them (CUDA for NCCL, CPU for gloo).
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def state_dict(self):
        # Plain tensors and ints only, so torch.load(weights_only=True) accepts it; stored on CPU
        # so a checkpoint resumes on any device.
        return {
            "format": HISTOGRAM_FORMAT,
            "num_classes": self.num_classes,
            "num_bins": NUM_BINS,
            "counts": self.counts.detach().cpu().clone(),
        }

    def load_state_dict(self, state):
        if state.get("format") != HISTOGRAM_FORMAT:
            raise ValueError(f"histogram format {state.get('format')!r}, expected {HISTOGRAM_FORMAT!r}")
        counts = state["counts"]
        expected = (self.num_classes, NUM_BINS)
        if tuple(counts.shape) != expected or counts.dtype != torch.int64:
            raise ValueError(f"histogram counts {tuple(counts.shape)} {counts.dtype}, expected {expected} int64")
        self.counts.copy_(counts)
        return self

    def pixel_counts(self):
        """Pixels predicted as each class: int64 [num_classes]."""
        return self.counts.sum(1)

    def medians(self):
        """Exact ``np.median`` of the float16 confidences per class: float64, NaN if never predicted."""
        return _medians_from_counts(self.counts)

    def thresholds(self, max_threshold=MAX_THRESHOLD):
        """``min(median, max_threshold)`` per class (float64); 0 for classes never predicted."""
        return _thresholds_from_counts(self.counts, max_threshold)

    def kept_counts(self, thresholds=None):
        """Pixels per class that ``apply_thresholds`` keeps, from the histogram alone (int64)."""
        if thresholds is None:
            thresholds = self.thresholds()
        first_kept_bin = threshold_bins(thresholds).to(self.device)
        bins = torch.arange(NUM_BINS, device=self.device)
        kept = bins.unsqueeze(0) >= first_kept_bin.unsqueeze(1)  # [C, NUM_BINS]
        return (self.counts * kept).sum(1)

    def kept_fraction(self, thresholds=None):
        """Share of each class's predicted pixels that survive (float64; NaN if never predicted)."""
        return self.kept_counts(thresholds).to(torch.float64) / self.pixel_counts().to(torch.float64)

    def __repr__(self):
        return f"ConfidenceHistogram(num_classes={self.num_classes}, pixels={int(self.counts.sum())}, device={self.device})"


def apply_thresholds(pred, conf, thresholds, ignore_index=IGNORE_INDEX):
    """Pseudo labels: ``pred`` where ``float16(conf) >= thresholds[pred]``, else ``ignore_index``.

    Returns uint8 with the shape of ``pred``. Pixels whose ``pred`` is already ``ignore_index`` or
    not a class id of ``thresholds`` come out as ``ignore_index``. The comparison uses the same
    float16 rounding as the histogram, so a pixel exactly at its class median is kept.
    """
    return apply_threshold_bins(pred, conf, threshold_bins(thresholds).to(pred.device), ignore_index)


@functools.lru_cache(maxsize=8)
def _bin_values_on(device):
    with torch.inference_mode(False):  # one cached copy serves calls in and outside inference mode
        return BIN_VALUES.to(device)


def device_threshold_bins(thresholds):
    """``threshold_bins`` computed where ``thresholds`` (float64) live, without the NaN check: no host
    sync, for thresholds that cannot be NaN (``ConfidenceHistogram.thresholds``, a validated file);
    a NaN keeps nothing of its class."""
    return torch.searchsorted(_bin_values_on(thresholds.device), thresholds.to(torch.float64), right=False)


def apply_threshold_bins(pred, conf, first_kept_bin, ignore_index=IGNORE_INDEX):
    """``apply_thresholds`` with the thresholds given as ``threshold_bins`` on ``pred``'s device."""
    if not 0 <= ignore_index <= LABEL_DTYPE_MAX:
        raise ValueError(f"ignore_index {ignore_index} does not fit in uint8")
    num_classes = first_kept_bin.numel()
    conf = conf.to(pred.device)
    # _bin_index routes ignored/out-of-range pixels to a spare slot; give that slot an impossible
    # threshold so the single lookup below rejects them too.
    index = _bin_index(pred, conf, num_classes, ignore_index)
    cls, bits = index // NUM_BINS, index % NUM_BINS
    lookup = torch.cat((first_kept_bin, first_kept_bin.new_full((1,), NUM_BINS + 1)))
    keep = bits >= lookup[cls]
    labels = torch.where(keep, pred.to(torch.int64), torch.full_like(index, ignore_index))
    return labels.to(torch.uint8)


def per_image_thresholds(pred, conf, num_classes=NUM_CLASSES, max_threshold=MAX_THRESHOLD,
                         ignore_index=IGNORE_INDEX):
    """Thresholds from each image alone (the per-image variant): pred/conf [B, ...] -> float64 [B, C].

    Same median/cap/zero rule as the dataset-wide histogram; one bincount builds all B histograms
    (B x C x 15361 int64, ~2.3 MB per image) and one searchsorted reads every median.
    """
    if pred.dim() < 1:
        raise ValueError("pred must have a leading batch dimension")
    batch = pred.shape[0]
    size = num_classes * NUM_BINS
    index = _bin_index(pred, conf.to(pred.device), num_classes, ignore_index).reshape(batch, -1)
    image = torch.arange(batch, device=pred.device).unsqueeze(1)
    # Offset each image's bins into its own block; skipped pixels share one spare slot at the end.
    index = torch.where(index < size, image * size + index, batch * size)
    counts = torch.bincount(index.reshape(-1), minlength=batch * size + 1)[: batch * size]
    return _thresholds_from_counts(counts.view(batch, num_classes, NUM_BINS), max_threshold)


def softmax_confidence(logits):
    """logits [B, C, ...] -> (pred int64 [B, ...], conf float32 [B, ...]): argmax and max softmax.

    Softmax in float32 even under AMP, so the float16 rounding happens once, in quantize_confidence.
    """
    return probability_confidence(logits.to(torch.float32).softmax(dim=1))


def probability_confidence(probabilities):
    """softmax maps [B, C, ...] -> (pred int64 [B, ...], conf [B, ...]): ``softmax_confidence`` for a
    caller that has the float32 softmax already (MPL's teacher shares it with its discriminator)."""
    conf, pred = probabilities.max(dim=1)
    return pred, conf
