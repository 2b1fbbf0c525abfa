"""Command line: ``python -m dataset.synthetic --out DIR [--seed N] [--num-source N] ...``."""
import argparse

from dataset.synthetic.constants import (DEFAULT_NUM_SOURCE, DEFAULT_NUM_TARGET_TRAIN, DEFAULT_NUM_TARGET_VAL,
                                         DEFAULT_SEED, MARKER_NAME)
from dataset.synthetic.writer import generate_benchmark


def get_args_parser():
    parser = argparse.ArgumentParser(
        prog="python -m dataset.synthetic",  # not "__main__.py", which argparse would take from sys.argv[0]
        description="Generate the built-in synthetic GTA5-like -> Cityscapes-like benchmark (deterministic for "
                    "a seed, whatever the number of workers).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (receives GTA5/, Cityscapes/ and "
                                                     f"{MARKER_NAME})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the whole benchmark")
    parser.add_argument("--num-source", type=int, default=DEFAULT_NUM_SOURCE,
                        help="GTA5-like images (the last 10%% form val.txt)")
    parser.add_argument("--num-target-train", type=int, default=DEFAULT_NUM_TARGET_TRAIN,
                        help="Cityscapes-like train images (used without labels for adaptation)")
    parser.add_argument("--num-target-val", type=int, default=DEFAULT_NUM_TARGET_VAL,
                        help="Cityscapes-like val images (for evaluation)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = generate_benchmark(args.out, seed=args.seed, num_source=args.num_source,
                             num_target_train=args.num_target_train, num_target_val=args.num_target_val,
                             workers=args.workers, progress=not args.quiet)
    print(f"[synthetic] wrote {out}")
