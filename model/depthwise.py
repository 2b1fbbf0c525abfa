"""The DSC discriminator's depthwise convolution (4x4, stride 2, padding 1, one filter per channel)
in three implementations of the same function, chosen by ``--depthwise`` (``set_depthwise``):

* ``native``: ``nn.Conv2d(groups=C)``, PyTorch's own depthwise kernels (slow backward on a GPU:
  about 10 ms of a 62 ms R18+DSC step on an H100, docs/speed.md);
* ``dense``: one dense convolution with the block-diagonal weight [C, C, 4, 4] built from the
  depthwise weight at every call (``block_diagonal``; differentiable, so the gradient reaches the
  [C, 1, 4, 4] weight: the diagonal of the dense weight's gradient). The off-diagonal terms are
  products with exact zeros, so it is the same function; the library sums in another order (fp32
  on the CPU: ~1e-7 relative), and with C times the multiply-adds it bets on cuDNN's dense kernels
  being that much faster. Numerics-changing on a GPU: under float32 cuDNN may run a dense
  convolution in TF32 (``torch.backends.cudnn.allow_tf32``, on by default), 10 bits of mantissa;
* ``triton``: Triton kernels (``model.depthwise_kernels``) as a ``torch.autograd.Function``, for
  channels_last (NHWC) activations, any batch, height, width (odd too) and channel count: the forward
  gathers each output pixel's 16 taps, channels vectorised; the input gradient is a gather too
  (each input pixel is read by exactly 2 x 2 (output pixel, tap) pairs per channel: no atomic adds);
  the weight gradient is a two-stage reduction (per-program partial sums, added by ``torch.sum``):
  deterministic. Sums in float32; fp32, bf16 and fp16 inputs; the output and input gradient have the
  input's dtype, the weight gradient the weight's. Under autocast the input is cast to the autocast
  dtype as the native convolution does, the weight is read in float32 (the native one rounds it).
  CUDA only (the tests run it in Triton's CPU interpreter, TRITON_INTERPRET=1); Triton is imported
  on first use, so machines without it never import it.

State dicts are the same for all three: the module is an ``nn.Conv2d`` with its weight [C, 1, 4, 4].
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils.triton_support import interpreted, triton_unavailable

KERNEL_SIZE, STRIDE, PADDING = 4, 2, 1  # the discriminators' geometry; the Triton kernels compute only this
DEPTHWISE_IMPLEMENTATIONS = ("native", "dense", "triton")
# Per program on a GPU: BLOCK_PIXELS x BLOCK_CHANNELS tiles (forward, input gradient), and
# WEIGHT_BLOCK_PIXELS x 16 taps x BLOCK_CHANNELS for the weight gradient, whose pixel axis is split
# into at most WEIGHT_PROGRAMS programs per channel block (the first stage's partial sums). Not timed
# (no GPU yet): chosen so that ptxas (sm_90, 4 warps, bf16 activations) neither spills nor needs more
# than 128 registers a thread (measured: 114, 64 and 111; 32-pixel tiles: 254 and 180).
BLOCK_PIXELS, BLOCK_CHANNELS, WEIGHT_BLOCK_PIXELS, WEIGHT_PROGRAMS = 16, 32, 8, 512
INTERPRETER_TILE = 1 << 18  # elements of one tile in the interpreter, whose cost is per program and operation


def block_diagonal(weight):
    """The dense [C, C, k, k] weight whose diagonal blocks are the depthwise weight [C, 1, k, k] and
    whose other entries are zero; differentiable (diag_embed's backward takes the diagonal)."""
    channels, _, kernel_h, kernel_w = weight.shape
    dense = torch.diag_embed(weight.reshape(channels, kernel_h * kernel_w).t())  # [k*k, C, C]
    return dense.permute(1, 2, 0).reshape(channels, channels, kernel_h, kernel_w)


def _kernels():
    """The Triton kernels' module, imported on first use: machines without Triton never import it."""
    import model.depthwise_kernels as kernels  # not "from model import": model/__init__ imports this module
    return kernels


def _power_of_two(n):
    return 1 << (max(int(n), 1) - 1).bit_length()


def _blocks(pixels, channels, taps=1):
    """(pixels, channels) per program. In the interpreter one program takes as much as fits a tile."""
    if not interpreted():
        return (WEIGHT_BLOCK_PIXELS if taps > 1 else BLOCK_PIXELS), BLOCK_CHANNELS
    block_c = _power_of_two(channels)
    return min(_power_of_two(pixels), max(1, INTERPRETER_TILE // (block_c * taps))), block_c


def _grid(pixels, channels, block_p, block_c):
    return max(1, -(-pixels // block_p)), max(1, -(-channels // block_c))


def _output_size(size):
    return (size + 2 * PADDING - KERNEL_SIZE) // STRIDE + 1


class _DepthwiseTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        kernels = _kernels()
        batch, channels, in_h, in_w = x.shape
        out_h, out_w = _output_size(in_h), _output_size(in_w)
        weight = weight.detach().contiguous()
        y = torch.empty(batch, channels, out_h, out_w, device=x.device, dtype=x.dtype,
                        memory_format=torch.channels_last)
        n_out = batch * out_h * out_w
        if y.numel():
            block_p, block_c = _blocks(n_out, channels)
            kernels.forward_kernel[_grid(n_out, channels, block_p, block_c)](
                x, weight, y, n_out, out_h, out_w, in_h, in_w, channels, *x.stride(), *y.stride(),
                BLOCK_P=block_p, BLOCK_C=block_c)
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        kernels = _kernels()
        x, weight = ctx.saved_tensors
        batch, channels, in_h, in_w = x.shape
        out_h, out_w = grad_y.shape[-2:]
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)  # the input's layout
            n_in = batch * in_h * in_w
            if grad_x.numel():
                block_p, block_c = _blocks(n_in, channels)
                kernels.input_grad_kernel[_grid(n_in, channels, block_p, block_c)](
                    grad_y, weight, grad_x, n_in, in_h, in_w, out_h, out_w, channels, *grad_y.stride(),
                    *grad_x.stride(), BLOCK_P=block_p, BLOCK_C=block_c)
        if ctx.needs_input_grad[1]:
            n_out = batch * out_h * out_w
            block_p, block_c = _blocks(n_out, channels, taps=KERNEL_SIZE * KERNEL_SIZE)
            pixel_blocks, channel_blocks = _grid(n_out, channels, block_p, block_c)
            per_program = -(-pixel_blocks // WEIGHT_PROGRAMS)
            programs = -(-pixel_blocks // per_program)
            partial = torch.zeros(programs, channels, KERNEL_SIZE * KERNEL_SIZE, device=x.device, dtype=torch.float32)
            if n_out:
                kernels.weight_grad_kernel[(programs, channel_blocks)](
                    x, grad_y, partial, n_out, out_h, out_w, in_h, in_w, channels, per_program, *x.stride(),
                    *grad_y.stride(), BLOCK_P=block_p, BLOCK_C=block_c)
            grad_weight = partial.sum(dim=0).view_as(weight).to(weight.dtype)  # a fixed order: deterministic
        return grad_x, grad_weight


def depthwise_triton(x, weight):
    """The depthwise 4x4 stride-2 padding-1 convolution of x [B, C, H, W] with weight [C, 1, 4, 4]
    (no bias) by the Triton kernels; output channels_last, in x's dtype (the autocast dtype under
    autocast, as ``F.conv2d``)."""
    if x.dim() != 4 or tuple(weight.shape) != (x.shape[1], 1, KERNEL_SIZE, KERNEL_SIZE):
        raise ValueError(f"expected x [B, C, H, W] and weight [C, 1, {KERNEL_SIZE}, {KERNEL_SIZE}], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    unavailable = triton_unavailable(x.device)
    if unavailable:
        raise RuntimeError(f"the Triton depthwise convolution cannot run: {unavailable}")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return _DepthwiseTriton.apply(x, weight)


class DepthwiseConv(nn.Conv2d):
    """``nn.Conv2d(C, C, 4, stride 2, padding 1, groups=C, bias=False)`` whose forward runs the
    implementation named by ``implementation`` (``set_depthwise``); native by default."""

    def __init__(self, channels):
        super().__init__(channels, channels, KERNEL_SIZE, STRIDE, PADDING, groups=channels, bias=False)
        self.implementation = "native"  # a plain attribute: not in the state_dict

    def forward(self, x):
        if self.implementation == "dense":
            return F.conv2d(x, block_diagonal(self.weight), None, self.stride, self.padding)
        if self.implementation == "triton":
            return depthwise_triton(x, self.weight)
        return super().forward(x)


def set_depthwise(module, implementation):
    """Run every ``DepthwiseConv`` inside ``module`` by ``implementation`` (one of
    DEPTHWISE_IMPLEMENTATIONS); returns ``module``."""
    if implementation not in DEPTHWISE_IMPLEMENTATIONS:
        raise ValueError(f"unknown depthwise implementation {implementation!r}; expected one of "
                         f"{DEPTHWISE_IMPLEMENTATIONS}")
    for layer in module.modules():
        if isinstance(layer, DepthwiseConv):
            layer.implementation = implementation
    return module
