"""The Triton kernels of ``engine.fused_loss`` (read its docstring first).

A module of its own, imported on first use: ``triton.jit`` decides at import whether the kernels
run compiled or in Triton's CPU interpreter (TRITON_INTERPRET=1, the tests), and kernels calling
each other must be module-level globals.
"""
import triton
import triton.language as tl


@triton.jit
def interpolate(logits_ptr, base, classes, class_mask, r0, r1, rw0, rw1, c0, c1, cw0, cw1,
                stride_k, stride_h, stride_w, mask):
    # F.interpolate's sum: h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11), in float32.
    m = mask[:, None] & class_mask[None, :]
    k = classes[None, :] * stride_k
    p00 = logits_ptr + (base + r0 * stride_h + c0 * stride_w)[:, None] + k
    p01 = logits_ptr + (base + r0 * stride_h + c1 * stride_w)[:, None] + k
    p10 = logits_ptr + (base + r1 * stride_h + c0 * stride_w)[:, None] + k
    p11 = logits_ptr + (base + r1 * stride_h + c1 * stride_w)[:, None] + k
    v00 = tl.load(p00, mask=m, other=0.0).to(tl.float32)
    v01 = tl.load(p01, mask=m, other=0.0).to(tl.float32)
    v10 = tl.load(p10, mask=m, other=0.0).to(tl.float32)
    v11 = tl.load(p11, mask=m, other=0.0).to(tl.float32)
    return (rw0[:, None] * (cw0[:, None] * v00 + cw1[:, None] * v01)
            + rw1[:, None] * (cw0[:, None] * v10 + cw1[:, None] * v11))


@triton.jit
def taps(first_ptr, second_ptr, first_weight_ptr, second_weight_ptr, index, mask):
    """One axis of the stencil at output ``index``: its two input indices and their weights."""
    return (tl.load(first_ptr + index, mask=mask, other=0), tl.load(second_ptr + index, mask=mask, other=0),
            tl.load(first_weight_ptr + index, mask=mask, other=0.0),
            tl.load(second_weight_ptr + index, mask=mask, other=0.0))


@triton.jit
def tap_weight(first, second, first_weight, second_weight, index):
    """The weight of input ``index`` in a stencil (both taps on it at the last pixel: their sum)."""
    return tl.where(first == index, first_weight, 0.0) + tl.where(second == index, second_weight, 0.0)


@triton.jit
def class_lanes(num_classes, BLOCK_K: tl.constexpr):
    """The class lanes of a tile (K padded to BLOCK_K) and which of them are classes."""
    classes = tl.arange(0, BLOCK_K)
    return classes, classes < num_classes


@triton.jit
def reader_range(start_ptr, count_ptr, index, in_range):
    """The first output index whose stencil reads input ``index``, and how many do."""
    return tl.load(start_ptr + index, mask=in_range, other=0), tl.load(count_ptr + index, mask=in_range, other=0)


@triton.jit
def reader(first_ptr, second_ptr, first_weight_ptr, second_weight_ptr, start, count, step, index, in_range):
    """The ``step``-th output index whose stencil reads input ``index`` (they are ``count`` from ``start``):
    that output index, whether it exists, its stencil's taps and the weight of ``index`` in it (0 where
    it does not exist). The gathers of the backward loop over ``step``."""
    out = start + step
    ok = in_range & (step < count)
    first, second, first_weight, second_weight = taps(first_ptr, second_ptr, first_weight_ptr, second_weight_ptr,
                                                      out, ok)
    weight = tl.where(ok, tap_weight(first, second, first_weight, second_weight, index), 0.0)
    return out, ok, first, second, first_weight, second_weight, weight


@triton.jit
def class_tile(offset, classes, stride_k):
    """Element offsets of a [pixels, classes] tile: one row per pixel ``offset``, one column per class."""
    return offset[:, None] + classes[None, :] * stride_k


@triton.jit
def upsampled_logits(logits_ptr, row0_ptr, row1_ptr, roww0_ptr, roww1_ptr, col0_ptr, col1_ptr, colw0_ptr, colw1_ptr,
                     b, y, x, classes, class_mask, stride_b, stride_k, stride_h, stride_w, in_range):
    """The float32 logits of output pixels (b, y, x), interpolated from their four low-resolution
    neighbours; -inf in the classes past K (the padding of the tile), so a softmax ignores them."""
    r0, r1, rw0, rw1 = taps(row0_ptr, row1_ptr, roww0_ptr, roww1_ptr, y, in_range)
    c0, c1, cw0, cw1 = taps(col0_ptr, col1_ptr, colw0_ptr, colw1_ptr, x, in_range)
    z = interpolate(logits_ptr, b * stride_b, classes, class_mask, r0, r1, rw0, rw1, c0, c1, cw0, cw1,
                    stride_k, stride_h, stride_w, in_range)
    return tl.where(class_mask[None, :], z, float("-inf"))


