"""Segment your own images or videos with a trained BiSeNet checkpoint.

--input is an image, a folder (searched recursively), a glob pattern (quote it) or a video file.
For images it writes, under --output-dir, with each input's relative path and a .png suffix:
  color/    the prediction in the Cityscapes palette
  overlay/  the image blended with that mask (--alpha)
  labels/   the label map: trainIds 0..18 (--ids train) or Cityscapes label ids (--ids cityscapes,
            what eval.py --save-predictions writes for cityscapesscripts)
For a video: <name>_color.mp4 and <name>_overlay.mp4 at the input's frame rate (H.264), and the
label frames under labels/<name>/ only when --outputs names labels.

Images of any size are padded to a multiple of 32 and the prediction cropped back, or resized to
--size WIDTHxHEIGHT with the prediction upsampled to the original size (as eval.py --eval-size).
The network and its input convention come from the checkpoint (--network teacher: an MPL run's
teacher). Runs on CUDA with eval.py's fast path (bf16 autocast, channels_last, optional compile).

Examples:
  python predict.py --checkpoint runs/dsc/best.pth --input photos/ --output-dir predictions/
  python predict.py --checkpoint runs/dsc/best.pth --input 'drive/**/*.jpg' --output-dir out --size 1024x512
  python predict.py --checkpoint runs/dsc/best.pth --input dashcam.mp4 --output-dir out --batch-size 8
"""
from model import load_bisenet
from dataset.normalization import CONVENTIONS, get_normalization
from cli.builders import maybe_compile, prepare_network, resolve_fast_paths, resolve_input_convention
from cli.entry import run_main
from utils.distributed import resolve_device
from cli.options import add_inference_runtime_args, make_parser, non_negative_int, positive_int, size_type, unit_interval
from engine.precision import Precision
from engine.predict import (ID_CHOICES, OUTPUT_KINDS, VIDEO_OUTPUT_KINDS, Predictor, ResultWriter, check_output_dir,
                           find_inputs, predict_images, predict_video, skipped_report)
from dataset.video import VideoReader

# The convention's per-domain statistics: a user's street images are the target domain's kind.
INPUT_DOMAIN = "cityscapes"


def get_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (this project's or the course repository's)")
    parser.add_argument("--input", required=True, help="an image, a folder of images, a glob pattern or a video file")
    parser.add_argument("--output-dir", required=True, help="where the results go (created if needed)")
    parser.add_argument("--network", default="model", help="which network of a multi-network checkpoint (MPL: model = student, teacher)")
    parser.add_argument("--outputs", nargs="+", choices=OUTPUT_KINDS, default=None,
                        help=f"what to write (default: all for images, {' and '.join(VIDEO_OUTPUT_KINDS)} for a video)")
    parser.add_argument("--ids", choices=ID_CHOICES, default="train",
                        help="label PNG values: trainIds (train) or Cityscapes label ids (cityscapes)")
    parser.add_argument("--alpha", type=unit_interval, default=0.5, help="weight of the mask in the overlay")
    parser.add_argument("--size", type=size_type, default=None,
                        help="resize to WIDTHxHEIGHT for inference (default: the image's own size, padded to a multiple of 32)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images or frames per forward pass")
    parser.add_argument("--input-convention", choices=CONVENTIONS, default=None,
                        help="input normalisation (default: the one recorded in the checkpoint)")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="image-reading worker processes")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted) instead of stopping")
    add_inference_runtime_args(parser)
    return parser.parse_args(argv)


def main(args):
    # Every input check comes before the network is loaded: a bad path fails in a second.
    output_dir = check_output_dir(args.output_dir)
    kind, inputs = find_inputs(args.input, exclude=output_dir)
    reader = VideoReader(inputs) if kind == "video" else None
    try:
        device = resolve_device(args.device)
        resolve_fast_paths(args, device)
        model = load_bisenet(args.checkpoint, map_location="cpu", key=args.network)
        resolve_input_convention(args, model, "predict")
        model = maybe_compile(prepare_network(model, args, device), args)
        predictor = Predictor(model, get_normalization(args.input_convention, INPUT_DOMAIN), device,
                              Precision(device, args.amp), channels_last=args.channels_last == "on",
                              pad=args.size is None)
        outputs = args.outputs or (VIDEO_OUTPUT_KINDS if reader else OUTPUT_KINDS)
        writer = ResultWriter(output_dir, outputs, ids=args.ids, alpha=args.alpha)
        if reader is not None:
            summary = predict_video(predictor, reader, writer, args.batch_size, args.size, args.progress)
            print(f"[predict] {summary['frames']} frames of {reader.width}x{reader.height} at "
                  f"{summary['frame_rate']:.3g} frames/s -> {', '.join(summary['videos'].values())}")
            print(f"[predict] {summary['frames_per_s']:.2f} frames/s (decoding, inference and encoding; "
                  f"{summary['seconds']:.1f} s on {device})")
        else:
            summary = predict_images(predictor, inputs, writer, args.batch_size, args.size, args.workers,
                                     args.skip_bad, args.progress)
            print(f"[predict] {summary['images']} images -> {output_dir} ({', '.join(outputs)}); "
                  f"{summary['images_per_s']:.2f} images/s on {device}")
            if summary["skipped"]:
                print(f"[predict] {skipped_report(summary['skipped'])}")
    finally:
        if reader is not None:
            reader.close()
    return summary


if __name__ == "__main__":
    run_main(main, get_args)
