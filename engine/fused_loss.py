"""Fused bilinear upsampling + log-softmax + NLL (ignore 255), and upsampling + softmax, as Triton
kernels (``--fused-loss``).

``fused_upsampled_cross_entropy(logits, labels)`` is

    F.cross_entropy(F.interpolate(logits.float(), labels.shape[-2:], mode="bilinear",
                                  align_corners=False), labels, ignore_index=255, reduction="sum")

for low-resolution logits [B, K, h, w] (contiguous or channels_last, fp32/bf16/fp16, read in
float32), without the full-resolution logits ever existing:

* forward: one program per block of output pixels interpolates the K logits of each pixel from
  its four low-resolution neighbours (``F.interpolate``'s weights and order of the sums), takes the
  log-sum-exp and the label's entry; it stores the log-sum-exp of each output pixel (one float per
  pixel, 1/K of the logits) and one partial sum per program, summed afterwards by ``torch.sum``;
* backward: gathers, no atomic adds. The gradient of a low-resolution logit is the sum, over
  the output pixels whose bilinear stencil reads it, of (row weight x column weight) x
  (softmax - onehot(label)). The output columns reading low-resolution column ``j`` are a
  contiguous range (the stencil's first column never decreases), likewise the rows, and the
  weights factor: a first pass sums over the columns, for each output row and low-resolution
  column (T [B, H, w, K] float32, 1/8 of the full-resolution logits for an x8 head; the softmax is
  recomputed from the stored log-sum-exp, about twice per output pixel), a second sums T over the
  rows into each low-resolution pixel. Each pass writes every element once, in a fixed order of
  sums: deterministic.

``fused_upsampled_softmax(logits, size)`` is the discriminator's input,

    F.softmax(F.interpolate(logits.float(), size, mode="bilinear", align_corners=False), dim=1),

float32 and contiguous as F.softmax returns it, from the same low-resolution logits:

* forward: per output pixel the same interpolation, then exp(z - max) / sum;
* backward: the same two gathers. The first sums, per output row and low-resolution column, the
  softmax backward p * (g - sum_k g p) of the output pixels reading that column, weighted (p the
  saved map, g its gradient, both read through their strides); the second is the loss's row pass
  with a scale of 1. No atomic adds: deterministic.

Not run on a GPU yet (no device was lent when it was written): it is tested on the CPU with
Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_fused_loss.py); the flag is off by default.
Triton is imported on first use, so machines without it never import it.
"""
import functools

import torch

from dataset.labels import IGNORE_INDEX
from model.resize import is_channels_last
from utils.triton_support import interpreted

# Items per program on a GPU; tiles are [items, K padded to a power of two], float32. Not timed (no
# device yet): chosen so that ptxas (sm_90, 4 warps, K = 19, bf16 logits) neither spills nor needs
# more than 128 registers a thread (measured: 80, 126, 123, 122 and 80; twice these blocks: 158,
# 255 with spills, 207, 232 and 148).
BLOCK_PIXELS = 32        # forward: output pixels
BLOCK_COLUMN_PASS = 16   # backward, first pass: (output row, low-resolution column) pairs
BLOCK_ROW_PASS = 32      # backward, second pass: low-resolution pixels (the softmax's second pass too)
BLOCK_SOFTMAX_PIXELS = 32        # the softmax's forward: output pixels
BLOCK_SOFTMAX_COLUMN_PASS = 16   # the softmax's backward, first pass
INTERPRETER_BLOCK = 4096