@triton.jit
def program_items(items, inner, middle, BLOCK: tl.constexpr):
    """This program's block of a flattened (batch, middle, inner) range: indices, in-range mask, and
    the inner, middle and batch coordinates of each."""
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return q, q < items, q % inner, (q // inner) % middle, (q // inner // middle).to(tl.int64)


@triton.jit
def forward_kernel(logits_ptr, labels_ptr, lse_ptr, partial_ptr,
                   row0_ptr, row1_ptr, roww0_ptr, roww1_ptr, col0_ptr, col1_ptr, colw0_ptr, colw1_ptr,
                   n_pixels, out_h, out_w, num_classes, stride_b, stride_k, stride_h, stride_w, ignore_index,
                   BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    pixel, in_range, x, y, b = program_items(n_pixels, out_w, out_h, BLOCK_P)
    classes, class_mask = class_lanes(num_classes, BLOCK_K)
    z = upsampled_logits(logits_ptr, row0_ptr, row1_ptr, roww0_ptr, roww1_ptr, col0_ptr, col1_ptr, colw0_ptr,
                         colw1_ptr, b, y, x, classes, class_mask, stride_b, stride_k, stride_h, stride_w, in_range)
    peak = tl.max(z, axis=1)
    lse = peak + tl.log(tl.sum(tl.exp(z - peak[:, None]), axis=1))
    label = tl.load(labels_ptr + pixel, mask=in_range, other=ignore_index)
    labeled = in_range & (label != ignore_index)
    picked = tl.sum(tl.where(classes[None, :] == label[:, None], z, 0.0), axis=1)
    tl.store(lse_ptr + pixel, lse, mask=in_range)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(labeled, lse - picked, 0.0), axis=0))


