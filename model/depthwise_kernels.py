"""The Triton kernels of ``model.depthwise`` (read its docstring first): the depthwise 4x4 stride-2
padding-1 convolution, forward, input gradient and weight gradient.

A module of its own, imported on first use: ``triton.jit`` decides at import whether the kernels run
compiled or in Triton's CPU interpreter (TRITON_INTERPRET=1, the tests). Every kernel takes the
strides of its tensors (b, c, h, w), so any layout is read correctly; channels_last (stride_c = 1,
which Triton specialises) makes each tile's channel axis one coalesced load. Tiles are [pixels,
channels]; sums in float32; each output element is written by exactly one program (no atomics).
"""
import triton
import triton.language as tl

# The geometry the kernels compute (model.depthwise.KERNEL_SIZE, STRIDE, PADDING).
KERNEL = tl.constexpr(4)
STRIDE = tl.constexpr(2)
PADDING = tl.constexpr(1)
TAPS = tl.constexpr(16)  # KERNEL * KERNEL


@triton.jit
def pixel_block(block, items, width, height, BLOCK_P: tl.constexpr):
    """Pixel block ``block`` of a flattened (batch, height, width) range: in-range mask and the
    column, row and (int64) batch coordinates of each pixel."""
    p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    return p < items, p % width, (p // width) % height, (p // width // height).to(tl.int64)


@triton.jit
def channel_block(channels, BLOCK_C: tl.constexpr):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < channels


@triton.jit
def tile_offsets(b, row, col, c, s_b, s_c, s_h, s_w):
    """Element offsets of a [pixels, channels] tile: pixel (b, row, col), channel c."""
    return (b * s_b + row * s_h + col * s_w)[:, None] + c[None, :] * s_c


@triton.jit
def forward_kernel(x_ptr, w_ptr, y_ptr, n_out, out_h, out_w, in_h, in_w, channels,
                   sx_b, sx_c, sx_h, sx_w, sy_b, sy_c, sy_h, sy_w,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # y[b, c, oh, ow] = sum over the 16 taps of x[b, c, 2 oh - 1 + kh, 2 ow - 1 + kw] * w[c, kh, kw].
    ok, ow, oh, b = pixel_block(tl.program_id(0), n_out, out_w, out_h, BLOCK_P)
    c, c_ok = channel_block(channels, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KERNEL):
        ih = oh * STRIDE - PADDING + kh
        row_ok = ok & (ih >= 0) & (ih < in_h)
        for kw in tl.static_range(KERNEL):
            iw = ow * STRIDE - PADDING + kw
            tap_ok = row_ok & (iw >= 0) & (iw < in_w)
            x = tl.load(x_ptr + tile_offsets(b, ih, iw, c, sx_b, sx_c, sx_h, sx_w),
                        mask=tap_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c * TAPS + (kh * KERNEL + kw), mask=c_ok, other=0.0).to(tl.float32)
            acc += x * w[None, :]
    tl.store(y_ptr + tile_offsets(b, oh, ow, c, sy_b, sy_c, sy_h, sy_w), acc.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & c_ok[None, :])


@triton.jit
def input_grad_kernel(gy_ptr, w_ptr, gx_ptr, n_in, in_h, in_w, out_h, out_w, channels,
                      sg_b, sg_c, sg_h, sg_w, sx_b, sx_c, sx_h, sx_w,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # A gather: input row ih is read by tap kh of output row oh when ih = 2 oh - 1 + kh, i.e. by the
    # two taps of the parity of ih + 1 (kh = (ih + 1) % 2 and that + 2), one output row each; same
    # for the columns. So each input pixel sums 2 x 2 (output pixel, tap) pairs per channel.
    ok, iw, ih, b = pixel_block(tl.program_id(0), n_in, in_w, in_h, BLOCK_P)
    c, c_ok = channel_block(channels, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for th in tl.static_range(2):
        kh = (ih + PADDING) % STRIDE + STRIDE * th
        oh = (ih + PADDING - kh) // STRIDE  # exact: the numerator is even (and may be -2: masked)
        row_ok = ok & (oh >= 0) & (oh < out_h)
        for tw in tl.static_range(2):
            kw = (iw + PADDING) % STRIDE + STRIDE * tw
            ow = (iw + PADDING - kw) // STRIDE
            tap_ok = (row_ok & (ow >= 0) & (ow < out_w))[:, None] & c_ok[None, :]
            g = tl.load(gy_ptr + tile_offsets(b, oh, ow, c, sg_b, sg_c, sg_h, sg_w), mask=tap_ok,
                        other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c[None, :] * TAPS + (kh * KERNEL + kw)[:, None], mask=tap_ok, other=0.0)
            acc += g * w.to(tl.float32)
    tl.store(gx_ptr + tile_offsets(b, ih, iw, c, sx_b, sx_c, sx_h, sx_w), acc.to(gx_ptr.dtype.element_ty),
             mask=ok[:, None] & c_ok[None, :])


@triton.jit
def weight_grad_kernel(x_ptr, gy_ptr, partial_ptr, n_out, out_h, out_w, in_h, in_w, channels, blocks_per_program,
                       sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # First stage of a deterministic reduction: partial[program, c, tap] = sum over this program's
    # output pixels of gy[b, c, oh, ow] * x[b, c, 2 oh - 1 + kh, 2 ow - 1 + kw]; torch sums the
    # programs afterwards. The 16 taps are one axis of a [pixels, taps, channels] tile.
    c, c_ok = channel_block(channels, BLOCK_C)
    tap = tl.arange(0, TAPS)
    kh, kw = tap // KERNEL, tap % KERNEL
    acc = tl.zeros((BLOCK_P, TAPS, BLOCK_C), dtype=tl.float32)
    for i in range(0, blocks_per_program):
        ok, ow, oh, b = pixel_block(tl.program_id(0) * blocks_per_program + i, n_out, out_w, out_h, BLOCK_P)
        g = tl.load(gy_ptr + tile_offsets(b, oh, ow, c, sg_b, sg_c, sg_h, sg_w), mask=ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        ih = (oh * STRIDE - PADDING)[:, None] + kh[None, :]  # [pixels, taps]
        iw = (ow * STRIDE - PADDING)[:, None] + kw[None, :]
        tap_ok = ok[:, None] & (ih >= 0) & (ih < in_h) & (iw >= 0) & (iw < in_w)
        x = tl.load(x_ptr + (b[:, None] * sx_b + ih * sx_h + iw * sx_w)[:, :, None] + c[None, None, :] * sx_c,
                    mask=tap_ok[:, :, None] & c_ok[None, None, :], other=0.0).to(tl.float32)
        acc += x * g[:, None, :]
    total = tl.sum(acc, axis=0)  # [taps, channels]
    target = partial_ptr + (tl.program_id(0) * channels + c[None, :]).to(tl.int64) * TAPS + tap[:, None]
    tl.store(target, total, mask=c_ok[None, :])
