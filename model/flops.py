"""Parameters and FLOPs of the project's networks, as a Markdown table.

    python -m model.flops --height 512 --width 1024 --num-classes 19

Convention of the report: GFLOPs = 2 x the multiply-accumulates counted by thop (a multiply and
an add per MAC), bilinear resizes included as thop counts ``nn.Upsample`` (11 ops per output
element); parameters = sum of ``p.numel()``. BiSeNet is measured in eval mode (no auxiliary
heads); discriminators take a num_classes-channel map of the same size as the images.
"""
import argparse
import copy
import math
from collections import namedtuple

import torch

from dataset.labels import NUM_CLASSES
from model.bisenet import BiSeNet
from model.depthwise import DepthwiseConv
from model.resize import BilinearResize
from model.discriminator import DSCDiscriminator, FCDiscriminator

DEFAULT_HEIGHT, DEFAULT_WIDTH = 512, 1024
IMAGE_CHANNELS = 3
FLOPS_PER_MAC = 2
GIGA = 1e9
SIGNIFICANT_DIGITS = 4  # 30.89, 2.147: the precision of the report's table

# Report name -> (builder(num_classes), input channels(num_classes)).
REPORT_MODELS = {
    "bisenet-r18": (lambda k: BiSeNet(num_classes=k, context_path="resnet18"), lambda k: IMAGE_CHANNELS),
    "bisenet-r101": (lambda k: BiSeNet(num_classes=k, context_path="resnet101"), lambda k: IMAGE_CHANNELS),
    "fcd": (lambda k: FCDiscriminator(num_classes=k), lambda k: k),
    "dsc": (lambda k: DSCDiscriminator(num_classes=k), lambda k: k),
}

ComplexityRow = namedtuple("ComplexityRow", ["model", "input_shape", "params", "gflops"])


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_complexity(model, input_shape):
    """(parameters, GFLOPs) of ``model`` in eval mode for one input of shape (C, H, W) or (B, C, H, W).

    thop is imported here because not every machine has it. The count runs on a copy moved to
    the "meta" device: thop needs only shapes, so no arithmetic is done (ResNet-101 at 1024x512
    takes a fraction of a second) and the caller's model gets none of thop's buffers or hooks.
    """
    from thop import profile
    from thop.vision.basic_hooks import count_convNd, count_upsample

    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    probe = copy.deepcopy(model).to("meta").eval()
    macs, _ = profile(
        probe,
        inputs=(torch.zeros(shape, device="meta"),),
        # thop finds its counters by exact type: the nn.Conv2d subclass of DSC's depthwise layers
        # would count nothing without its own entry.
        custom_ops={BilinearResize: count_upsample, DepthwiseConv: count_convNd},
        verbose=False,
    )
    return count_parameters(model), FLOPS_PER_MAC * macs / GIGA


def complexity_table(height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH, num_classes=NUM_CLASSES, models=tuple(REPORT_MODELS)):
    """One ComplexityRow(model, input_shape, params, gflops) per report name in ``models``."""
    rows = []
    for name in models:
        if name not in REPORT_MODELS:
            raise ValueError(f"unknown model {name!r}; expected one of {tuple(REPORT_MODELS)}")
        build, channels = REPORT_MODELS[name]
        input_shape = (channels(num_classes), height, width)
        params, gflops = count_complexity(build(num_classes), input_shape)
        rows.append(ComplexityRow(name, input_shape, params, gflops))
    return rows


def format_gflops(gflops):
    """Fixed-point with SIGNIFICANT_DIGITS significant digits: 30.89, 2.147, 185.1."""
    if gflops <= 0:
        return "0"
    decimals = max(0, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(gflops)))
    return f"{gflops:.{decimals}f}"


def markdown_table(rows):
    lines = ["| Model | Input (C x H x W) | Parameters | GFLOPs |", "|---|---|---:|---:|"]
    for row in rows:
        shape = " x ".join(map(str, row.input_shape))
        lines.append(f"| {row.model} | {shape} | {row.params:,} | {format_gflops(row.gflops)} |")
    return "\n".join(lines)


def get_args_parser():
    parser = argparse.ArgumentParser(
        prog="python -m model.flops",
        description="Print parameters and GFLOPs (2 x thop MACs, eval mode, batch 1) of BiSeNet "
                    "and the discriminators as a Markdown table.",
    )
    parser.add_argument("--height", type=int, default=DEFAULT_HEIGHT, help="input height (default: %(default)s)")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="input width (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES,
                        help="classes predicted by BiSeNet = channels the discriminators take (default: %(default)s)")
    parser.add_argument("--models", nargs="+", choices=tuple(REPORT_MODELS), default=list(REPORT_MODELS),
                        help="networks to report (default: all)")
    return parser


def main(args):
    print(markdown_table(complexity_table(args.height, args.width, args.num_classes, args.models)))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
