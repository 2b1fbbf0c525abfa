"""Export a checkpoint's inference graph to ONNX and check it against PyTorch with onnxruntime.

  python -m model.export --checkpoint runs/dsc/best.pth --onnx bisenet.onnx --size 1024x512
  python -m model.export --checkpoint runs/dsc/best.pth --onnx bisenet.onnx --dynamic-size --output softmax

The graph takes ``image``: float32 (N, 3, H, W), RGB values in 0..255. The checkpoint's input
convention (ImageNet mean/std, or the course's BGR mean subtraction) is part of the graph, so a
deployment feeds plain pixels. It returns the main head only, as ``labels`` (uint8 (N, H, W)
trainIds, --output argmax), ``probabilities`` (float32 (N, K, H, W), softmax) or ``logits``.
The batch is always dynamic; --dynamic-size makes height and width dynamic too (any size from
``MIN_DYNAMIC_SIDE``), otherwise the graph takes --size only.

After export the file is run by onnxruntime (CPU) on images of the synthetic benchmark (or
--check-images) and compared with PyTorch: the share of pixels whose class agrees must be at least
--min-agreement, and the largest logit difference is printed. The opset and the network's
description are stored in the model's metadata, and with the check's numbers in ``<OUT>.json``.

Needs torch >= 2.5 (the torch.export-based exporter), onnx, onnxscript and onnxruntime (optional in
requirements.txt, required by requirements-dev.txt); nothing of the project's training code is
imported.
"""
import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataset.normalization import get_normalization
from model.loading import load_bisenet
from utils.checkpoint import CheckpointError
from utils.files import atomic_write
from utils.sizes import format_size, size_type

OPSET = 18  # the torch.export-based exporter's own; onnxruntime >= 1.14 runs it
OUTPUTS = {"argmax": "labels", "softmax": "probabilities", "logits": "logits"}
HEAD_OPS = {"argmax": "ArgMax", "softmax": "Softmax"}  # the node whose input is the logits
INPUT_NAME = "image"
INPUT_DOMAIN = "cityscapes"  # as predict.py: a user's images are the target domain's kind
MIN_DYNAMIC_SIDE = 32  # BiSeNet's deepest stride; smaller sides leave no 1/32 feature map
MIN_AGREEMENT = 0.999
DEFAULT_SIZE = (512, 1024)  # (height, width): Cityscapes as inferred in the report
CHECK_IMAGES = 4
EXIT_USER_ERROR = 2


