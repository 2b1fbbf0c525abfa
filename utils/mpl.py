"""Meta Pseudo Labels (Pham et al., CVPR 2021) for unsupervised domain adaptation GTA5 -> Cityscapes.

Labeled data = GTA5 (source), unlabeled data = Cityscapes train (target). One ``MPLStep``:

1. **Teacher on the target.** One forward of ``[target; augmented target]`` (one domain, so
   BatchNorm statistics stay target-only, as in ``adversarial_step``). The clean half's hard
   predictions, thresholded per class by ``PseudoLabeler`` (the median rule of
   ``createpseudolabels.py``, capped at ``MAX_THRESHOLD``), are the pseudo labels; pixels below
   their class threshold are ``IGNORE_INDEX``.
2. **Student step**: exactly ``utils.engine.adversarial_step`` on the source labels + the target
   pseudo labels (+ its own discriminator). Its source loss is the student's labeled loss
   *before* the update, for free.
3. **Feedback coefficient** ``c`` (a detached scalar), see below.
4. **Teacher update**: ``lambda_adv * L_adv(T) + c * CE(T(target), pseudo) + w_uda(t) *
   CE(T(aug(target)), aug(pseudo))`` backpropagated through the graph of step 1, then its
   supervised source loss (three heads, as every segmentation loss of the project).
5. **Teacher's discriminator** update on its detached source/target softmax maps.

Feedback (``--feedback``), teacher MPL term = ``c * CE(teacher target logits, its pseudo labels)``:

* ``pham`` (default): ``h = L_after - L_before - b``, the student's labeled (source, three-head)
  cross-entropy after its update minus before it, minus a moving-average baseline
  ``b <- decay * b + (1 - decay) * (L_after - L_before)`` (updated first, then subtracted, as in
  the official code; ``--baseline-decay 1`` keeps ``b = 0``). ``c = -h``.

  Sign: the official code writes ``t_loss_mpl = (new - old) * CE``; the paper's derivation
  (REINFORCE on the teacher's labels + first-order Taylor of the student's update) gives the
  teacher gradient ``(old - new) * grad CE`` (a label that lowered the student's labeled loss
  must become *more* likely, i.e. its CE must go *down*). We keep ``h`` in the official
  orientation (its sign follows the student's labeled loss change: h > 0 when the loss went up)
  and apply the derivation's sign: ``c = -h``. Minimising ``c * CE`` therefore makes the teacher
  reinforce its pseudo labels when the student improved on labeled data (h < 0) and move away
  from them when the student got worse (h > 0). Taken literally, ``+h * CE`` would do the
  opposite, which contradicts the derivation.
* ``course`` (the project report's variant): ``H = student_lr * L_student_target *
  L_student_source`` (the current learning rate, the student's pseudo-label and source losses
  of this step, detached), ``c = alpha * H`` with ``alpha`` growing linearly from 0 (student's
  feedback ignored) to 1 over ``--alpha-ramp-epochs`` (default: the whole run). ``H >= 0``, so
  this variant always reinforces the teacher's labels, more where the student's losses are
  high; it is a heuristic, not a meta-gradient.

The UDA consistency term is the teacher's cross-entropy on a photometrically noised, randomly
flipped view of the target against its (equally flipped) pseudo labels, weighted by
``--uda-weight`` and ramped up linearly over ``--uda-ramp-iters``. The view is made on the device
from a generator seeded by (seed, iteration, rank), so it is a pure function of the iteration
and a resumed run draws exactly the same views (the global RNG is not used: the data streams
consume it when they are re-positioned).

What a resume needs beyond networks, optimizers and scalers (the threshold histogram of the
current refresh window, the current thresholds, the feedback baseline) lives in buffers of
``PseudoLabeler`` and ``PhamFeedback``; ``MPLStep.state_module()`` groups them into one
``nn.Module`` that the Trainer checkpoints as a "network" (key ``mpl``).

Cost per iteration, in forward passes F of one batch (a backward ~ 2F): the adversarial step is
~6F; MPL adds the teacher's forward + backward on 2B target images (~6F), its source forward +
backward (~3F) and, for ``pham``, one student forward without gradient on the source batch
(~1F) whose BatchNorm running statistics are left untouched (``running_stats_frozen``). Where
compute is the bottleneck (the CPU) that is ~16F/6F, measured 2.4-2.9x (``bench/mpl_cost.py``,
128x256, batch 2, one thread); ``--uda-weight 0`` skips the augmented view (~13F/6F, measured
2.1-2.3x). Where kernel launches dominate (small inputs on a GPU) the 2B forward costs about as
much as a B one, which is why the two target views share one forward.

Failure handling: every loss is checked (``check_finite``) before the update it feeds; the
teacher's target terms before anything is updated, its source loss and the feedback after the
student's step (a non-finite value there stops the run with the student already stepped; the
checkpoint on disk is untouched). A target batch without a single confident pixel trains the
student on the source only (``segmentation_loss`` would give 0/0); under torchrun with
``--discriminator none`` that skips a forward pass on one rank only, so there such a batch would
desynchronise the ranks. A ``segmentation_loss`` returning 0 for an all-ignored batch would remove
the special case.
"""
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dataset.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, SHORT_NAMES
from utils.distributed import get_rank, get_world_size, is_distributed
from utils.engine import (SOURCE_DOMAIN, adversarial_step, check_finite, discriminator_step, domain_loss,
                          main_output, segmentation_loss, set_requires_grad, unwrap)
