"""Training steps shared by every script: supervised, adversarial (AdaptSegNet style), helpers.

Each step takes already-collated batches on the device and returns a dict of detached loss
tensors; the loop (``utils.trainer``) decides when to synchronise with the host to log them.
"""
import torch
import torch.nn.functional as F

from dataset.labels import IGNORE_INDEX

# Domain labels of the discriminator (AdaptSegNet convention).
SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the step was not applied."""

    def __init__(self, terms):
        self.terms = terms
        super().__init__(f"non-finite loss in {', '.join(terms)}")


def unwrap(module):
    """The network inside a DistributedDataParallel (or DataParallel) wrapper."""
    return getattr(module, "module", module)


def main_output(outputs):
    """The main prediction of a BiSeNet output (a tuple in training mode, a tensor in eval)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def summed_cross_entropy(logits, labels):
    """Sum over the labeled pixels of the float32 cross-entropy (ignore 255) of [B, K, H, W] logits.

    Channels-last logits (the scripts' default, CPU and CUDA) are read class last, as the [B, H, W, K]
    view they already are: the softmax needs no transposing copy, and the gradient comes back
    channels-last, so the upsampling before the loss runs its NHWC backward (read as NCHW, the
    H100 profile of a training step, bench/results/speed_gpu_rerun.md, put those two costs at
    about a third of the step). The log-softmax and the pick of each label's entry are written
    out there: F.cross_entropy on the flattened [B*H*W, K] view runs CUDA's 2-D NLL kernels, a
    single-block reduction that took 19 ms of a 77-ms step on the H100 (bench/results/
    speed_gpu_classlast_nll.md). Either way the function is the same; only the order of the
    floating-point sums differs.
    """
    if logits.dim() == 4 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last):
        log_probs = F.log_softmax(logits.permute(0, 2, 3, 1).float(), dim=-1)  # contiguous [B, H, W, K]
        unlabeled = labels == IGNORE_INDEX
        picked = log_probs.gather(-1, labels.masked_fill(unlabeled, 0).unsqueeze(-1)).squeeze(-1)
        return -picked.masked_fill(unlabeled, 0.0).sum()
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def segmentation_loss(outputs, labels):
    """Cross-entropy (ignore 255) on the main output plus the two auxiliary outputs."""
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    # Mean over the labeled pixels, and 0 (not NaN) for a batch whose pixels are all ignored (a
    # pseudo-label batch where nothing passed the thresholds).
    labeled = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return sum(summed_cross_entropy(output, labels) / labeled for output in outputs)


def domain_loss(discriminator, probabilities, domain):
    """BCE-with-logits of the discriminator's map against a constant domain label."""
    logits = discriminator(probabilities)
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, domain, dtype=torch.float32))


def set_requires_grad(module, flag):
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def check_finite(losses):
    """One host sync per step: raise NonFiniteLossError naming the bad terms, before any update.

    Under torchrun every rank must take the same decision (a rank that skipped a step would leave
    the others waiting in DDP's gradient all-reduce), so the finite flag is MIN-reduced.
    """
    values = torch.stack([value.detach().float() for value in losses.values()])
    finite = torch.isfinite(values).all().to(torch.int32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not bool(finite):
        bad = [name for name, value in losses.items() if not torch.isfinite(value).all()]
        raise NonFiniteLossError(bad or ["another process's losses"])


def supervised_step(model, optimizer, scaler, precision, images, labels):
    """One step of labeled training (upper bound, source-only without target branch)."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = segmentation_loss(model(images), labels)
    check_finite({"seg": loss})
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss_seg": loss.detach()}


def adversarial_step(model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision,
                     source_images, source_labels, target_images, target_labels=None, lambda_adv=1e-3,
                     target_terms=None, extra_terms=None):
    """One AdaptSegNet step: segmentation (+ fooling the discriminator), then discriminator.

    * source batch: cross-entropy on the three heads;
    * target batch through the same network: ``lambda_adv`` x BCE of D(softmax(target)) against the
      *source* label, plus cross-entropy against pseudo labels when ``target_labels`` is given;
    * D is frozen during that update, then trained on detached softmax maps, source -> source
      label, target -> target label, mean of the two BCE terms.
    ``discriminator=None`` is the source-only baseline (with optional pseudo labels) in the same loop.

    Hooks for the self-training methods of ``uda/`` (the engine knows none of them):
    * ``target_terms(target_outputs) -> {name: (weight, loss)}``: more losses on the target forward
      (e.g. entropy minimisation), added to its backward;
    * ``extra_terms(model) -> (loss, {name: logged value})``: one more forward of its own (e.g. the
      DACS mixed images), run under autocast and backpropagated before the optimizer step.
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
        source_outputs = model(source_images)
        loss_seg = segmentation_loss(source_outputs, source_labels)
    losses = {"loss_seg": loss_seg}
    check_finite(losses)
    scaler.scale(loss_seg).backward()
    source_main = main_output(source_outputs).detach()
    del source_outputs

    if discriminator is not None or target_labels is not None or target_terms is not None:
        loss_target = 0.0
        with precision.autocast():
            target_outputs = model(target_images)
            if discriminator is not None:
                # One float32 softmax, shared by the adversarial and the discriminator losses.
                target_probabilities = F.softmax(main_output(target_outputs).float(), dim=1)
                losses["loss_adv"] = domain_loss(frozen_discriminator, target_probabilities, SOURCE_DOMAIN)
                loss_target = lambda_adv * losses["loss_adv"]
            if target_labels is not None:
                losses["loss_pseudo"] = segmentation_loss(target_outputs, target_labels)
                loss_target = loss_target + losses["loss_pseudo"]
            for name, (weight, loss) in (target_terms(target_outputs) if target_terms is not None else {}).items():
                losses[name] = loss
                loss_target = loss_target + weight * loss
        check_finite(losses)
        scaler.scale(loss_target).backward()
        del target_outputs
    if extra_terms is not None:
        with precision.autocast():
            loss_extra, logged = extra_terms(model)
        losses.update(logged)
        check_finite(logged)
        scaler.scale(loss_extra).backward()
    scaler.step(optimizer)
    scaler.update()

    if discriminator is not None:
        losses["loss_d"] = discriminator_step(discriminator, optimizer_d, scaler_d, precision, source_main,
                                              target_probabilities)
    return {name: value.detach() for name, value in losses.items()}


def discriminator_step(discriminator, optimizer, scaler, precision, source_logits, target_probabilities,
                       loss_name="loss_d"):
    """AdaptSegNet's discriminator step on detached maps: source -> source label, target -> target
    label, mean of the two BCE terms. Returns the detached loss."""
    set_requires_grad(unwrap(discriminator), True)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        source_probabilities = F.softmax(source_logits.detach().float(), dim=1)
        loss_d = 0.5 * (domain_loss(discriminator, source_probabilities, SOURCE_DOMAIN)
                        + domain_loss(discriminator, target_probabilities.detach(), TARGET_DOMAIN))
    check_finite({loss_name: loss_d})
    scaler.scale(loss_d).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss_d.detach()
