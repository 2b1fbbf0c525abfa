"""Meta Pseudo Labels (Pham et al., CVPR 2021) for unsupervised domain adaptation GTA5 -> Cityscapes.

Labeled data = GTA5 (source), unlabeled data = Cityscapes train (target). One ``MPLStep``:

1. **Teacher on the target.** One forward of ``[target; augmented target]`` (one domain, so
   BatchNorm statistics stay target-only, as in ``adversarial_step``). The clean half's hard
   predictions, thresholded per class by ``PseudoLabeler`` (the median rule of
   ``createpseudolabels.py``, capped at ``MAX_THRESHOLD``), are the pseudo labels; pixels below
   their class threshold are ``IGNORE_INDEX``.
2. **Student step(s) and feedback coefficient** ``c`` (a detached scalar): the rule of
   ``--feedback`` (``uda.mpl_feedback``: ``pham`` = a step on the pseudo labels alone, scored by
   its effect on the student's labeled loss, then a source + adversarial step; ``course`` = one
   source + pseudo-label + adversarial step and the course's ``alpha * H``).
3. **Teacher update**: its supervised source loss (three heads, as every segmentation loss of
   the project) is computed, then ONE backward of ``w_adv * L_adv(T) + c * CE(T(target), pseudo) +
   w_uda(t) * CE(T(aug(target)), aug(pseudo)) + L_source(T)`` goes through the graphs of step 1
   and of that source forward. ``w_adv`` and the heads of the pseudo-label CE are the rule's:
   ``--lambda-adv`` and the main head for ``pham``; 1 and the three heads for ``course``. (One
   backward over the sum gives each parameter the same two gradient tensors, target and source,
   as two backward passes did, summed in another place: bitwise the same, tests/test_mpl_waste.py.
   The target graph is kept until then: the teacher's peak memory holds its 2B target and B
   source activations together.)
4. **Teacher's discriminator** update on the teacher's own detached source/target softmax maps
   (its loss computed and checked with the teacher's, before the teacher's update).

The UDA consistency term is the teacher's cross-entropy (main head) on a photometrically noised,
randomly flipped view of the target against its (equally flipped) pseudo labels, weighted by
``--uda-weight`` and ramped up linearly over ``--uda-ramp-iters``. The view is made on the device
from a generator seeded by (seed, iteration, rank), so it is a pure function of the iteration
and a resumed run draws exactly the same views (the global RNG is not used: the data streams
consume it when they are re-positioned).

What a resume needs beyond networks, optimizers and scalers (the threshold histogram of the
current refresh window, the current thresholds, the feedback baseline) lives in buffers of
``PseudoLabeler`` and ``PhamFeedback``; ``MPLStep.state_module()`` groups them into one
``nn.Module`` that the Trainer checkpoints as a "network" (key ``mpl``).

Cost per iteration, in forward passes F of one batch (a backward ~ 2F): the adversarial step is
~6F; MPL adds the teacher's forward + backward on 2B target images (~6F) and its source forward +
backward (~3F); ``pham`` adds the student's pseudo-label step (~3F) and one no-grad student
forward on the source batch (~1F; the labeled loss after that step is the source step's own
loss). Where compute is the bottleneck (the CPU) that is ~19F/6F for ``pham`` and ~15F/6F for
``course``; ``bench/results/mpl_cost_cpu.md`` has the measured ratios. ``--uda-weight 0`` skips
the augmented view (~3F less). Where kernel launches dominate (small inputs on a GPU) the 2B
forward costs about as much as a B one, which is why the two target views share one forward.
With ``--fused-loss`` every cross-entropy of the step reads the heads at low resolution
(``forward_heads``), and every discriminator map comes from the fused upsample + softmax kernel
(``class_probabilities``) except the teacher's target one: its clean target main head is the one
full-resolution map of the step, read by its labeler and (as a softmax) its discriminator.
Host syncs: the finiteness checks only (``check_finite``, one per update; whether any rank has a
confident pixel is decided in the first one), and the thresholds are binned on their device.

Failure handling: every loss is checked (``check_finite``) before the update it feeds; the
teacher's target terms before anything is updated; pham's labeled loss before the student's
pseudo-label step with that step's loss, before its update; the teacher's source loss, its
discriminator's loss and the feedback coefficient after the student's step(s), in one check before
the teacher's backward (a non-finite value there stops the run with the student already stepped
and neither the teacher nor its discriminator; the checkpoint on disk is untouched). When no rank has a single confident target pixel (decided across ranks, so
every rank takes the same path) the student trains on the source only and the pseudo-label term
has no weight (``pham``: ``h = 0``, its baseline unchanged). That decision stays a branch on the
host, not a 0/1 mask: with a mask the student's pseudo-label step would still run, and an
optimizer step with a zero gradient is not a no-op (momentum, weight decay).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dataset.labels import IGNORE_INDEX, NUM_CLASSES
from utils.distributed import get_rank
from engine.steps import check_finite, forward_heads, main_head, segmentation_loss, set_requires_grad, unwrap
from model.resize import LowResLogits
from uda.adversarial import SOURCE_DOMAIN, discriminator_loss, discriminator_update, domain_loss
from uda.pseudolabel_stats import (MAX_THRESHOLD, ConfidenceHistogram, apply_threshold_bins, device_threshold_bins,
                                   probability_confidence, softmax_confidence)
from utils.seed import StepGenerator

DEFAULT_REFRESH = 100          # iterations between threshold refreshes
DEFAULT_UDA_WEIGHT = 1.0

# The augmented view of the UDA term, in units of each image's own standard deviation so that the
# same amounts fit both input conventions (imagenet: ~unit scale; course: 0..255 minus mean).
NOISE_STD = 0.1
BRIGHTNESS = 0.2               # additive shift, uniform in [-0.2, 0.2] std
CONTRAST = 0.2                 # factor around the per-channel mean, uniform in [0.8, 1.2]
FLIP_PROBABILITY = 0.5



# ---------------------------------------------------------------------------- pseudo labels
class PseudoLabeler(nn.Module):
    """Teacher logits -> hard pseudo labels, thresholded per class; the thresholds are buffers.

    ``refresh > 0``: every pixel's (argmax, max softmax) goes into a ``ConfidenceHistogram``; at
    iterations 0, refresh, 2 refresh, ... (after adding the current batch) the thresholds become
    its per-class medians capped at ``max_threshold`` (0 for unseen classes) and the histogram
    restarts, so each refresh reflects the teacher as it is now. ``refresh == 0``: the fixed
    ``thresholds`` given. The histogram's counts are this module's ``counts`` buffer (the same
    tensor), so they are checkpointed and moved with the module.
    """

    def __init__(self, num_classes=NUM_CLASSES, refresh=DEFAULT_REFRESH, thresholds=None, max_threshold=MAX_THRESHOLD):
        super().__init__()
        if (refresh == 0) == (thresholds is None):
            raise ValueError("give either refresh > 0 (thresholds from a running histogram) or fixed thresholds with refresh 0")
        self.refresh = refresh
        self.max_threshold = max_threshold
        initial = torch.zeros(num_classes, dtype=torch.float64) if thresholds is None else \
            torch.as_tensor(thresholds, dtype=torch.float64).clone()
        if initial.shape != (num_classes,):
            raise ValueError(f"expected {num_classes} thresholds, got shape {tuple(initial.shape)}")
        self.register_buffer("thresholds", initial)
        self.histogram = ConfidenceHistogram(num_classes) if refresh else None
        if self.histogram is not None:
            self.register_buffer("counts", self.histogram.counts)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.histogram is not None:  # .to(device) replaced the buffer: keep the histogram on it
            self.histogram.counts = self.counts
        return self

    @torch.no_grad()
    def forward(self, logits, iteration, probabilities=None):
        """logits [B, K, H, W] -> int64 labels [B, H, W] (``IGNORE_INDEX`` below the threshold).
        ``probabilities``: their float32 softmax when the caller has it (the same values: not recomputed)."""
        pred, conf = softmax_confidence(logits) if probabilities is None else probability_confidence(probabilities)
        if self.histogram is not None:
            self.histogram.update(pred, conf)
            if iteration % self.refresh == 0:
                self.histogram.all_reduce_()  # every rank derives the same thresholds
                self.thresholds.copy_(self.histogram.thresholds(self.max_threshold))
                self.counts.zero_()
        # The thresholds' bins on their device: no host sync (they come from the histogram or a validated file).
        return apply_threshold_bins(pred, conf, device_threshold_bins(self.thresholds)).long()


# ---------------------------------------------------------------------------- augmented view
def augment_view(images, generator):
    """A noised view for the consistency term: (view [B, 3, H, W], flipped bool [B]).

    Per image: contrast around the channel means, a brightness shift and Gaussian noise (all in
    units of the image's standard deviation), then a horizontal flip with probability 1/2.
    """
    batch = images.shape[0]

    def uniform(*shape):  # in [-1, 1)
        return 2 * torch.rand(*shape, generator=generator, device=images.device, dtype=images.dtype) - 1

    std = images.std(dim=(1, 2, 3), keepdim=True)                          # [B, 1, 1, 1]
    mean = images.mean(dim=(2, 3), keepdim=True)                           # [B, 3, 1, 1]
    contrast = 1 + CONTRAST * uniform(batch, 1, 1, 1)
    shift = BRIGHTNESS * uniform(batch, 1, 1, 1) * std
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    view = mean + contrast * (images - mean) + shift + NOISE_STD * std * noise
    flipped = torch.rand(batch, generator=generator, device=images.device) < FLIP_PROBABILITY
    return flip_where(view, flipped), flipped


def head_rows(head, rows):
    """``head[rows]`` (a slice of the batch) of a head's logits, full-resolution or ``LowResLogits``."""
    if isinstance(head, LowResLogits):
        return LowResLogits(head.logits[rows], head.size, head.resize)
    return head[rows]


def split_target_heads(outputs, batch):
    """The teacher's ``[target; view]`` heads -> (clean heads, the main head as its pseudo-label CE
    reads it, the view's main head, the clean main head as float32 full-resolution logits).

    With --fused-loss the heads are ``LowResLogits``: the cross-entropies read them at low
    resolution, and only the clean half's main head is upsampled (under the caller's autocast, as
    the network upsamples), for the labeler and the discriminator. Otherwise the main head is cast
    to float32 once and sliced, so that its two readers' gradients are summed in float32."""
    heads = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if isinstance(heads[0], LowResLogits):
        clean_heads = [head_rows(head, slice(None, batch)) for head in heads]
        return clean_heads, clean_heads[0], head_rows(heads[0], slice(batch, None)), clean_heads[0].full().float()
    main = heads[0].float()
    return [head[:batch] for head in heads], main[:batch], main[batch:], main[:batch]


def flip_where(tensor, flipped):
    """Flip the images/maps ``tensor[b]`` horizontally where ``flipped[b]``."""
    mask = flipped.view(-1, *([1] * (tensor.dim() - 1)))
    return torch.where(mask, tensor.flip(-1), tensor)


# ---------------------------------------------------------------------------- the step
@dataclass
class Learner:
    """One side of MPL: a segmentation network (as trained: maybe DDP/compiled), its optimizer and
    scaler, and its own output-space discriminator with optimizer and scaler (or None)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    discriminator: nn.Module = None
    optimizer_d: torch.optim.Optimizer = None
    scaler_d: object = None


class MPLStep:
    """One MPL iteration (see the module docstring); call it with a batch of each domain.

    ``feedback`` is a rule of ``uda.mpl_feedback`` (``PhamFeedback``, ``CourseFeedback``): it
    takes the student's step(s) and returns the coefficient of the teacher's pseudo-label term.
    """

    def __init__(self, student, teacher, labeler, feedback, precision, lambda_adv, uda_weight=DEFAULT_UDA_WEIGHT,
                 uda_ramp_iters=0, seed=0):
        self.student = student
        self.teacher = teacher
        self.labeler = labeler
        self.feedback = feedback
        self.precision = precision
        self.lambda_adv = lambda_adv
        self.uda_weight = uda_weight
        self.uda_ramp_iters = uda_ramp_iters
        self.seed = seed
        self._generator = StepGenerator(seed)

    def state_module(self):
        """The MPL state a resume needs (threshold histogram/thresholds, feedback baseline)."""
        return nn.ModuleDict({"labeler": self.labeler, "feedback": self.feedback})

    @property
    def teacher_adversarial_weight(self):
        weight = self.feedback.teacher_adversarial_weight
        return self.lambda_adv if weight is None else weight

    def uda_weight_at(self, iteration):
        if not self.uda_ramp_iters:
            return self.uda_weight
        return self.uda_weight * min(1.0, iteration / self.uda_ramp_iters)

    def view_generator(self, iteration, device):
        """The augmentation generator, re-seeded from (seed, iteration, rank): resume-exact."""
        return self._generator(iteration, device, get_rank())

    def __call__(self, source_images, source_labels, target_images, iteration):
        student, teacher, precision = self.student, self.teacher, self.precision
        batch = target_images.shape[0]

        # 1. Teacher on the clean and the augmented target view, in one forward (one BN batch). With
        # --uda-weight 0 the view is not made at all (its term would only cost time).
        teacher.optimizer.zero_grad(set_to_none=True)
        frozen_discriminator = unwrap(teacher.discriminator) if teacher.discriminator is not None else None
        if frozen_discriminator is not None:
            set_requires_grad(frozen_discriminator, False)
        inputs = target_images
        if self.uda_weight > 0:
            view, flipped = augment_view(target_images, self.view_generator(iteration, target_images.device))
            inputs = torch.cat((target_images, view))
        all_heads = self.feedback.teacher_target_all_heads
        with precision.autocast():
            # The auxiliary heads only when the rule's pseudo-label CE sums them (course); pham reads main only.
            outputs = forward_heads(teacher.model, inputs, aux=all_heads)  # heads of [B or 2B, K, H, W]
            clean_heads, main_loss_input, logits_view, logits = split_target_heads(outputs, batch)
        # One float32 softmax for the discriminator's input and the labeler's confidence.
        target_probabilities = F.softmax(logits, dim=1) if frozen_discriminator is not None else None
        pseudo = self.labeler(logits.detach(), iteration,                  # [B, H, W]
                              None if target_probabilities is None else target_probabilities.detach())
        terms = {"t_loss_mpl": segmentation_loss(clean_heads if all_heads else main_loss_input, pseudo)}
        if self.uda_weight > 0:
            terms["t_loss_uda"] = segmentation_loss(logits_view, flip_where(pseudo, flipped))
        if frozen_discriminator is not None:
            with precision.autocast():
                terms["t_loss_adv"] = domain_loss(frozen_discriminator, target_probabilities, SOURCE_DOMAIN)
        labeled = (pseudo != IGNORE_INDEX).float()
        kept = labeled.mean()
        # Before any network is updated; whether any rank has a confident pixel is decided in the same
        # host sync and collective, so that every rank runs the same forward and backward passes.
        any_pseudo = check_finite(terms, any_positive=labeled.sum())

        # 2. Student step(s) and the coefficient of the teacher's pseudo-label term: the rule's.
        student_losses, coefficient, feedback_logs = self.feedback.student_step(
            student, precision, self.lambda_adv, source_images, source_labels, target_images,
            pseudo if any_pseudo else None, iteration)

        # 3. Teacher update: its source forward, then ONE backward over the target terms (through the
        # graph of step 1) and its source loss.
        loss_teacher = coefficient * terms["t_loss_mpl"]
        if "t_loss_uda" in terms:
            loss_teacher = loss_teacher + self.uda_weight_at(iteration) * terms["t_loss_uda"]
        if frozen_discriminator is not None:
            loss_teacher = loss_teacher + self.teacher_adversarial_weight * terms["t_loss_adv"]
        with precision.autocast():
            source_outputs = forward_heads(teacher.model, source_images)
            terms["t_loss_seg"] = segmentation_loss(source_outputs, source_labels)
        checked = {"mpl_coefficient": coefficient, "t_loss_seg": terms["t_loss_seg"]}
        if frozen_discriminator is not None:
            # 4. The loss of the teacher's discriminator, on the teacher's own detached maps (the course
            # used the student's: a bug). It reads D's own weights, which the teacher's update does not
            # touch: computed now and checked with the teacher's losses, in one sync before any of the two
            # updates (the target terms' graph recorded D frozen, so the backward below leaves D alone).
            terms["t_loss_d"] = discriminator_loss(teacher.discriminator, teacher.optimizer_d, precision,
                                                   main_head(source_outputs).detach(), target_probabilities)
            checked["t_loss_d"] = terms["t_loss_d"]
        check_finite(checked)
        teacher.scaler.scale(loss_teacher + terms["t_loss_seg"]).backward()
        del outputs, clean_heads, main_loss_input, logits_view, source_outputs
        teacher.scaler.step(teacher.optimizer)
        teacher.scaler.update()
        if frozen_discriminator is not None:
            terms["t_loss_d"] = discriminator_update(teacher.optimizer_d, teacher.scaler_d, terms["t_loss_d"])

        return {**student_losses, **{name: value.detach() for name, value in terms.items()},
                "mpl_coefficient": coefficient, "pl_kept": kept, **feedback_logs}
