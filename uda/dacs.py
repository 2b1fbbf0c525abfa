"""DACS: domain adaptation via cross-domain mixed sampling (Tranheden et al., WACV 2021).

One iteration, on top of the usual source loss (and, combined, the adversarial terms):

1. **Teacher.** An exponential moving average (EMA) of the student labels the target batch:
   hard pseudo labels (argmax) and their confidence (max softmax), without gradients, in eval
   mode with the averaged BatchNorm statistics (the official DACS code runs its teacher in train
   mode, i.e. on the target batch's own statistics; with the demo's batches of 2 those are noise,
   and eval mode leaves the teacher a pure function of the student's history). ``q``, the share of the batch's target pixels whose confidence is at least
   ``--pseudo-threshold`` (0.968 in DACS, ``ge`` as there), measures how much to trust them.
2. **ClassMix.** For each source image, half of the classes present in its label (rounded up,
   drawn at random) are cut out and pasted onto a target image; the mixed label takes the source
   label on the pasted pixels and the teacher's pseudo label elsewhere.
3. **Augmentation** of the mixed images in pixel space, as DACS: colour jitter (probability 0.2:
   brightness, contrast, saturation factors in [0.8, 1.2]; DACS' hue jitter is left out, it needs an
   HSV round trip) and Gaussian blur (probability 0.5, sigma in [0.15, 1.15], a kernel ~10 % of the
   image height, odd).
4. **Mixed loss**: cross-entropy of the student on the mixed images (its three heads, as every
   segmentation loss here), each pixel weighted 1 where it came from the source and ``q`` where it
   came from the target, averaged over all pixels (DACS' pixel-wise weighted loss; DAFormer mixes the
   weights the same way).
5. **EMA update** after the student's step: ``teacher <- a * teacher + (1 - a) * student`` with
   ``a = min(1 - 1 / (t + 1), --ema-decay)`` (DACS' warm-up: early on the teacher follows the
   student closely). Every floating-point entry of the state is averaged, BatchNorm running means
   and variances included (the teacher predicts in eval mode with them); integer entries, i.e.
   BatchNorm's ``num_batches_tracked`` counters, are copied, since an average of counters is no count.

Every random draw comes from the step's generator (seeded by run seed, iteration and rank), so a
resumed run mixes exactly as the uninterrupted one. Source and target images of different sizes:
the source batch (image and label together) is randomly cropped to the target size when it is
at least as large, else resized to it (bilinear image, nearest label); ``--crop-size`` gives both
domains one size.
"""
import copy
import math

import torch
import torch.nn.functional as F

from dataset.labels import IGNORE_INDEX
from engine.steps import main_output
from engine.evaluate import eval_mode

DEFAULT_EMA_DECAY = 0.99
DEFAULT_PSEUDO_THRESHOLD = 0.968
JITTER_PROBABILITY = 0.2
JITTER_STRENGTH = 0.2            # factors uniform in [1 - s, 1 + s]
BLUR_PROBABILITY = 0.5
BLUR_SIGMA = (0.15, 1.15)
BLUR_KERNEL_FRACTION = 0.1       # of the image height
PIXEL_MAX = 255.0
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma of RGB, as torchvision's rgb_to_grayscale


# ---------------------------------------------------------------------------- EMA teacher
def make_teacher(student):
    """A frozen copy of the (unwrapped) student: the EMA teacher's starting point."""
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def ema_decay_at(iteration, decay):
    """DACS' warm-up: ``min(1 - 1 / (iteration + 1), decay)``."""
    return min(1.0 - 1.0 / (iteration + 1), decay)


@torch.no_grad()
def ema_update(teacher, student, decay):
    """``teacher <- decay * teacher + (1 - decay) * student`` on every floating-point entry of the
    state (parameters, BatchNorm running statistics); integer entries (BatchNorm's
    ``num_batches_tracked``) are copied. Both must be unwrapped modules of the same architecture."""
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.is_floating_point():
            value.lerp_(student_state[name].to(value.dtype), 1.0 - decay)
        else:
            value.copy_(student_state[name])


