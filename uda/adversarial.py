"""Adversarial output-space alignment (AdaptSegNet): the segmentation network learns to fool a
discriminator (FCD or the light DSC) that tells its source softmax maps from its target ones.

One step (``adversarial_step``): the source cross-entropy; on the target batch ``lambda_adv`` x the
discriminator's loss against the *source* label (with D frozen), plus pseudo-label and any
self-training terms; then the discriminator learns source -> 0, target -> 1 on detached maps
(``discriminator_loss``, ``discriminator_update``). The flags are in ``cli.method_options``.
"""
import torch
import torch.nn.functional as F

from model import build_discriminator
from model.depthwise import set_depthwise
from model.resize import set_matmul_resize
from engine.optim import build_optimizer
from engine.steps import (check_finite, class_probabilities, forward_heads, main_head, segmentation_loss,
                          set_requires_grad, unwrap)

# Domain labels of the discriminator (AdaptSegNet convention).
SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0
DEFAULT_LAMBDA_ADV = 1e-3
DEFAULT_LR_D = 1e-4


def build_discriminator_parts(args, device, num_classes):
    """(discriminator, its optimizer, its config) or (None, None, None) for --discriminator none."""
    if args.discriminator == "none":
        return None, None, None
    discriminator = build_discriminator(args.discriminator, num_classes=num_classes).to(device)
    set_matmul_resize(discriminator, getattr(args, "matmul_resize", "off") == "on")  # its x32 output upsampling
    set_depthwise(discriminator, getattr(args, "depthwise", "native"))  # DSC's depthwise convolutions (--depthwise)
    optimizer = build_optimizer(args.optimizer_d, discriminator.parameters(), args.learning_rate_d,
                                weight_decay=0.0 if args.optimizer_d != "sgd" else None, momentum=args.momentum)
    return discriminator, optimizer, {"name": args.discriminator, "num_classes": num_classes}


def domain_loss(discriminator, probabilities, domain):
    """BCE-with-logits of the discriminator's map against a constant domain label."""
    logits = discriminator(probabilities)
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, domain, dtype=torch.float32))


def adversarial_step(model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision,
                     source_images, source_labels, target_images, target_labels=None, lambda_adv=DEFAULT_LAMBDA_ADV,
                     target_terms=None, extra_terms=None, check=None):
    """One AdaptSegNet step: segmentation (+ fooling the discriminator), then discriminator.

    * source batch: cross-entropy on the three heads;
    * target batch through the same network: ``lambda_adv`` x BCE of D(softmax(target)) against the
      *source* label, plus cross-entropy against pseudo labels when ``target_labels`` is given;
    * D is frozen during that update, then trained on detached softmax maps, source -> source
      label, target -> target label, mean of the two BCE terms.
    ``discriminator=None`` is the source-only baseline (with optional pseudo labels) in the same loop.

    Hooks for the self-training methods of ``uda/`` (the engine knows none of them):
    * ``target_terms(target_outputs) -> {name: (weight, loss)}``: more losses on the target forward
      (e.g. entropy minimisation), added to its backward. They read its main output
      (``main_output``): without target labels the auxiliary heads are not computed;
    * ``extra_terms(model) -> (loss, {name: logged value})``: one more forward of its own (e.g. the
      DACS mixed images), run under autocast and backpropagated before the optimizer step.
    ``check``: the finiteness check of every loss before the first update, ``check_finite`` (one host
    sync) unless given (``engine.cuda_graph.DeferredFiniteCheck``, on the device, for a captured step).
    """
    optimizer.zero_grad(set_to_none=True)
    if discriminator is not None:
        # The frozen pass goes through the unwrapped module: no gradients reach D's parameters,
        # so a DistributedDataParallel wrapper must not wait for them.
        frozen_discriminator = unwrap(discriminator)
        set_requires_grad(frozen_discriminator, False)
    # Forward and backward one domain at a time: the source graph is freed before the target one
    # is built, and DistributedDataParallel sees matched forward/backward pairs.
    with precision.autocast():
        source_outputs = forward_heads(model, source_images)
        loss_seg = segmentation_loss(source_outputs, source_labels)
    losses = {"loss_seg": loss_seg}
    scaler.scale(loss_seg).backward()
    # The discriminator's source map later, from the main head as returned: with the fused loss on, its
    # low-resolution logits (the full-resolution ones are never made; class_probabilities).
    source_main = main_head(source_outputs).detach()
    del source_outputs

    if discriminator is not None or target_labels is not None or target_terms is not None:
        loss_target = 0.0
        with precision.autocast():
            # The auxiliary heads only where the pseudo-label loss reads them (BiSeNet's ``aux``).
            target_outputs = forward_heads(model, target_images, aux=target_labels is not None)
            if discriminator is not None:
                # One float32 softmax, shared by the adversarial and the discriminator losses (with the
                # fused loss on, upsampled from the low-resolution logits in the same kernel).
                target_probabilities = class_probabilities(main_head(target_outputs))
                losses["loss_adv"] = domain_loss(frozen_discriminator, target_probabilities, SOURCE_DOMAIN)
                loss_target = lambda_adv * losses["loss_adv"]
            if target_labels is not None:
                losses["loss_pseudo"] = segmentation_loss(target_outputs, target_labels)
                loss_target = loss_target + losses["loss_pseudo"]
            for name, (weight, loss) in (target_terms(target_outputs) if target_terms is not None else {}).items():
                losses[name] = loss
                loss_target = loss_target + weight * loss
        scaler.scale(loss_target).backward()
        del target_outputs
    if extra_terms is not None:
        with precision.autocast():
            loss_extra, logged = extra_terms(model)
        losses.update(logged)
        scaler.scale(loss_extra).backward()
    checked = losses
    if discriminator is not None:
        # The discriminator's loss reads detached maps and D's own weights, which the segmentation
        # update does not touch: computed before that update and checked with every other loss, a
        # non-finite value refuses the whole step, segmentation included, instead of half of it.
        loss_d = discriminator_loss(discriminator, optimizer_d, precision, source_main, target_probabilities)
        checked = {**losses, "loss_d": loss_d}
    # One finiteness check (one host sync) for the whole step, before the first update: the
    # backward passes before it only fill gradients, which a refused step discards (and the
    # buffers they moved are restored by the loop), so checking each term before its backward
    # would only add syncs, each stalling the device's queue.
    (check_finite if check is None else check)(checked)
    scaler.step(optimizer)
    scaler.update()

    if discriminator is not None:
        losses["loss_d"] = discriminator_update(optimizer_d, scaler_d, loss_d)
    return {name: value.detach() for name, value in losses.items()}


def discriminator_loss(discriminator, optimizer, precision, source_logits, target_probabilities):
    """AdaptSegNet's discriminator loss on detached maps: source -> source label, target -> target
    label, mean of the two BCE terms. ``source_logits``: the source main head, a full-resolution
    tensor or ``LowResLogits`` (softmax by ``class_probabilities``). Not checked here: the caller
    checks it with its own losses, in one sync, before any update (``discriminator_update`` follows)."""
    set_requires_grad(unwrap(discriminator), True)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        source_probabilities = class_probabilities(source_logits.detach())
        loss_d = 0.5 * (domain_loss(discriminator, source_probabilities, SOURCE_DOMAIN)
                        + domain_loss(discriminator, target_probabilities.detach(), TARGET_DOMAIN))
    return loss_d


def discriminator_update(optimizer, scaler, loss_d):
    """Backward and step of ``discriminator_loss``'s value. Returns the detached loss."""
    scaler.scale(loss_d).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss_d.detach()