from utils.optim import OPTIMIZERS
from utils.errors import UsageError
from utils.options import non_negative_float, non_negative_int, positive_float, unit_interval
from utils.pseudolabel_stats import MAX_THRESHOLD, ConfidenceHistogram, apply_thresholds, softmax_confidence

FEEDBACKS = ("pham", "course")
DEFAULT_REFRESH = 100          # iterations between threshold refreshes
DEFAULT_BASELINE_DECAY = 0.99  # the official code's moving average of h
DEFAULT_UDA_WEIGHT = 1.0
UDA_RAMP_FRACTION = 0.1        # default UDA ramp: the first tenth of the run
# The teacher is fine-tuned from a trained checkpoint: restarting it at the student's from-scratch
# learning rate undoes part of its training (synthetic benchmark, 200 iterations: the DSC
# teacher fell from 16.0 to 12.8 mIoU at 2.5e-2 and rose to 16.6 at 2.5e-3).
TEACHER_LR_DIVISOR = 10

# The augmented view of the UDA term, in units of each image's own standard deviation so that the
# same amounts fit both input conventions (imagenet: ~unit scale; course: 0..255 minus mean).
NOISE_STD = 0.1
BRIGHTNESS = 0.2               # additive shift, uniform in [-0.2, 0.2] std
CONTRAST = 0.2                 # factor around the per-channel mean, uniform in [0.8, 1.2]
FLIP_PROBABILITY = 0.5

_SEED_STRIDE = 1_000_003
_SEED_MODULUS = 2 ** 63


# ---------------------------------------------------------------------------- options
def add_mpl_args(parser):
    group = parser.add_argument_group("meta pseudo labels")
    group.add_argument("--teacher-checkpoint", required=True,
                       help="teacher initialisation: any BiSeNet checkpoint load_bisenet reads (e.g. the DSC run's best.pth)")
    group.add_argument("--teacher-network", default="model",
                       help="which network of a multi-network teacher checkpoint (an MPL run's 'teacher', say)")
    group.add_argument("--student-checkpoint", dest="init_from", default=None,
                       help="student initialisation, the same as --init-from (default: a fresh BiSeNet per "
                            "--context-path/--pretrained)")
    group.add_argument("--feedback", choices=FEEDBACKS, default="pham",
                       help="pham: h = student's labeled loss after - before its step, minus a moving baseline; "
                            "course: the report's H = student_lr x L_target x L_source, ramped by alpha(epoch)")
    group.add_argument("--teacher-optimizer", choices=OPTIMIZERS, default=None, help="teacher optimizer (default: --optimizer)")
    group.add_argument("--teacher-learning-rate", type=positive_float, default=None,
                       help=f"teacher initial learning rate, poly decay (default: --learning-rate / {TEACHER_LR_DIVISOR}: "
                            f"the teacher is fine-tuned, not trained from scratch)")
    group.add_argument("--refresh", type=non_negative_int, default=None,
                       help=f"refresh the per-class thresholds every N iterations from the histogram of the teacher's "
                            f"predictions since the last refresh; 0 = fixed --thresholds (default: {DEFAULT_REFRESH}, "
                            f"or 0 with --thresholds)")
    group.add_argument("--thresholds", metavar="PATH", default=None,
                       help="fixed per-class thresholds from a createpseudolabels.py thresholds.json")
    group.add_argument("--uda-weight", type=non_negative_float, default=DEFAULT_UDA_WEIGHT,
                       help="weight of the teacher's consistency term on an augmented target view")
    group.add_argument("--uda-ramp-iters", type=non_negative_int, default=None,
                       help="linear ramp of the UDA weight from 0, in iterations (default: a tenth of the run; 0: none)")
    group.add_argument("--baseline-decay", type=unit_interval, default=DEFAULT_BASELINE_DECAY,
                       help="pham: decay of the moving-average baseline of h (1: no baseline)")
    group.add_argument("--alpha-ramp-epochs", type=positive_float, default=None,
                       help="course: epochs over which alpha grows from 0 to 1 (default: the whole run)")
    return group


