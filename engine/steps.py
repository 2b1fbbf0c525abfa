"""What every training step shares: the losses, the finiteness check, the supervised step.

The methods' steps (adversarial alignment, meta pseudo labels, self-training) live in ``uda/``.

Each step takes already-collated batches on the device and returns a dict of detached loss
tensors; the loop (``engine.trainer``) decides when to synchronise with the host to log them.
"""
import contextlib

import torch
import torch.nn.functional as F

from dataset.labels import IGNORE_INDEX
from engine.fused_loss import fused_upsampled_cross_entropy, fused_upsampled_softmax
from model.resize import LowResLogits, is_channels_last


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the step was not applied."""

    def __init__(self, terms):
        self.terms = terms
        super().__init__(f"non-finite loss in {', '.join(terms)}")


def unwrap(module):
    """The network inside a DistributedDataParallel (or DataParallel) wrapper."""
    return getattr(module, "module", module)


def forward_heads(model, images, **kwargs):
    """``model(images, **kwargs)`` for the losses below: with a network's fused loss on
    (``BiSeNet.fused_loss``, --fused-loss), its heads before their last upsampling (``LowResLogits``)."""
    if getattr(unwrap(model), "fused_loss", False):
        kwargs["low_res"] = True
    return model(images, **kwargs)


def main_head(outputs):
    """The main prediction of a BiSeNet output (a tuple in training mode, a tensor in eval) as the
    network returned it: a tensor, or ``LowResLogits`` with the fused loss on."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def main_output(outputs):
    """``main_head`` as a full-resolution tensor (``LowResLogits`` upsampled, once)."""
    main = main_head(outputs)
    return main.full() if isinstance(main, LowResLogits) else main


def class_probabilities(logits):
    """The float32 softmax over the classes of [B, K, H, W] logits, contiguous: what the discriminator
    reads. ``LowResLogits`` go to the fused upsample + softmax kernel (``engine.fused_loss``): the
    full-resolution logits are never made."""
    if isinstance(logits, LowResLogits):
        return fused_upsampled_softmax(logits.logits, logits.size)
    return F.softmax(logits.float(), dim=1)


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

    ``LowResLogits`` go to the fused upsample + cross-entropy kernel (``engine.fused_loss``): the
    full-resolution logits are never made.
    """
    if isinstance(logits, LowResLogits):
        if tuple(labels.shape[-2:]) != logits.size:
            raise ValueError(f"labels of size {tuple(labels.shape[-2:])} for logits upsampled to {logits.size}")
        return fused_upsampled_cross_entropy(logits.logits, labels, IGNORE_INDEX)
    if logits.dim() == 4 and is_channels_last(logits):
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


def set_requires_grad(module, flag):
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def nonfinite_terms(losses):
    """Which of the scalar ``losses`` (a dict) are NaN or infinite: a bool tensor on their device."""
    return ~torch.isfinite(torch.stack([value.detach().float() for value in losses.values()]))


def refused_terms(names, flags):
    """The names whose flag is set; another process's losses when a step was refused for another
    rank's value alone (the flags are this rank's)."""
    return [name for name, flag in zip(names, flags) if flag] or ["another process's losses"]


def check_finite(losses, any_positive=None):
    """One host sync per step: raise NonFiniteLossError naming the bad terms, before any update.

    Under torchrun every rank must take the same decision (a rank that skipped a step would leave
    the others waiting in DDP's gradient all-reduce), so the flag is MAX-reduced (one rank's
    non-finite value refuses the step everywhere).

    ``any_positive``: a tensor whose sign a step must decide on the host as well (MPL: whether any
    rank has a confident pseudo label); decided in the same sync and collective, returned as a bool
    that is the same on every rank (None without it).
    """
    bad = nonfinite_terms(losses)
    flags = [bad.any()]
    if any_positive is not None:
        flags.append((any_positive.detach() > 0).any())
    flags = torch.stack(flags).to(torch.int32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    not_finite, *positive = flags.tolist()
    if not_finite:
        raise NonFiniteLossError(refused_terms(losses, bad.tolist()))
    return bool(positive[0]) if positive else None


@contextlib.contextmanager
def buffers_restored_on_refusal(modules):
    """Put every buffer of ``modules`` back as it was when the block raises NonFiniteLossError.

    ``check_finite`` refuses a step before any optimizer update, but the forward passes before it
    have already moved the BatchNorm running statistics (and ``num_batches_tracked``) towards a
    non-finite batch; a run that goes on after a refused step (fp16 skipping) must not keep them.
    """
    saved = [(buffer, buffer.detach().clone()) for module in modules for buffer in module.buffers()]
    try:
        yield
    except NonFiniteLossError:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        raise


def supervised_step(model, optimizer, scaler, precision, images, labels, check=None):
    """One step of labeled training (upper bound, source-only without target branch). ``check``: as
    in ``uda.adversarial.adversarial_step`` (``check_finite`` unless given)."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = segmentation_loss(forward_heads(model, images), labels)
    (check_finite if check is None else check)({"loss_seg": loss})
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss_seg": loss.detach()}


