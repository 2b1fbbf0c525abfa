"""MPL's two feedback rules: how the student steps, and the coefficient of the teacher's pseudo-label loss.

Each rule is an ``nn.Module`` (its state is checkpointed with the run) with

* ``student_step(student, precision, lambda_adv, source_images, source_labels, target_images,
  pseudo, iteration) -> (student_losses, coefficient, logs)``: the student's update(s) of one
  iteration and the detached scalar ``c`` of the teacher's term ``c * CE(teacher(target), pseudo)``
  (``pseudo`` is None when no rank has a single confident pixel);
* ``teacher_adversarial_weight``: the weight of the teacher's adversarial term (None: ``--lambda-adv``);
* ``teacher_target_all_heads``: whether that cross-entropy sums the three BiSeNet heads (True) or
  reads the main one only.

``pham`` (Pham et al., CVPR 2021, and their official code, ``meta_pseudo_labels``):
  the student first takes one optimizer step on the target pseudo labels **alone** (three heads,
  its own optimizer and scaler), and ``h`` is what that step did to its labeled loss:
  ``improvement = L_source(before) - L_source(after)`` on the iteration's source batch (train-mode
  BatchNorm; ``before`` a no-grad forward that leaves the running statistics untouched), averaged
  over ranks; a moving baseline ``b <- decay * b + (1 - decay) * improvement`` is updated first
  and subtracted, ``h = improvement - b``, and ``c = h``. Then the student takes its source +
  adversarial step (``adversarial_step`` without target labels), whose update does not enter
  ``h``: ``L_source(after)`` is that step's source loss, read before its update (the same forward
  of the same network on the same batch as a separate no-grad forward; bitwise the same value on
  the CPU, tests/test_mpl_waste.py).
  Sign: ``h > 0`` when the pseudo labels lowered the student's labeled loss (more than usual), and
  minimising ``h * CE`` then makes the teacher's labels *more* likely; ``h < 0`` pushes it away
  from them. That is the derivation's sign (REINFORCE on the teacher's labels + a first-order
  Taylor step of the student gives the teacher gradient ``lr * (g_source . g_pseudo) * grad CE``,
  and ``L(before) - L(after) ~ lr * g_source . g_pseudo``). The official code writes ``(new - old)
  * CE``, the opposite orientation; we follow the derivation.
  Why the real step and not the first-order form ``lr * g_source . g_pseudo``: the real step is
  what the official code measures, it scores the update the student actually takes (its optimizer,
  momentum, weight decay and mixed-precision scaler included), and it needs no second gradient
  vector kept beside the first nor a dot product over all parameters (which, under DDP, would need
  both full gradients reduced). Its cost: one extra student forward + backward on the target batch
  and one no-grad student forward on the source batch, about 4 forward passes of one batch.
  With momentum the step also carries the previous iterations' direction; the baseline removes its
  average share of ``h``.

``course`` (the course repository's ``MPL.py``): the student takes one combined step (source +
  target pseudo labels + adversarial: ``adversarial_step``), then
  ``H = student_lr * L_student_pseudo * L_student_source`` (the step's three-head losses before
  the update, detached) and, with ``epoch = iteration // batches_per_epoch`` (one pass over the
  source set at the run's global batch, counted from 0):
  ``alpha = exp(epoch / 40) - 1`` for epochs 1..25, ``alpha = 1`` after epoch 25, and ``alpha =
  1 / H`` in epoch 0, i.e. ``c = alpha * H`` is exactly 1 in the first epoch. ``H >= 0``: this rule
  always reinforces the teacher's labels; it is a heuristic, not a meta-gradient. The teacher's
  loss there is ``L_source + L_adv + c * L_target + L_uda``: weight 1 on its adversarial term and
  the three heads summed in ``L_target``; its default optimizer is SGD at 1.25e-2
  (``resolve_mpl_args``). One deliberate difference: the course trains the teacher's
  discriminator on the *student's* maps (a bug); here it learns from the teacher's own.
  Shared with ``pham`` and so not the course's either: the pseudo labels (the course thresholds
  each image at its own per-class medians, teacher in eval mode; here ``PseudoLabeler``'s running
  histogram on the training forward) and the UDA term (the course: Gaussian noise in a random box
  on half of the batches, three heads, weight 1; here ``uda.meta_pseudo_labels.augment_view``, main head,
  ``--uda-weight`` ramped over ``--uda-ramp-iters``).
"""
import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from utils.distributed import get_world_size, is_distributed
from engine.steps import check_finite, forward_heads, segmentation_loss, unwrap
from uda.adversarial import adversarial_step

FEEDBACKS = ("pham", "course")
DEFAULT_BASELINE_DECAY = 0.99  # the official code's moving average of h
# The course's schedule of alpha, in epochs, and its teacher: weight 1 on the adversarial term,
# SGD at 1.25e-2 (poly decay).
COURSE_ALPHA_SCALE = 40        # alpha = exp(epoch / 40) - 1
COURSE_ALPHA_LAST_EPOCH = 25   # alpha = 1 after this epoch
COURSE_TEACHER_ADVERSARIAL_WEIGHT = 1.0
COURSE_TEACHER_OPTIMIZER = "sgd"
COURSE_TEACHER_LR = 1.25e-2


def mean_over_ranks(value):
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / get_world_size()
    return value


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