class InferenceGraph(nn.Module):
    """RGB 0..255 images -> the main head's labels, probabilities or logits."""

    def __init__(self, network, normalization, output="argmax"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; expected one of {tuple(OUTPUTS)}")
        self.network = network.eval()
        self.normalization = normalization
        self.output = output
        self.eval()

    def forward(self, image):
        logits = self.network(self.normalization.normalize_tensor(image))  # (N, K, H, W)
        if self.output == "argmax":
            return logits.argmax(dim=1).to(torch.uint8)  # (N, H, W) trainIds
        if self.output == "softmax":
            return logits.softmax(dim=1)
        return logits


def export_onnx(graph, path, size_hw, dynamic_size=False, opset=OPSET, metadata=None):
    """Export ``graph`` (an ``InferenceGraph``) to ``path`` atomically; return the ModelProto."""
    Dim = torch.export.Dim
    axes = {0: Dim("batch", min=1)}
    if dynamic_size:
        axes.update({2: Dim("height", min=MIN_DYNAMIC_SIDE), 3: Dim("width", min=MIN_DYNAMIC_SIDE)})
    # A batch of 2: torch.export specialises a dimension whose example size is 1.
    example = torch.rand(2, 3, *size_hw) * 255
    program = torch.onnx.export(graph, (example,), None, dynamo=True, opset_version=opset, external_data=False,
                                input_names=[INPUT_NAME], output_names=[OUTPUTS[graph.output]],
                                dynamic_shapes={INPUT_NAME: axes}, verbose=False)
    model = program.model_proto
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    atomic_write(path, lambda handle: handle.write(model.SerializeToString()))
    return model


def _session_with_logits(model, output):
    """An onnxruntime CPU session that also returns the logits (the head node's input)."""
    import onnx
    import onnxruntime

    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    if output in HEAD_OPS:
        heads = [node for node in checked.graph.node if node.op_type == HEAD_OPS[output]]
        if len(heads) != 1:
            raise RuntimeError(f"expected one {HEAD_OPS[output]} node in the exported graph, found {len(heads)}")
        checked.graph.output.append(onnx.helper.make_tensor_value_info(heads[0].input[0], onnx.TensorProto.FLOAT, None))
    return onnxruntime.InferenceSession(checked.SerializeToString(), providers=["CPUExecutionProvider"])


def synthetic_images(count):
    """The first ``count`` val images of the synthetic benchmark, rendered in memory."""
    from dataset.synthetic import render_sample

    return [render_sample("target", split="val", index=index)[0] for index in range(count)]


def read_images(pattern, count):
    """Up to ``count`` RGB images from a folder or a glob pattern."""
    from PIL import Image

    paths = sorted(Path(pattern).glob("*")) if Path(pattern).is_dir() else sorted(map(Path, glob.glob(pattern)))
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError:
            continue  # not an image: the check needs only a few
        if len(images) == count:
            break
    if not images:
        raise CheckpointError(f"--check-images {pattern}: no readable images")
    return images


def _to_input(image, size_hw):
    """(1, 3, H, W) float32 in 0..255; resized BILINEAR to ``size_hw`` when given."""
    from PIL import Image

    if size_hw is not None and image.shape[:2] != tuple(size_hw):
        image = np.asarray(Image.fromarray(image).resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float()


@torch.no_grad()
def check_onnx(model, graph, images, size_hw=None):
    """Compare onnxruntime with PyTorch on ``images`` (each resized to ``size_hw`` when given).

    Returns the pixel agreement of the classes, the largest logit difference and, for a softmax
    or logits graph, the largest difference of the output itself.
    """
    session = _session_with_logits(model, graph.output)
    agreeing = pixels = 0
    logit_difference = output_difference = 0.0
    for image in images:
        batch = _to_input(image, size_hw)
        results = session.run(None, {INPUT_NAME: batch.numpy()})
        logits = graph.network(graph.normalization.normalize_tensor(batch)).numpy()
        onnx_logits = results[-1]
        onnx_classes = results[0] if graph.output == "argmax" else onnx_logits.argmax(axis=1)
        agreeing += int((onnx_classes == logits.argmax(axis=1)).sum())
        pixels += onnx_classes.size
        logit_difference = max(logit_difference, float(np.abs(onnx_logits - logits).max()))
        if graph.output != "argmax":
            output_difference = max(output_difference, float(np.abs(results[0] - graph(batch).numpy()).max()))
    return {"images": len(images), "pixels": pixels, "agreement": agreeing / pixels,
            "max_logit_difference": logit_difference, "max_output_difference": output_difference}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (this project's or the course repository's)")
    parser.add_argument("--onnx", required=True, help="where the .onnx file goes")
    parser.add_argument("--network", default="model", help="which network of a multi-network checkpoint (MPL: teacher)")
    parser.add_argument("--size", type=size_type, default=DEFAULT_SIZE,
                        help="input size WIDTHxHEIGHT, as the project writes sizes (default 1024x512); with "
                             "--dynamic-size only the example traced")
    parser.add_argument("--dynamic-size", action="store_true", help="accept any height and width (>= 32)")
    parser.add_argument("--output", choices=tuple(OUTPUTS), default="argmax",
                        help="graph output: argmax = uint8 trainIds, softmax = probabilities, logits")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset")
    parser.add_argument("--check-images", default=None, metavar="PATH",
                        help="folder or glob of images for the check (default: the synthetic benchmark's val images)")
    parser.add_argument("--check-count", type=int, default=CHECK_IMAGES, help="how many images the check uses")
    parser.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                        help="smallest share of pixels whose class must agree with PyTorch")
    args = parser.parse_args(argv)
    if args.check_count < 1:
        parser.error(f"--check-count must be at least 1, got {args.check_count}")
    if not 0.0 <= args.min_agreement <= 1.0:
        parser.error(f"--min-agreement must be in [0, 1], got {args.min_agreement}")
    return args


def main(args):
    target = Path(args.onnx)
    if target.is_dir():
        raise CheckpointError(f"--onnx {target} is a folder; expected the path of the .onnx file to write")
    network = load_bisenet(args.checkpoint, key=args.network)
    info = network.checkpoint_info
    if info["num_classes"] > 255 and args.output == "argmax":
        raise CheckpointError(f"{info['num_classes']} classes do not fit the uint8 labels of --output argmax")
    graph = InferenceGraph(network, get_normalization(info["input_convention"], INPUT_DOMAIN), args.output)
    metadata = {"checkpoint": Path(args.checkpoint).name, "network": args.network, "opset": args.opset,
                "context_path": info["context_path"], "num_classes": info["num_classes"],
                "input_convention": info["input_convention"], "output": args.output,
                "input": "float32 (N, 3, H, W) RGB 0..255",
                "size": "dynamic" if args.dynamic_size else format_size(args.size)}
    model = export_onnx(graph, target, args.size, args.dynamic_size, args.opset, metadata)
    images = read_images(args.check_images, args.check_count) if args.check_images else synthetic_images(args.check_count)
    check = check_onnx(model, graph, images, size_hw=None if args.dynamic_size else args.size)
    report = {**metadata, "onnx": str(target), "check": check, "passed": check["agreement"] >= args.min_agreement}
    atomic_write(target.with_suffix(target.suffix + ".json"),
                 lambda handle: handle.write((json.dumps(report, indent=2) + "\n").encode()))
    print(f"[export] {target}: BiSeNet-{info['context_path']}, {info['num_classes']} classes, opset {args.opset}, "
          f"output {OUTPUTS[args.output]} ({args.output}), input {metadata['size']}, "
          f"{info['input_convention']} convention in the graph")
    print(f"[export] onnxruntime vs PyTorch on {check['images']} images: {100 * check['agreement']:.4f} % of "
          f"{check['pixels']} pixels agree, largest logit difference {check['max_logit_difference']:.3g}"
          + (f", largest {args.output} difference {check['max_output_difference']:.3g}" if args.output != "argmax" else ""))
    if not report["passed"]:
        print(f"error: only {100 * check['agreement']:.4f} % of pixels agree (< {100 * args.min_agreement:g} %)",
              file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    args = get_args()
    try:
        main(args)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