@triton.jit
def column_pass_kernel(logits_ptr, labels_ptr, lse_ptr, partial_grad_ptr,
                       row0_ptr, row1_ptr, roww0_ptr, roww1_ptr,
                       col0_ptr, col1_ptr, colw0_ptr, colw1_ptr, col_start_ptr, col_count_ptr,
                       n_items, in_w, out_h, out_w, num_classes, stride_b, stride_k, stride_h, stride_w,
                       ignore_index, max_cols, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    # Backward, first pass: T[b, y, j, :] = sum over the output columns x reading low-resolution
    # column j of wx(x, j) * (softmax - onehot)(b, y, x, :), for every output row y. Float32,
    # [B, out_h, in_w, K] contiguous.
    q, in_range, j, y, b = program_items(n_items, in_w, out_h, BLOCK_Q)
    classes, class_mask = class_lanes(num_classes, BLOCK_K)
    r0, r1, rw0, rw1 = taps(row0_ptr, row1_ptr, roww0_ptr, roww1_ptr, y, in_range)
    col_start, col_count = reader_range(col_start_ptr, col_count_ptr, j, in_range)
    acc = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
    for dx in range(0, max_cols):
        # Output column x and column j's weight in it.
        x, ok, c0, c1, cw0, cw1, wx = reader(col0_ptr, col1_ptr, colw0_ptr, colw1_ptr, col_start, col_count, dx, j,
                                             in_range)
        pixel = (b * out_h + y) * out_w + x
        label = tl.load(labels_ptr + pixel, mask=ok, other=ignore_index)
        labeled = ok & (label != ignore_index)
        lse = tl.load(lse_ptr + pixel, mask=labeled, other=0.0)
        z = interpolate(logits_ptr, b * stride_b, classes, class_mask, r0, r1, rw0, rw1, c0, c1, cw0, cw1,
                        stride_k, stride_h, stride_w, labeled)
        delta = tl.exp(z - lse[:, None]) - tl.where(classes[None, :] == label[:, None], 1.0, 0.0)
        weight = tl.where(labeled, wx, 0.0)
        acc += tl.where(class_mask[None, :], weight[:, None] * delta, 0.0)
    target = partial_grad_ptr + class_tile(q.to(tl.int64) * num_classes, classes, 1)
    tl.store(target, acc, mask=in_range[:, None] & class_mask[None, :])


@triton.jit
def row_pass_kernel(partial_grad_ptr, scale_ptr, grad_ptr, row0_ptr, row1_ptr, roww0_ptr, roww1_ptr,
                    row_start_ptr, row_count_ptr, n_low, in_h, in_w, out_h, num_classes,
                    gstride_b, gstride_k, gstride_h, gstride_w, max_rows,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    # Backward, second pass: grad[b, :, i, j] = scale * sum over the output rows y reading
    # low-resolution row i of wy(y, i) * T[b, y, j, :]; written once, in the logits' layout. Shared
    # by the loss (scale: the loss's upstream gradient) and the softmax (scale 1).
    q, in_range, j, i, b = program_items(n_low, in_w, in_h, BLOCK_Q)
    classes, class_mask = class_lanes(num_classes, BLOCK_K)
    row_start, row_count = reader_range(row_start_ptr, row_count_ptr, i, in_range)
    acc = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
    for dy in range(0, max_rows):
        y, ok, _, _, _, _, wy = reader(row0_ptr, row1_ptr, roww0_ptr, roww1_ptr, row_start, row_count, dy, i,
                                       in_range)  # output row y and row i's weight in it
        source = partial_grad_ptr + class_tile(((b * out_h + y) * in_w + j) * num_classes, classes, 1)
        partial = tl.load(source, mask=ok[:, None] & class_mask[None, :], other=0.0)
        acc += wy[:, None] * partial
    acc = acc * tl.load(scale_ptr)
    target = grad_ptr + class_tile(b * gstride_b + i * gstride_h + j * gstride_w, classes, gstride_k)
    tl.store(target, acc.to(grad_ptr.dtype.element_ty), mask=in_range[:, None] & class_mask[None, :])


@triton.jit
def softmax_forward_kernel(logits_ptr, probs_ptr,
                           row0_ptr, row1_ptr, roww0_ptr, roww1_ptr, col0_ptr, col1_ptr, colw0_ptr, colw1_ptr,
                           n_pixels, out_h, out_w, num_classes, stride_b, stride_k, stride_h, stride_w,
                           pstride_b, pstride_k, pstride_h, pstride_w, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    # softmax(upsampled logits) of each output pixel as F.softmax computes it (exp(z - max) / sum),
    # stored float32 in the layout of ``probs`` (its strides).
    pixel, in_range, x, y, b = program_items(n_pixels, out_w, out_h, BLOCK_P)
    classes, class_mask = class_lanes(num_classes, BLOCK_K)
    z = upsampled_logits(logits_ptr, row0_ptr, row1_ptr, roww0_ptr, roww1_ptr, col0_ptr, col1_ptr, colw0_ptr,
                         colw1_ptr, b, y, x, classes, class_mask, stride_b, stride_k, stride_h, stride_w, in_range)
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    target = probs_ptr + class_tile(b * pstride_b + y * pstride_h + x * pstride_w, classes, pstride_k)
    tl.store(target, probs, mask=in_range[:, None] & class_mask[None, :])


@triton.jit
def softmax_column_pass_kernel(probs_ptr, grad_probs_ptr, partial_grad_ptr,
                               col0_ptr, col1_ptr, colw0_ptr, colw1_ptr, col_start_ptr, col_count_ptr,
                               n_items, in_w, out_h, num_classes, pstride_b, pstride_k, pstride_h, pstride_w,
                               gstride_b, gstride_k, gstride_h, gstride_w, max_cols,
                               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    # The softmax's backward, first pass (the second is row_pass_kernel with scale 1): T[b, y, j, :] =
    # sum over the output columns x reading low-resolution column j of wx(x, j) * p * (g - sum_k g p)
    # at (b, y, x), the softmax backward of F.softmax; p the saved forward output, g its gradient,
    # both read through their strides (any layout). Float32, [B, out_h, in_w, K] contiguous.
    q, in_range, j, y, b = program_items(n_items, in_w, out_h, BLOCK_Q)
    classes, class_mask = class_lanes(num_classes, BLOCK_K)
    col_start, col_count = reader_range(col_start_ptr, col_count_ptr, j, in_range)
    acc = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
    for dx in range(0, max_cols):
        x, ok, _, _, _, _, wx = reader(col0_ptr, col1_ptr, colw0_ptr, colw1_ptr, col_start, col_count, dx, j,
                                       in_range)  # output column x and column j's weight in it
        tile = ok[:, None] & class_mask[None, :]
        p = tl.load(probs_ptr + class_tile(b * pstride_b + y * pstride_h + x * pstride_w, classes, pstride_k),
                    mask=tile, other=0.0)
        g = tl.load(grad_probs_ptr + class_tile(b * gstride_b + y * gstride_h + x * gstride_w, classes, gstride_k),
                    mask=tile, other=0.0).to(tl.float32)
        acc += wx[:, None] * (p * (g - tl.sum(g * p, axis=1)[:, None]))
    target = partial_grad_ptr + class_tile(q.to(tl.int64) * num_classes, classes, 1)
    tl.store(target, acc, mask=in_range[:, None] & class_mask[None, :])