def resolve_mpl_args(args):
    """Check the MPL flags against each other (before any data or network is touched)."""
    if args.refresh is None:
        args.refresh = 0 if args.thresholds else DEFAULT_REFRESH
    if args.thresholds and args.refresh:
        raise UsageError("--thresholds gives fixed thresholds; drop it or use --refresh 0 "
                         f"(got --refresh {args.refresh})")
    if not args.thresholds and not args.refresh:
        raise UsageError("--refresh 0 means fixed thresholds: give them with --thresholds PATH (a thresholds.json)")
    if args.teacher_optimizer is None:
        args.teacher_optimizer = args.optimizer
    if args.teacher_learning_rate is None:
        args.teacher_learning_rate = args.learning_rate / TEACHER_LR_DIVISOR
    return args


def resolve_mpl_schedule(args, batches_per_epoch):
    """Iteration counts of the ramps, once the run length is known (written back into ``args``)."""
    if args.uda_ramp_iters is None:
        args.uda_ramp_iters = max(1, round(UDA_RAMP_FRACTION * args.max_iters))
    if args.alpha_ramp_epochs is None:
        args.alpha_ramp_epochs = args.max_iters / batches_per_epoch
    return max(1, round(args.alpha_ramp_epochs * batches_per_epoch))  # alpha's ramp in iterations