def labeled_loss(model, precision, images, labels):
    """The student's labeled (three-head) loss as its training step sees it, without gradient and
    without moving its BatchNorm running statistics. Through ``forward_heads``: with --fused-loss
    the heads stay at low resolution and the fused kernel computes the loss (no full-resolution
    logits), as in the training step itself."""
    network = unwrap(model)
    with torch.no_grad(), precision.autocast(), running_stats_frozen(network):
        return segmentation_loss(forward_heads(network, images), labels).float()


def pseudo_label_step(learner, precision, images, pseudo, checked=None):
    """One optimizer step of ``learner`` on the target pseudo labels alone; returns the detached loss.
    ``checked``: more values to check finite in the same sync, before the update."""
    learner.optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = segmentation_loss(forward_heads(learner.model, images), pseudo)
    check_finite({"loss_pseudo": loss, **(checked or {})})
    learner.scaler.scale(loss).backward()
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    return loss.detach()


def course_alpha(epoch):
    """The course's alpha for epochs >= 1 (epoch 0 has ``alpha = 1 / H``: see ``course_coefficient``)."""
    if epoch < 1:
        raise ValueError("epoch 0 has alpha = 1 / H; use course_coefficient")
    return 1.0 if epoch > COURSE_ALPHA_LAST_EPOCH else math.exp(epoch / COURSE_ALPHA_SCALE) - 1.0


def course_coefficient(epoch, big_h):
    """``alpha(epoch) * H``: exactly 1 in epoch 0 (the course sets ``alpha = 1 / H`` there)."""
    return torch.ones_like(big_h) if epoch == 0 else course_alpha(epoch) * big_h


def _student_adversarial_step(student, precision, lambda_adv, source_images, source_labels, target_images,
                              target_labels):
    return adversarial_step(student.model, student.discriminator, student.optimizer, student.optimizer_d,
                            student.scaler, student.scaler_d, precision, source_images, source_labels,
                            target_images, target_labels, lambda_adv=lambda_adv)


class PhamFeedback(nn.Module):
    """``c = h = (L_before - L_after) - baseline`` of the student's pseudo-label step (module docstring)."""

    teacher_adversarial_weight = None
    teacher_target_all_heads = False

    def __init__(self, baseline_decay=DEFAULT_BASELINE_DECAY):
        super().__init__()
        if not 0.0 <= baseline_decay <= 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1], got {baseline_decay}")
        self.decay = baseline_decay
        self.register_buffer("baseline", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def forward(self, loss_before, loss_after):
        """(h, logs) from the labeled loss before and after the pseudo-label step; updates the baseline."""
        # Averaged over ranks: one h for the whole (global) batch, and the same baseline everywhere.
        improvement = mean_over_ranks((loss_before - loss_after).float())
        self.baseline.mul_(self.decay).add_((1.0 - self.decay) * improvement)
        h = improvement - self.baseline
        return h, {"mpl_h": h, "mpl_improvement": improvement}

    def student_step(self, student, precision, lambda_adv, source_images, source_labels, target_images, pseudo,
                     iteration):
        pseudo_losses = {}
        if pseudo is not None:
            loss_before = labeled_loss(student.model, precision, source_images, source_labels)
            pseudo_losses["loss_pseudo"] = pseudo_label_step(student, precision, target_images, pseudo,
                                                             checked={"mpl_loss_before": loss_before})
        losses = _student_adversarial_step(student, precision, lambda_adv, source_images, source_labels,
                                           target_images, None)
        if pseudo is None:  # no pseudo label anywhere: no pseudo-label step to score, h = 0
            h = torch.zeros((), device=source_images.device)
            return losses, h, {"mpl_h": h, "mpl_improvement": h}
        # The source step's loss is read before its update, on the batch "before" was: it is the
        # labeled loss after the pseudo-label step (train-mode BatchNorm; checked finite there).
        loss_after = losses["loss_seg"].float()
        h, logs = self(loss_before, loss_after)
        logs.update(mpl_loss_before=loss_before, mpl_loss_after=loss_after)
        return {**losses, **pseudo_losses}, h, logs


class CourseFeedback(nn.Module):
    """``c = alpha(epoch) * student_lr * L_pseudo * L_source`` (module docstring), 1 in epoch 0."""

    teacher_adversarial_weight = COURSE_TEACHER_ADVERSARIAL_WEIGHT
    teacher_target_all_heads = True

    def __init__(self, batches_per_epoch):
        super().__init__()
        if batches_per_epoch <= 0:
            raise ValueError(f"batches_per_epoch must be positive, got {batches_per_epoch}")
        self.batches_per_epoch = batches_per_epoch

    def epoch(self, iteration):
        return iteration // self.batches_per_epoch

    def student_step(self, student, precision, lambda_adv, source_images, source_labels, target_images, pseudo,
                     iteration):
        losses = _student_adversarial_step(student, precision, lambda_adv, source_images, source_labels,
                                           target_images, pseudo)
        student_lr = student.optimizer.param_groups[0]["lr"]
        loss_pseudo = losses.get("loss_pseudo", torch.zeros_like(losses["loss_seg"]))
        big_h = student_lr * loss_pseudo.float() * losses["loss_seg"].float()
        epoch = self.epoch(iteration)
        return losses, course_coefficient(epoch, big_h), {"mpl_H": big_h, "mpl_epoch": torch.tensor(float(epoch))}


def build_feedback(args, batches_per_epoch):
    if args.feedback == "pham":
        return PhamFeedback(args.baseline_decay)
    return CourseFeedback(batches_per_epoch)
