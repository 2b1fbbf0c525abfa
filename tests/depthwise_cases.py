"""Runs the Triton depthwise kernels of model.depthwise in Triton's CPU interpreter and saves what
they computed.

tests/test_depthwise.py runs this file in a subprocess with TRITON_INTERPRET=1 (``triton.jit`` reads
it when the kernels' module is imported, so it must be set before the first import) and compares
the saved outputs and gradients with references it computes itself with F.conv2d(groups=C).
Usage: python tests/depthwise_cases.py OUT.pt
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import build_discriminator  # noqa: E402
from model.depthwise import depthwise_triton, set_depthwise  # noqa: E402
from utils.triton_support import interpreted  # noqa: E402

# name: (batch, channels, (height, width), dtype, input channels_last, upstream gradient channels_last)
CASES = {
    "even_nhwc": (2, 19, (8, 12), torch.float32, True, True),
    "odd_nhwc": (3, 24, (9, 11), torch.float32, True, True),
    "odd_rows_45": (1, 64, (45, 6), torch.float32, True, False),   # 720 / 16: 45 -> 22 rows
    "nchw_input": (2, 5, (7, 10), torch.float32, False, False),
    "wide_channels": (1, 512, (3, 5), torch.float32, True, True),  # DSC's last depthwise width
    "bf16": (2, 19, (9, 12), torch.bfloat16, True, True),
    "fp16": (1, 32, (6, 5), torch.float16, True, True),
}
# The cases run twice, to show the same bits again: the three layout pairs of input and upstream
# gradient (the same code path at every size; a second run of each case cost a third of the script).
REPEATED = ("odd_nhwc", "odd_rows_45", "nchw_input")
DSC_CLASSES, DSC_INPUT = 5, (2, 5, 32, 48)  # ndf 64: depthwise widths 5, 64, 128, 256, 512


def make_case(seed, batch, channels, size, dtype, channels_last, upstream_channels_last):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=generator).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = 0.25 * torch.randn(channels, 1, 4, 4, generator=generator)
    out_size = [(side + 2 - 4) // 2 + 1 for side in size]
    upstream = torch.randn(batch, channels, *out_size, generator=generator).to(dtype)
    if upstream_channels_last:
        upstream = upstream.contiguous(memory_format=torch.channels_last)
    return x, weight, upstream


def run_triton(x, weight, upstream):
    leaf, leaf_weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = depthwise_triton(leaf, leaf_weight)
    y.backward(upstream)
    return y.detach(), leaf.grad, leaf_weight.grad


def run_kernel_cases():
    results = {}
    for seed, (name, case) in enumerate(CASES.items()):
        x, weight, upstream = make_case(seed, *case)
        y, grad_x, grad_weight = run_triton(x, weight, upstream)
        results[name] = {"x": x, "weight": weight, "upstream": upstream, "y": y, "grad_x": grad_x,
                         "grad_weight": grad_weight}
        if name in REPEATED:
            y_again, grad_x_again, grad_weight_again = run_triton(x, weight, upstream)
            results[name].update(y_again=y_again, grad_x_again=grad_x_again, grad_weight_again=grad_weight_again)
    return results


def run_autocast_case():
    """float32 input and weight under CPU bf16 autocast: the input is cast as F.conv2d would."""
    x, weight, _ = make_case(11, 2, 19, (8, 10), torch.float32, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_triton(x, weight)
    return {"x": x, "weight": weight, "y": y}


def run_discriminator_case():
    """A whole DSCDiscriminator (five depthwise widths 5 .. 512) with --depthwise triton: its output,
    input gradient and parameter gradients for a fixed upstream gradient."""
    torch.manual_seed(0)
    discriminator = build_discriminator("dsc", num_classes=DSC_CLASSES).train()
    state = {name: value.clone() for name, value in discriminator.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(*DSC_INPUT, generator=generator).softmax(dim=1).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(DSC_INPUT[0], 1, *DSC_INPUT[2:], generator=generator)
    set_depthwise(discriminator, "triton")
    leaf = x.clone().requires_grad_()
    out = discriminator(leaf)
    out.backward(upstream)
    grads = {name: p.grad.clone() for name, p in discriminator.named_parameters()}
    return {"state": state, "x": x, "upstream": upstream, "out": out.detach(), "grad_x": leaf.grad, "grads": grads}


def main(path):
    assert os.environ.get("TRITON_INTERPRET") == "1" and interpreted()
    torch.set_num_threads(1)
    torch.save({"kernels": run_kernel_cases(), "autocast": run_autocast_case(),
                "discriminator": run_discriminator_case()}, path)


if __name__ == "__main__":
    main(sys.argv[1])