def read_thresholds(path, num_classes=NUM_CLASSES):
    """Per-class thresholds (float64 [num_classes]) from a thresholds.json.

    Reads createpseudolabels.py's file (``"thresholds": [t0, ...]``, or its ``"classes"`` entries
    ``{name: {"train_id": c, "threshold": t, ...}}``) and simpler hand-written ones: a list of
    numbers, a list of ``{"threshold": t[, "train_id": c]}``, or a dict from class names (full or
    short) or train ids to numbers or such dicts. A per-image run has no fixed thresholds: refused.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--thresholds {path}: cannot read it as JSON ({error})") from None
    if isinstance(data, dict) and data.get("mode") == "per-image":
        raise UsageError(f"--thresholds {path} comes from a per-image createpseudolabels.py run: it holds no "
                         f"dataset-wide thresholds; make one without --per-image, or use --refresh N")
    entries = data
    if isinstance(data, dict):
        entries = next((data[key] for key in ("thresholds", "classes") if data.get(key) is not None), data)

    def value_of(entry):
        value = entry.get("threshold") if isinstance(entry, dict) else entry
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise UsageError(f"--thresholds {path}: {entry!r} is not a threshold in [0, 1]")
        return float(value)

    def train_id_of(entry, default):
        train_id = entry.get("train_id", default) if isinstance(entry, dict) else default
        if not isinstance(train_id, int) or not 0 <= train_id < num_classes:
            raise UsageError(f"--thresholds {path}: {entry!r} names no train id in [0, {num_classes})")
        return train_id

    values = [None] * num_classes
    if isinstance(entries, list):
        if len(entries) != num_classes:
            raise UsageError(f"--thresholds {path}: {len(entries)} thresholds for {num_classes} classes")
        for index, entry in enumerate(entries):
            values[train_id_of(entry, index)] = value_of(entry)
    elif isinstance(entries, dict):
        names = {str(index): index for index in range(num_classes)}
        if num_classes == NUM_CLASSES:
            names.update({name: index for index, name in enumerate(CLASS_NAMES)})
            names.update({name: index for index, name in enumerate(SHORT_NAMES)})
        for key, entry in entries.items():
            if key in names or isinstance(entry, dict) and "train_id" in entry:
                values[train_id_of(entry, names.get(key))] = value_of(entry)
    missing = [index for index, value in enumerate(values) if value is None]
    if missing:
        raise UsageError(f"--thresholds {path}: no threshold for class(es) {missing} (expected {num_classes} classes)")
    return torch.tensor(values, dtype=torch.float64)


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
    def forward(self, logits, iteration):
        """logits [B, K, H, W] -> int64 labels [B, H, W] (``IGNORE_INDEX`` below the threshold)."""
        pred, conf = softmax_confidence(logits)
        if self.histogram is not None:
            self.histogram.update(pred, conf)
            if iteration % self.refresh == 0:
                self.histogram.all_reduce_()  # every rank derives the same thresholds
                self.thresholds.copy_(self.histogram.thresholds(self.max_threshold))
                self.counts.zero_()
        return apply_thresholds(pred, conf, self.thresholds).long()


def pseudo_label_loss(logits, labels):
    """Mean cross-entropy over the pixels that have a label; 0 (not NaN) when none has: the
    segmentation loss of a single output."""
    return segmentation_loss(logits, labels)


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


def flip_where(tensor, flipped):
    """Flip the images/maps ``tensor[b]`` horizontally where ``flipped[b]``."""
    mask = flipped.view(-1, *([1] * (tensor.dim() - 1)))
    return torch.where(mask, tensor.flip(-1), tensor)


@contextlib.contextmanager
def running_stats_frozen(module):
    """Train-mode BatchNorm (batch statistics) that leaves the running statistics untouched."""
    layers = [layer for layer in module.modules()
              if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield module
    finally:
        for layer in layers:
            layer.track_running_stats = True


# ---------------------------------------------------------------------------- feedback
def _mean_over_ranks(value):
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / get_world_size()
    return value


class PhamFeedback(nn.Module):
    """``c = -h``, ``h = (L_after - L_before) - baseline`` (see the module docstring for the sign)."""

    needs_loss_after = True

    def __init__(self, baseline_decay=DEFAULT_BASELINE_DECAY):
        super().__init__()
        if not 0.0 <= baseline_decay <= 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1], got {baseline_decay}")
        self.decay = baseline_decay
        self.register_buffer("baseline", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def forward(self, student_losses, loss_after, student_lr, iteration):
        # Averaged over ranks: one h for the whole (global) batch, and the same baseline everywhere.
        change = _mean_over_ranks((loss_after - student_losses["loss_seg"]).float())
        self.baseline.mul_(self.decay).add_((1.0 - self.decay) * change)
        h = change - self.baseline
        return -h, {"mpl_h": h, "mpl_loss_change": change}


class CourseFeedback(nn.Module):
    """``c = alpha(t) * student_lr * L_target * L_source``, alpha linear from 0 to 1 over ``ramp_iters``."""

    needs_loss_after = False

    def __init__(self, ramp_iters):
        super().__init__()
        if ramp_iters <= 0:
            raise ValueError(f"ramp_iters must be positive, got {ramp_iters}")
        self.ramp_iters = ramp_iters

    def alpha(self, iteration):
        return min(1.0, iteration / self.ramp_iters)

    @torch.no_grad()
    def forward(self, student_losses, loss_after, student_lr, iteration):
        loss_target = student_losses.get("loss_pseudo", torch.zeros_like(student_losses["loss_seg"]))
        big_h = student_lr * loss_target.float() * student_losses["loss_seg"].float()
        alpha = self.alpha(iteration)
        return alpha * big_h, {"mpl_H": big_h, "mpl_alpha": torch.tensor(alpha)}


def build_feedback(args, alpha_ramp_iters):
    if args.feedback == "pham":
        return PhamFeedback(args.baseline_decay)
    return CourseFeedback(alpha_ramp_iters)


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

    ``feedback`` is any callable ``(student_losses, loss_after, student_lr, iteration) ->
    (coefficient, logs)`` with a ``needs_loss_after`` attribute (PhamFeedback, CourseFeedback).
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
        self._generator = None

    def state_module(self):
        """The MPL state a resume needs (threshold histogram/thresholds, feedback baseline)."""
        return nn.ModuleDict({"labeler": self.labeler, "feedback": self.feedback})

    def uda_weight_at(self, iteration):
        if not self.uda_ramp_iters:
            return self.uda_weight
        return self.uda_weight * min(1.0, iteration / self.uda_ramp_iters)

    def view_generator(self, iteration, device):
        """The augmentation generator, re-seeded from (seed, iteration, rank): resume-exact."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        seed = ((self.seed * _SEED_STRIDE + iteration) * _SEED_STRIDE + get_rank()) % _SEED_MODULUS
        self._generator.manual_seed(seed)
        return self._generator

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
        with precision.autocast():
            logits = main_output(teacher.model(inputs)).float()          # [B or 2B, K, H, W]
        logits, logits_view = logits[:batch], logits[batch:]
        pseudo = self.labeler(logits.detach(), iteration)                 # [B, H, W]
        terms = {"t_loss_mpl": pseudo_label_loss(logits, pseudo)}
        if self.uda_weight > 0:
            terms["t_loss_uda"] = pseudo_label_loss(logits_view, flip_where(pseudo, flipped))
        if frozen_discriminator is not None:
            target_probabilities = F.softmax(logits, dim=1)
            with precision.autocast():
                terms["t_loss_adv"] = domain_loss(frozen_discriminator, target_probabilities, SOURCE_DOMAIN)
        check_finite(terms)  # before any network is updated
        kept = (pseudo != IGNORE_INDEX).float().mean()

        # 2. Student: the adversarial step on source labels + target pseudo labels. A batch without
        # any confident pixel trains on the source only (its pseudo-label CE would be 0/0).
        student_losses = adversarial_step(
            student.model, student.discriminator, student.optimizer, student.optimizer_d, student.scaler,
            student.scaler_d, precision, source_images, source_labels, target_images,
            pseudo if bool(kept > 0) else None, lambda_adv=self.lambda_adv)

        # 3. Feedback. The student's labeled loss after its update, measured like the one before it
        # (train mode, three heads, same batch) without touching its BatchNorm running statistics.
        loss_after = None
        if self.feedback.needs_loss_after:
            network = unwrap(student.model)
            with torch.no_grad(), precision.autocast(), running_stats_frozen(network):
                loss_after = segmentation_loss(network(source_images), source_labels)
        coefficient, feedback_logs = self.feedback(student_losses, loss_after, student.optimizer.param_groups[0]["lr"], iteration)

        # 4. Teacher update: target terms through the graph of step 1, then its source loss.
        loss_target = coefficient * terms["t_loss_mpl"]
        if "t_loss_uda" in terms:
            loss_target = loss_target + self.uda_weight_at(iteration) * terms["t_loss_uda"]
        if frozen_discriminator is not None:
            loss_target = loss_target + self.lambda_adv * terms["t_loss_adv"]
        teacher.scaler.scale(loss_target).backward()
        with precision.autocast():
            source_outputs = teacher.model(source_images)
            terms["t_loss_seg"] = segmentation_loss(source_outputs, source_labels)
        check_finite({"mpl_coefficient": coefficient, "t_loss_seg": terms["t_loss_seg"]})  # before the teacher's update
        teacher.scaler.scale(terms["t_loss_seg"]).backward()
        source_logits = main_output(source_outputs).detach()
        del source_outputs
        teacher.scaler.step(teacher.optimizer)
        teacher.scaler.update()

        # 5. Teacher's discriminator.
        if frozen_discriminator is not None:
            terms["t_loss_d"] = discriminator_step(teacher.discriminator, teacher.optimizer_d, teacher.scaler_d,
                                                     precision, source_logits, target_probabilities,
                                                     loss_name="t_loss_d")

        losses = {**student_losses, **{name: value.detach() for name, value in terms.items()},
                  "mpl_coefficient": coefficient, "pl_kept": kept, **feedback_logs}
        if loss_after is not None:
            losses["loss_seg_after"] = loss_after
        return losses
