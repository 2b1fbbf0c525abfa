"""Evaluate a BiSeNet checkpoint on Cityscapes (default: the synthetic benchmark's val split).

Prints pixel accuracy, mIoU and the per-class IoU table in the report's column order, and writes
them as JSON and Markdown. Images are inferred at --eval-size and the predictions upsampled to
the label's full resolution. Reads this project's checkpoints and the old course repository's
(plain state_dict or its training checkpoint); the input convention recorded in the checkpoint
is used unless --input-convention says otherwise.

Examples:
  python eval.py --checkpoint runs/dsc/best.pth
  python eval.py --checkpoint course_model.pth --data-root /data --eval-size 1024x512 --save-predictions preds/
  python eval.py --checkpoint runs/dsc/best.pth --benchmark
  torchrun --standalone --nproc_per_node=4 eval.py --checkpoint runs/dsc/best.pth --data-root /data

Under torchrun each process scores every N-th image (no padding: an uneven split neither drops nor
repeats images), the confusion matrices are summed over processes, each process writes the
--save-predictions images of its own share, and only rank 0 prints and writes eval.json/eval.md
(and runs --benchmark).
"""
from pathlib import Path

import torch

from dataset.labels import CLASS_NAMES, NUM_CLASSES, colorize, train_ids_to_ids
from dataset.paths import cityscapes_result_name
from model import load_bisenet
from utils.benchmark import inference_throughput
from cli.builders import (make_eval_loader, maybe_compile, prepare_network, resolve_data, resolve_fast_paths,
                            resolve_input_convention, target_eval_dataset)
from utils.checkpoint import CheckpointError
from utils.distributed import cleanup_distributed, init_distributed, is_main_process
from engine.evaluate import evaluate
from utils.logger import setup_console_logging, write_json, write_png, write_text
from engine.metrics import markdown_table, scores_to_json, text_report
from cli.options import (add_data_args, add_inference_runtime_args, ensure_writable_dir, format_size, make_parser,
                         non_negative_int, positive_int, size_type)
from engine.precision import Precision
from cli.entry import run_main

RESULTS_SUBDIR = "cityscapes_results"  # label-id PNGs for cityscapesscripts (CITYSCAPES_RESULTS)
COLOR_SUBDIR = "color"


def get_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (this project's or the course repository's)")
    parser.add_argument("--network", default="model", help="which network of a multi-network checkpoint (MPL: model = student, teacher)")
    parser.add_argument("--split", default="val", help="Cityscapes split to score")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="evaluation batch size")
    parser.add_argument("--output-dir", default=None, help="where eval.json/eval.md go (default: <checkpoint folder>/eval_<split>)")
    parser.add_argument("--save-predictions", metavar="DIR", default=None,
                        help=f"write colourised predictions to DIR/{COLOR_SUBDIR}/ and official label-id result files "
                             f"to DIR/{RESULTS_SUBDIR}/ (point CITYSCAPES_RESULTS there for cityscapesscripts)")
    add_data_args(parser, source=False, training=False, convention_from_checkpoint=True)
    add_inference_runtime_args(parser)
    bench = parser.add_argument_group("speed")
    bench.add_argument("--benchmark", action="store_true", help="also measure inference speed (images/s)")
    bench.add_argument("--benchmark-size", type=size_type, default=None, help="benchmark resolution WIDTHxHEIGHT (default: --eval-size)")
    bench.add_argument("--benchmark-batches", type=positive_int, nargs="+", default=[1, 16], help="batch sizes to time")
    bench.add_argument("--benchmark-runs", type=positive_int, default=50, help="timed runs per setting (median reported)")
    bench.add_argument("--benchmark-warmup", type=non_negative_int, default=10, help="untimed warm-up runs")
    return parser.parse_args(argv)


def prediction_writer(directory, official):
    """on_batch callback of ``evaluate`` that writes colour (and official label-id) PNGs atomically."""
    directory = Path(directory)

    def on_batch(batch, prediction):
        for name, train_ids in zip(batch["name"], prediction.to(torch.uint8).cpu().numpy()):
            write_png(directory / COLOR_SUBDIR / f"{name}_color.png", colorize(train_ids))
            if official:
                write_png(directory / RESULTS_SUBDIR / cityscapes_result_name(name), train_ids_to_ids(train_ids))
    return on_batch


def main(args):
    setup_console_logging()
    device = init_distributed(args.device)
    resolve_fast_paths(args, device)
    model = load_bisenet(args.checkpoint, map_location="cpu", key=args.network)
    info = model.checkpoint_info
    if info["num_classes"] != NUM_CLASSES:  # its class i is not the dataset's train id i: the table would lie
        raise CheckpointError(f"{args.checkpoint} holds a model of {info['num_classes']} classes, but the Cityscapes "
                              f"labels have {NUM_CLASSES} ({', '.join(CLASS_NAMES[:3])}, ...); eval.py scores "
                              f"{NUM_CLASSES}-class models only")
    resolve_input_convention(args, model, "eval")
    resolve_data(args, need_source=False, training=False)
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
    if is_main_process():  # before the evaluation, not after it: a folder that cannot be written loses nothing
        ensure_writable_dir(output_dir, "--output-dir")
    if args.save_predictions:
        ensure_writable_dir(args.save_predictions, "--save-predictions")
    dataset = target_eval_dataset(args, split=args.split)
    loader = make_eval_loader(args, dataset, device, batch_size=args.batch_size)
    model = maybe_compile(prepare_network(model, args, device), args)
    precision = Precision(device, args.amp)
    writer = None
    if args.save_predictions:
        writer = prediction_writer(args.save_predictions, official=True)
    scores = evaluate(model, loader, device, num_classes=info["num_classes"], precision=precision,
                      progress=args.progress, description=f"eval {args.split}", on_batch=writer)

    result = {"checkpoint": str(args.checkpoint), "format": info["format"], "context_path": info["context_path"],
              "split": args.split, "images": len(dataset), "eval_size": format_size(args.eval_size),
              "input_convention": args.input_convention, "precision": precision.mode, **scores_to_json(scores)}
    if args.benchmark and is_main_process():  # one process times; the others would compete for the device
        height, width = args.benchmark_size or args.eval_size
        result["benchmark"] = [
            inference_throughput(model, device, batch, height, width, precision,
                                 channels_last=args.channels_last == "on", warmup=args.benchmark_warmup,
                                 runs=args.benchmark_runs)
            for batch in args.benchmark_batches]
    if is_main_process():
        print(f"\n== {args.checkpoint} on {args.split} ({len(dataset)} images, inferred at "
              f"{args.eval_size[1]}x{args.eval_size[0]}, scored at label resolution) ==")
        print(text_report(scores))
        table = markdown_table([(Path(args.checkpoint).stem, scores)])
        print("\n" + table)
        for run in result.get("benchmark", []):
            print(f"[speed] batch {run['batch_size']} at {run['width']}x{run['height']}, {run['precision']}: "
                  f"{run['images_per_s']:.1f} img/s, {run['latency_ms']:.2f} ms per call alone (medians of "
                  f"{run['runs']}, {run['device']})")
        write_json(output_dir / "eval.json", result)
        write_text(output_dir / "eval.md", table + "\n")
        print(f"[eval] wrote {output_dir / 'eval.json'} and {output_dir / 'eval.md'}")
    cleanup_distributed()
    return result


if __name__ == "__main__":
    run_main(main, get_args)