@functools.lru_cache(maxsize=64)
def axis_tables(in_size, out_size, device):
    """One axis of ``F.interpolate(mode="bilinear", align_corners=False)`` as lookup tables.

    Per output index: the two input indices and their weights, computed as ATen does it in float32
    (source = max(scale * (dst + 0.5) - 0.5, 0), first index = floor, the second one further unless
    at the last pixel, weights 1 - l and l). Per input index: the first output index whose stencil
    reads it and how many do (a contiguous range), and the largest such count (the gather's loop).
    """
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
    source = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0.0)
    first = source.floor().long().clamp(max=in_size - 1)
    second = first + (first < in_size - 1).long()
    lam = (source - first.float()).clamp(0.0, 1.0)
    inputs = torch.arange(in_size).view(-1, 1)
    reads = (first.view(1, -1) == inputs) | (second.view(1, -1) == inputs)  # (in, out)
    count = reads.sum(dim=1)  # output indices reading each input index
    start = torch.where(count > 0, reads.int().argmax(dim=1), torch.zeros_like(count))
    tables = [first, second, 1.0 - lam, lam, start, count]
    dtypes = [torch.int32, torch.int32, torch.float32, torch.float32, torch.int32, torch.int32]
    return tuple(t.to(device=device, dtype=d) for t, d in zip(tables, dtypes)) + (int(count.max()),)


def _kernels():
    """The Triton kernels' module, imported on first use: machines without Triton never import it."""
    from engine import fused_loss_kernels
    return fused_loss_kernels


def _block_classes(num_classes):
    return max(2, 1 << (int(num_classes) - 1).bit_length())


def _block(items, device_block):
    """Items per program. The interpreter's cost is per program and per operation, not per element:
    there, one program takes everything (up to INTERPRETER_BLOCK)."""
    if interpreted():
        return min(INTERPRETER_BLOCK, max(16, 1 << (max(items, 1) - 1).bit_length()))
    return device_block