# ---------------------------------------------------------------------------- ClassMix
def classmix_masks(labels, num_classes, generator):
    """[B, H, W] source labels -> (bool [B, H, W] paste mask, bool [B, K] chosen classes).

    Per image, ``ceil(n / 2)`` of its ``n`` present classes (ignore pixels excluded) are chosen
    uniformly at random; the mask holds exactly the pixels of the chosen classes.
    """
    batch = labels.shape[0]
    # Ignore pixels go to an extra column K, dropped after the scatter.
    indices = labels.masked_fill(labels == IGNORE_INDEX, num_classes).reshape(batch, -1)
    present = torch.zeros(batch, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, indices, True)
    present = present[:, :num_classes]
    scores = torch.rand(batch, num_classes, generator=generator, device=generator.device).to(labels.device)
    scores = scores.masked_fill(~present, 2.0)            # absent classes rank after every present one
    rank = scores.argsort(dim=1).argsort(dim=1)           # 0 = first drawn
    wanted = (present.sum(1, keepdim=True) + 1) // 2      # ceil(n / 2)
    chosen = present & (rank < wanted)
    lookup = torch.cat((chosen, torch.zeros(batch, 1, dtype=torch.bool, device=labels.device)), dim=1)
    mask = lookup.gather(1, indices).view_as(labels)
    return mask, chosen


def match_size(images, labels, size_hw, generator):
    """Source images [B, 3, H, W] and labels [B, H, W] brought to ``size_hw``: one random crop for
    the batch when they are at least as large, else a resize (bilinear image, nearest label)."""
    height, width = images.shape[-2:]
    target_height, target_width = size_hw
    if (height, width) == (target_height, target_width):
        return images, labels
    if height >= target_height and width >= target_width:
        # The offsets stay where the generator drew them: indexing with them is a gather, where a
        # slice would need them on the host (a wait for the GPU at every step).
        top = torch.randint(height - target_height + 1, (), generator=generator, device=generator.device)
        left = torch.randint(width - target_width + 1, (), generator=generator, device=generator.device)
        rows = top.to(images.device) + torch.arange(target_height, device=images.device)
        columns = left.to(images.device) + torch.arange(target_width, device=images.device)
        return (images.index_select(-2, rows).index_select(-1, columns),
                labels.index_select(-2, rows).index_select(-1, columns))
    images = F.interpolate(images, size=tuple(size_hw), mode="bilinear", align_corners=False)
    labels = F.interpolate(labels[:, None].float(), size=tuple(size_hw), mode="nearest")[:, 0].long()
    return images, labels


# ---------------------------------------------------------------------------- augmentation
def _per_image(batch, low, high, generator, device):
    values = torch.rand(batch, generator=generator, device=generator.device).to(device)
    return (low + (high - low) * values).view(batch, 1, 1, 1)


def _gray(images):
    weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def colour_jitter(images, generator, probability=JITTER_PROBABILITY, strength=JITTER_STRENGTH):
    """RGB [B, 3, H, W] in 0..255: brightness, contrast, saturation (in that order, each factor in
    [1 - strength, 1 + strength]) on the images drawn with ``probability``, clamped to 0..255."""
    batch, device = images.shape[0], images.device
    applied = _per_image(batch, 0.0, 1.0, generator, device) < probability
    brightness, contrast, saturation = (_per_image(batch, 1 - strength, 1 + strength, generator, device)
                                        for _ in range(3))
    jittered = (images * brightness).clamp(0, PIXEL_MAX)
    mean_gray = _gray(jittered).mean(dim=(2, 3), keepdim=True)
    jittered = (mean_gray + contrast * (jittered - mean_gray)).clamp(0, PIXEL_MAX)
    gray = _gray(jittered)
    jittered = (gray + saturation * (jittered - gray)).clamp(0, PIXEL_MAX)
    return torch.where(applied, jittered, images)


def blur_kernel_size(height):
    """DACS' kernel size: about a tenth of the image height, made odd."""
    tenth = math.ceil(BLUR_KERNEL_FRACTION * height)
    return max(1, int(math.floor(tenth - 0.5 + tenth % 2)))


