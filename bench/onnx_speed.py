"""onnxruntime's CPU speed beside PyTorch's for the exported inference graph (``python -m model.export``).

The same ``model.export.InferenceGraph`` (RGB 0..255 in, uint8 trainIds out: normalisation,
BiSeNet, argmax) runs in PyTorch eager (fp32, NCHW and channels_last) and, exported to ONNX
at a fixed size, in onnxruntime's CPU execution provider (all graph optimisations). Each variant is
timed with ``utils.benchmark.time_callable`` in interleaved rounds on one input batch; the median
wall-clock time and the median process CPU time are reported (with one thread the CPU time is the
compute itself, which other processes on a shared machine cannot inflate). The weights are
untrained unless --checkpoint is given: speed does not depend on them.

Example (the committed result, bench/results/onnx_speed_cpu.{json,md}):
  python bench/onnx_speed.py --size 256x128 --threads 1
"""
import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the repository importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dataset.labels import NUM_CLASSES  # noqa: E402
from dataset.normalization import get_normalization  # noqa: E402
from model import build_bisenet, load_bisenet  # noqa: E402
from model.bisenet import CONTEXT_PATHS  # noqa: E402
from model.export import INPUT_DOMAIN, INPUT_NAME, InferenceGraph, export_onnx  # noqa: E402
from utils.benchmark import device_name, load_average, time_callable, with_process_time  # noqa: E402
from utils.logger import write_json, write_text  # noqa: E402
from cli.options import format_size, positive_int, size_type  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="weights to export (default: an untrained BiSeNet)")
    parser.add_argument("--context-path", choices=CONTEXT_PATHS, default="resnet18", help="without --checkpoint")
    parser.add_argument("--size", type=size_type, default=(128, 256), help="input size WIDTHxHEIGHT")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images per call")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads of PyTorch and onnxruntime")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant and round")
    parser.add_argument("--runs", type=positive_int, default=10, help="timed calls per variant and round")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds")
    parser.add_argument("--output", default=None, help="output path without suffix (default: bench/results/onnx_speed_cpu)")
    return parser.parse_args(argv)


def make_variants(graph, images, onnx_path, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: images.numpy()}
    # A copy: Module.to converts in place, and the NCHW variant must keep NCHW weights.
    channels_last = InferenceGraph(copy.deepcopy(graph.network).to(memory_format=torch.channels_last),
                                   graph.normalization, graph.output)
    last_images = images.contiguous(memory_format=torch.channels_last)

    def torch_variant(module, batch):
        def forward():
            with torch.no_grad():
                module(batch)
        return forward

    variants = {"pytorch_eager_nchw": torch_variant(graph, images)}
    variants["pytorch_eager_channels_last"] = torch_variant(channels_last, last_images)
    variants["onnxruntime_cpu"] = lambda: session.run(None, feed)
    # Both give the same labels: the comparison is of one computation.
    with torch.no_grad():
        reference = graph(images).numpy()
    agreement = float((session.run(None, feed)[0] == reference).mean())
    return variants, agreement, onnxruntime.__version__


def markdown(result):
    lines = [f"# onnxruntime vs PyTorch on the CPU ({result['device']})", "",
             f"Command: `{result['command']}`", "",
             f"torch {result['torch']}, onnxruntime {result['onnxruntime']}, opset {result['opset']}; BiSeNet-"
             f"{result['context_path']} ({result['weights']}), input {result['size']} (WxH), batch {result['batch_size']}, "
             f"RGB 0..255 in, uint8 trainIds out; {result['threads']} thread(s); median of {result['samples']} timed "
             f"calls per variant ({result['rounds']} interleaved rounds); load average {result['load_average']}.", "",
             "| variant | median ms / call (wall) | median ms (process CPU time) | images/s (CPU time) | x PyTorch NCHW (CPU time) |",
             "|---|---|---|---|---|"]
    for name, entry in result["variants"].items():
        lines.append(f"| {name} | {entry['median_ms']:.1f} | {entry['cpu_time_ms']:.1f} | {entry['images_per_s']:.2f} | "
                     f"{entry['speedup']:.2f} |")
    lines += ["", f"onnxruntime's labels agree with PyTorch's on {100 * result['agreement']:.4f} % of pixels.", ""]
    return "\n".join(lines)


def main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        network, weights = load_bisenet(args.checkpoint), Path(args.checkpoint).name
        convention = network.checkpoint_info["input_convention"]
    else:
        network, weights, convention = build_bisenet(args.context_path, NUM_CLASSES).eval(), "untrained", "imagenet"
    graph = InferenceGraph(network, get_normalization(convention, INPUT_DOMAIN), "argmax")
    images = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (args.batch_size, 3, *args.size))
                              .astype(np.float32))
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "bisenet.onnx"
        model = export_onnx(graph, onnx_path, args.size)
        variants, agreement, ort_version = make_variants(graph, images, onnx_path, args.threads)
        wall = {name: [] for name in variants}
        cpu = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                before = len(cpu[name])
                _, samples = time_callable(with_process_time(fn, cpu[name]), torch.device("cpu"),
                                           warmup=args.warmup, runs=args.runs)
                wall[name] += samples
                del cpu[name][before:before + args.warmup]  # the timed calls only, not the warm-up ones
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    baseline = cpu_medians["pytorch_eager_nchw"]
    result = {
        "command": "python bench/onnx_speed.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python bench/onnx_speed.py",
        "device": device_name(torch.device("cpu")), "torch": torch.__version__, "onnxruntime": ort_version,
        "opset": next(opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")),
        "context_path": network.context_path_name, "weights": weights, "size": format_size(args.size),
        "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds,
        "samples": args.runs * args.rounds, "agreement": agreement, "load_average": load_average(),
        "variants": {name: {"median_ms": 1e3 * statistics.median(wall[name]), "cpu_time_ms": 1e3 * cpu_medians[name],
                            "images_per_s": args.batch_size / cpu_medians[name], "speedup": baseline / cpu_medians[name],
                            "wall_samples_s": wall[name], "cpu_time_samples_s": cpu[name]} for name in variants},
    }
    output = Path(args.output) if args.output else RESULTS / "onnx_speed_cpu"
    write_json(output.with_suffix(".json"), result)
    write_text(output.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(get_args())
