"""Bilinear resizing (align_corners=False), by ``F.interpolate`` or as two small matrix products.

Bilinear resizing is separable and linear: ``resize(x) = A_h @ x @ A_w^T`` per image and channel,
where row ``i`` of the interpolation matrix ``A`` (out x in) holds the two weights ``1 - l`` and
``l`` of output pixel ``i`` (both on the same input pixel at the borders). The matrix form gives the
same function with another order of the floating-point sums; its backward is two matrix products
(``A^T @ grad``) where ``F.interpolate``'s backward scatters with atomic adds on a GPU. The matrices
are ``F.interpolate``'s own weights, read off by resizing an identity, so both forms agree on every
coefficient; they are built once per (in, out, device, dtype) and cached.
"""
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn


def is_channels_last(tensor):
    """Whether a 4-D tensor is laid out channels_last and not also contiguous (C = 1 or H = W = 1
    tensors are both; they are read as contiguous)."""
    return not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)


def _build_interpolation_matrix(in_size, out_size, device, dtype):
    # Column j is the resize of the unit vector e_j: exactly the weights F.interpolate applies.
    basis = torch.eye(in_size, device=device, dtype=torch.float32).view(1, in_size, 1, in_size)
    weights = F.interpolate(basis, size=(1, out_size), mode="bilinear", align_corners=False)
    return weights.view(in_size, out_size).t().contiguous().to(dtype)


@functools.lru_cache(maxsize=128)
def interpolation_matrix(in_size, out_size, device, dtype):
    """The (out_size, in_size) matrix of 1-D bilinear resizing (align_corners=False) on ``device``,
    built once. Outside inference mode and without autograd, so one cached matrix serves every later
    call (a tensor made under ``torch.inference_mode`` could not be saved for a backward pass)."""
    with torch.inference_mode(False), torch.no_grad():
        return _build_interpolation_matrix(in_size, out_size, device, dtype)


def _matrix(in_size, out_size, device, dtype):
    if in_size == out_size:
        return None  # the identity: that axis is left as it is
    if torch.compiler.is_compiling():  # traced into the graph (Dynamo would bypass the cache anyway)
        return _build_interpolation_matrix(in_size, out_size, device, dtype)
    return interpolation_matrix(in_size, out_size, device, dtype)


def _width_first(in_h, in_w, out_h, out_w):
    """Whether resizing the width first costs fewer multiply-adds than the height first."""
    return in_h * out_w * (in_w + out_h) <= out_h * in_w * (in_h + out_w)


def bilinear_matmul(x, size):
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of a (B, C, H, W) tensor as
    two matrix products.

    Each product keeps the big operand in one piece (a plain mm, or a bmm over the batch only):
    torch.matmul of a matrix with a many-batch tensor would first copy the matrix once per batch
    entry. NCHW: the width as ``x @ A_w^T`` (one mm), the height as ``A_h @ x`` (per image and
    channel), in the cheaper order. channels_last, computed as the (B, H, W, C) array it is: the
    width first (one mm over all rows, through a transposed copy of the smaller map), then the
    height as ``A_h @ (B, H, W'C)``, which writes the output channels_last directly (the class-last
    loss of ``engine.steps`` reads it so)."""
    batch, channels, in_h, in_w = x.shape
    out_h, out_w = (int(s) for s in size)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    rows = _matrix(in_h, out_h, x.device, dtype)  # (out_h, in_h), or None
    cols = _matrix(in_w, out_w, x.device, dtype)  # (out_w, in_w), or None
    if is_channels_last(x):
        y = x.permute(0, 2, 3, 1)                                             # (B, H, W, C), contiguous
        if cols is not None:
            y = torch.einsum("vw,bhwc->bhvc", cols, y)                        # (B, H, W', C)
        if rows is not None:
            y = torch.matmul(rows, y.reshape(batch, in_h, -1)).view(batch, out_h, out_w, channels)
        return y.contiguous().permute(0, 3, 1, 2)                             # channels_last (B, C, H', W')

    def along_height(t):
        return t if rows is None else torch.matmul(rows, t)

    def along_width(t):
        return t if cols is None else torch.matmul(t, cols.t())

    if _width_first(in_h, in_w, out_h, out_w):
        return along_height(along_width(x))
    return along_width(along_height(x))


class BilinearResize(nn.Module):
    """Bilinear resize (align_corners=False) to a size given at call time.

    A module rather than a bare ``F.interpolate`` so FLOP counters (thop) can see it: the
    project's complexity table counts bilinear upsampling like ``nn.Upsample`` does. ``matmul``
    (off by default; ``set_matmul_resize``) computes it as two matrix products instead: the same
    function, other rounding (docs/speed.md).
    """

    mode = "bilinear"  # read by thop's upsample counter

    def __init__(self, matmul=False):
        super().__init__()
        self.matmul = matmul

    def forward(self, x, size):
        if self.matmul:
            return bilinear_matmul(x, size)
        return F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=False)


def set_matmul_resize(module, enabled):
    """Switch every ``BilinearResize`` inside ``module`` to the matrix form (or back); returns ``module``."""
    for layer in module.modules():
        if isinstance(layer, BilinearResize):
            layer.matmul = bool(enabled)
    return module


@dataclasses.dataclass(eq=False)
class LowResLogits:
    """A head's logits before their final bilinear upsampling to ``size`` (BiSeNet ``forward(x,
    low_res=True)``, for the fused loss of ``engine.fused_loss``). ``full()`` upsamples them with the
    network's own resize (the output the network would have returned), once: the discriminator and
    any other reader of the full-resolution map get exactly that.

    A dataclass registered as a pytree node, so DistributedDataParallel (which looks for the
    output's tensors to find the parameters a loss used) and torch.compile see the logits inside."""

    logits: torch.Tensor
    size: tuple
    resize: nn.Module
    _full: torch.Tensor = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        self.size = tuple(int(s) for s in self.size)

    def full(self):
        if self._full is None:
            self._full = self.resize(self.logits, self.size)
        return self._full

    def detach(self):
        """The same logits cut from the autograd graph (as ``Tensor.detach``), not yet upsampled."""
        return LowResLogits(self.logits.detach(), self.size, self.resize)


torch.utils._pytree.register_pytree_node(
    LowResLogits, lambda item: ([item.logits], (item.size, item.resize)),
    lambda children, context: LowResLogits(children[0], *context),
    serialized_type_name="model.resize.LowResLogits")