def gaussian_blur(images, generator, probability=BLUR_PROBABILITY, sigma_range=BLUR_SIGMA):
    """Separable Gaussian blur (reflect padding) of the images drawn with ``probability``, each with
    its own sigma; one grouped convolution per axis for the whole batch."""
    batch, channels, height, width = images.shape
    applied = _per_image(batch, 0.0, 1.0, generator, images.device).view(batch) < probability
    sigma = _per_image(batch, *sigma_range, generator, images.device).view(batch, 1)
    size = min(blur_kernel_size(height), 2 * (min(height, width) // 2) - 1)  # reflect padding < size
    offsets = torch.arange(size, dtype=images.dtype, device=images.device) - size // 2
    kernels = torch.exp(-offsets[None] ** 2 / (2 * sigma ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)
    identity = (offsets == 0).to(images.dtype).expand(batch, size)
    kernels = torch.where(applied[:, None], kernels, identity).repeat_interleave(channels, dim=0)  # [B*C, k]
    flat = images.reshape(1, batch * channels, height, width)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernels.view(-1, 1, size, 1), groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernels.view(-1, 1, 1, size), groups=batch * channels)
    return flat.view(batch, channels, height, width)


# ---------------------------------------------------------------------------- losses
def confident_share(confidence, threshold):
    """DACS' weight ``q``: the share of pixels whose confidence is at least ``threshold``."""
    return (confidence >= threshold).float().mean()


def weighted_segmentation_loss(outputs, labels, weights):
    """Sum over BiSeNet's heads of the pixel-weighted cross-entropy (ignore 255), averaged over all
    pixels (DACS' CrossEntropyLoss2dPixelWiseWeighted)."""
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    return sum((F.cross_entropy(output.float(), labels, ignore_index=IGNORE_INDEX, reduction="none") * weights).mean()
               for output in outputs)


class DACS:
    """The teacher and the mixed-image term of DACS (see the module docstring)."""

    def __init__(self, student, num_classes, source_normalization, target_normalization,
                 ema_decay=DEFAULT_EMA_DECAY, pseudo_threshold=DEFAULT_PSEUDO_THRESHOLD, augment=True):
        self.student = student  # unwrapped: what the EMA reads
        self.teacher = make_teacher(student)
        self.num_classes = num_classes
        self.source_normalization = source_normalization
        self.target_normalization = target_normalization
        self.ema_decay = ema_decay
        self.pseudo_threshold = pseudo_threshold
        self.augment = augment  # colour jitter and blur of the mixed images (off: tests look at the mixing alone)

    @torch.no_grad()
    def pseudo_labels(self, target_images, precision):
        """(pseudo labels [B, H, W], confidence [B, H, W]) of the teacher on the target batch."""
        with eval_mode(self.teacher), precision.autocast():
            logits = main_output(self.teacher(target_images))
        confidence, labels = F.softmax(logits.float(), dim=1).max(dim=1)
        return labels, confidence

    @torch.no_grad()
    def mixed_batch(self, source_images, source_labels, target_images, generator, precision):
        """(normalised mixed images, mixed labels, pixel weights, q) for one step."""
        pseudo, confidence = self.pseudo_labels(target_images, precision)
        share = confident_share(confidence, self.pseudo_threshold)
        source_images, source_labels = match_size(source_images, source_labels, target_images.shape[-2:], generator)
        mask, _ = classmix_masks(source_labels, self.num_classes, generator)
        source_pixels = self.source_normalization.to_pixels(source_images.float())
        target_pixels = self.target_normalization.to_pixels(target_images.float())
        mixed = torch.where(mask[:, None], source_pixels, target_pixels)
        if self.augment:
            mixed = gaussian_blur(colour_jitter(mixed, generator), generator)
        labels = torch.where(mask, source_labels, pseudo)
        weights = torch.where(mask, torch.ones_like(confidence), share.expand_as(confidence))
        return self.target_normalization.normalize_tensor(mixed), labels, weights, share

    def mixed_terms(self, source_images, source_labels, target_images, generator, precision):
        """The ``extra_terms`` hook of ``uda.adversarial.adversarial_step`` for this step's mixed batch."""
        images, labels, weights, share = self.mixed_batch(source_images, source_labels, target_images, generator,
                                                          precision)

        def terms(model):
            loss = weighted_segmentation_loss(model(images), labels, weights)
            return loss, {"loss_mix": loss, "pseudo_weight": share}
        return terms

    def update_teacher(self, iteration):
        """EMA step after the student's update at ``iteration`` (the student has taken iteration + 1 steps)."""
        ema_update(self.teacher, self.student, ema_decay_at(iteration + 1, self.ema_decay))