def _programs(items, block):
    return max(1, -(-items // block))


def _row_pass(partial, scale, grad, rows, out_h):
    """The backward's second gather (shared by the loss and the softmax): ``grad`` [B, K, h, w], in its
    own layout, = ``scale`` x the sum of ``partial`` [B, out_h, w, K] over the output rows reading each
    low-resolution row."""
    batch, num_classes, in_h, in_w = grad.shape
    n_low = batch * in_h * in_w
    block = _block(n_low, BLOCK_ROW_PASS)
    _kernels().row_pass_kernel[(_programs(n_low, block),)](
        partial, scale, grad, *rows[:6], n_low, in_h, in_w, out_h, num_classes, *grad.stride(), rows[6],
        BLOCK_Q=block, BLOCK_K=_block_classes(num_classes))


class _FusedUpsampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        kernels = _kernels()
        batch, num_classes, in_h, in_w = logits.shape
        out_h, out_w = labels.shape[-2:]
        labels = labels.contiguous()
        rows, cols = axis_tables(in_h, out_h, logits.device), axis_tables(in_w, out_w, logits.device)
        n_pixels = batch * out_h * out_w
        block = _block(n_pixels, BLOCK_PIXELS)
        lse = torch.empty(n_pixels, device=logits.device, dtype=torch.float32)
        partial = torch.zeros(_programs(n_pixels, block), device=logits.device, dtype=torch.float32)
        if n_pixels and num_classes:
            kernels.forward_kernel[(partial.numel(),)](
                logits, labels, lse, partial, *rows[:4], *cols[:4], n_pixels, out_h, out_w, num_classes,
                *logits.stride(), ignore_index, BLOCK_P=block, BLOCK_K=_block_classes(num_classes))
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        return partial.sum()  # the per-program partial sums, added in a fixed order: deterministic

    @staticmethod
    def backward(ctx, grad_output):
        kernels = _kernels()
        logits, labels, lse = ctx.saved_tensors
        batch, num_classes, in_h, in_w = logits.shape
        out_h, out_w = labels.shape[-2:]
        rows, cols = axis_tables(in_h, out_h, logits.device), axis_tables(in_w, out_w, logits.device)
        grad = torch.zeros_like(logits)  # the logits' layout (channels_last stays channels_last)
        if not grad.numel() or not labels.numel():
            return grad, None, None
        block_k = _block_classes(num_classes)
        # Two gathers, each writing every element once: output rows x low-resolution columns first
        # (the softmax is recomputed about twice per output pixel), then low-resolution rows.
        n_items = batch * out_h * in_w
        partial = torch.empty(n_items, num_classes, device=logits.device, dtype=torch.float32)
        block = _block(n_items, BLOCK_COLUMN_PASS)
        kernels.column_pass_kernel[(_programs(n_items, block),)](
            logits, labels, lse, partial, *rows[:4], *cols[:6], n_items, in_w, out_h, out_w, num_classes,
            *logits.stride(), ctx.ignore_index, cols[6], BLOCK_Q=block, BLOCK_K=block_k)
        _row_pass(partial, grad_output.detach().float().contiguous(), grad, rows, out_h)
        return grad, None, None


def fused_upsampled_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX):
    """Sum over the labeled pixels of the float32 cross-entropy of ``logits`` [B, K, h, w] bilinearly
    upsampled (align_corners=False) to the size of ``labels`` [B, H, W]; labels lie in [0, K) or
    are ``ignore_index``. Differentiable with respect to ``logits`` (the gradient has their dtype
    and layout)."""
    if logits.dim() != 4 or labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits [B, K, h, w] and labels [B, H, W], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return _FusedUpsampledCrossEntropy.apply(logits, labels, int(ignore_index))


class _FusedUpsampledSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, size):
        batch, num_classes, in_h, in_w = logits.shape
        out_h, out_w = size
        rows, cols = axis_tables(in_h, out_h, logits.device), axis_tables(in_w, out_w, logits.device)
        # Contiguous (NCHW), as F.softmax returns it from any input layout (CPU and CUDA): the
        # discriminator gets the layout it got without the fused kernel.
        probs = torch.empty((batch, num_classes, out_h, out_w), device=logits.device, dtype=torch.float32)
        n_pixels = batch * out_h * out_w
        if n_pixels and num_classes:
            block = _block(n_pixels, BLOCK_SOFTMAX_PIXELS)
            _kernels().softmax_forward_kernel[(_programs(n_pixels, block),)](
                logits, probs, *rows[:4], *cols[:4], n_pixels, out_h, out_w, num_classes, *logits.stride(),
                *probs.stride(), BLOCK_P=block, BLOCK_K=_block_classes(num_classes))
        ctx.save_for_backward(probs)
        ctx.logits_layout = (logits.shape, logits.dtype,
                             torch.channels_last if is_channels_last(logits) else torch.contiguous_format)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        shape, dtype, layout = ctx.logits_layout
        batch, num_classes, in_h, in_w = shape
        out_h, out_w = probs.shape[-2:]
        rows, cols = axis_tables(in_h, out_h, probs.device), axis_tables(in_w, out_w, probs.device)
        grad = torch.empty(shape, device=probs.device, dtype=dtype, memory_format=layout)  # the logits' layout
        if not grad.numel() or not probs.numel():
            return grad.zero_(), None
        # Softmax backward per output pixel, gathered over the output columns reading each
        # low-resolution column, then (row_pass_kernel, scale 1) over the rows: the loss's two passes.
        n_items = batch * out_h * in_w
        partial = torch.empty(n_items, num_classes, device=probs.device, dtype=torch.float32)
        block = _block(n_items, BLOCK_SOFTMAX_COLUMN_PASS)
        _kernels().softmax_column_pass_kernel[(_programs(n_items, block),)](
            probs, grad_probs, partial, *cols[:6], n_items, in_w, out_h, num_classes, *probs.stride(),
            *grad_probs.stride(), cols[6], BLOCK_Q=block, BLOCK_K=_block_classes(num_classes))
        _row_pass(partial, torch.ones(1, device=probs.device, dtype=torch.float32), grad, rows, out_h)
        return grad, None


def fused_upsampled_softmax(logits, size):
    """``F.softmax(F.interpolate(logits.float(), size, mode="bilinear", align_corners=False), dim=1)``
    of ``logits`` [B, K, h, w] (contiguous or channels_last, any float dtype, read in float32): float32
    [B, K, *size], contiguous like F.softmax's output. Differentiable with respect to ``logits`` (the
    gradient has their dtype and layout)."""
    if logits.dim() != 4 or len(size) != 2:
        raise ValueError(f"expected logits [B, K, h, w] and an output size (H, W), got {tuple(logits.shape)} "
                         f"and {tuple(size)}")
    return _FusedUpsampledSoftmax.apply(logits, tuple(int(s) for s in size))
