"""Write pseudo labels for the unlabeled Cityscapes training split from a trained BiSeNet (BDL style).

Every target image is predicted; class c's threshold is the median of the max-softmax confidence
over all pixels of the whole split predicted as c, capped at --max-threshold (0.9; a class never
predicted gets 0 and a warning). A pixel predicted as c below threshold[c] becomes 255 (ignored).
Two passes keep memory independent of the number of images: pass 1 builds per-class confidence
histograms (exact medians of the float16-rounded confidences), pass 2 writes the labels.

--per-image is the variant found in course code: each image's thresholds come from that image
alone (same median / cap / zero rule). Pass 1 still runs, for the dataset-wide pixel counts and,
for comparison, the dataset-wide thresholds.

Output (--output-dir DIR, what `trainUnsupervised.py --use-pseudolabels DIR` takes):
  DIR/<city>/<name>_pseudo_trainIds.png   trainIds 0..18, 255 = ignore, at the image's full size
  DIR/color/<city>/<name>_color.png       the same, with the Cityscapes palette
  DIR/thresholds.json                     per class: threshold, median, pixel count, kept fraction
  DIR/quality.json                        kept pixels per class; with ground truth (the synthetic
                                          benchmark has it), accuracy of all and of kept pixels
  DIR/complete.json                       written last: the folder is whole
  DIR/.histogram.pt                       pass 1's state, reused by --resume
Images are inferred at --eval-size (default: the target size) and the logits upsampled to the
image's full resolution before the softmax. Rerunning into DIR replaces everything in it;
--resume reuses pass 1 and the labels already written when model, data and settings are the
same, and ends with a folder byte-identical to an uninterrupted run's. Under torchrun each
process predicts its shard and writes its own files.

Examples:
  python createpseudolabels.py --checkpoint runs/dsc/best.pth --output-dir runs/pseudo
  python createpseudolabels.py --checkpoint runs/dsc/best.pth --output-dir runs/pseudo --resume
  python createpseudolabels.py --checkpoint runs/dsc/best.pth --output-dir runs/pseudo_tta --scales 0.75 1.0 1.25 --flip
  python createpseudolabels.py --checkpoint course.pth --data-root /data --output-dir /data/pseudo --per-image
  torchrun --nproc_per_node 4 createpseudolabels.py --checkpoint runs/dsc/best.pth --output-dir runs/pseudo --batch-size 8
  python trainUnsupervised.py --output-dir runs/dsc_pl --discriminator dsc --use-pseudolabels runs/pseudo
"""
import argparse

from dataset.common import DatasetError
from model import load_bisenet
from cli.builders import resolve_data, resolve_input_convention, target_eval_dataset
from utils.distributed import cleanup_distributed, init_distributed, is_main_process
from cli.options import add_data_args, ensure_writable_dir, make_parser, non_negative_int, positive_float, positive_int
from engine.precision import AMP_CHOICES, Precision
from uda.pseudolabel_stats import MAX_THRESHOLD
from uda.pseudolabel_files import DEFAULT_WRITER_THREADS, format_report
from uda.pseudolabels import generate_pseudo_labels
from cli.entry import run_main

NETWORKS = ("model", "teacher")


def unit_float(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def get_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (this project's or the course repository's)")
    parser.add_argument("--network", choices=NETWORKS, default="model",
                        help="which network of a multi-network checkpoint (MPL: model = student, teacher)")
    parser.add_argument("--output-dir", required=True, help="folder for the pseudo labels (then --use-pseudolabels DIR)")
    parser.add_argument("--split", default="train", help="Cityscapes split to label")
    add_data_args(parser, source=False, training=False, convention_from_checkpoint=True)
    # Inference reads the images as they are: no crop, no scale jitter, no training flips (--flip
    # below is test-time augmentation).
    parser.set_defaults(crop_size=None, scale_range=None, flip=False)
    method = parser.add_argument_group("pseudo labels")
    method.add_argument("--max-threshold", type=unit_float, default=MAX_THRESHOLD,
                        help="cap on the class thresholds (BDL: 0.9)")
    method.add_argument("--per-image", action="store_true",
                        help="thresholds from each image alone (the course-code variant) instead of the whole split")
    method.add_argument("--scales", type=positive_float, nargs="+", default=[1.0],
                        help="test-time augmentation: input scales whose softmax is averaged")
    method.add_argument("--flip", dest="tta_flip", action="store_true",
                        help="test-time augmentation: also average the horizontally flipped views")
    method.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --output-dir (reuse pass 1, skip labels already written)")
    method.add_argument("--no-quality", dest="quality", action="store_false",
                        help="do not read the split's ground truth to measure the pseudo labels' accuracy")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass (per process)")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    runtime.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    runtime.add_argument("--writer-threads", type=non_negative_int, default=DEFAULT_WRITER_THREADS,
                         help="threads encoding PNGs while the next batch is predicted (0: write inline)")
    runtime.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.skip_bad:
        parser.error("--skip-bad is not supported here: every target image needs its pseudo label")
    return args


def pseudo_label_dataset(args):
    """The split to label, with its ground truth when it has one (for the quality report only)."""
    if args.quality:
        try:
            return target_eval_dataset(args, split=args.split, labeled=True)
        except DatasetError as error:
            print(f"[pseudo] no ground truth for split {args.split!r}, quality not measured ({error})")
    return target_eval_dataset(args, split=args.split, labeled=False)


def main(args):
    device = init_distributed(args.device)
    model = load_bisenet(args.checkpoint, map_location="cpu", key=args.network)
    info = model.checkpoint_info
    resolve_input_convention(args, model, "pseudo")
    resolve_data(args, need_source=False, training=False)
    if is_main_process():
        ensure_writable_dir(args.output_dir, "--output-dir")
    dataset = pseudo_label_dataset(args)
    precision = Precision(device, args.amp)
    metadata = {"checkpoint": str(args.checkpoint), "network": args.network, "format": info["format"],
                "context_path": info["context_path"], "target_root": str(args.target_root), "split": args.split,
                "eval_size": list(args.eval_size), "input_convention": args.input_convention}
    if is_main_process():
        print(f"[pseudo] {len(dataset)} images of {args.target_root} ({args.split}) inferred at "
              f"{args.eval_size[1]}x{args.eval_size[0]} on {device}, precision {precision.mode}, "
              f"{'per-image' if args.per_image else 'dataset-wide'} thresholds capped at {args.max_threshold}")
    result = generate_pseudo_labels(
        model.to(device), dataset, args.output_dir, device, num_classes=info["num_classes"], per_image=args.per_image,
        max_threshold=args.max_threshold, precision=precision, scales=args.scales, flip=args.tta_flip,
        batch_size=args.batch_size, num_workers=args.workers, resume=args.resume, progress=args.progress,
        writer_threads=args.writer_threads, metadata=metadata)
    if is_main_process():
        print(format_report(result["thresholds"], result["quality"]))
        print(f"[pseudo] done: {args.output_dir} (train with --use-pseudolabels {args.output_dir})")
    cleanup_distributed()
    return result


if __name__ == "__main__":
    run_main(main, get_args)
