"""Peak memory of the pseudo-label passes over N = 50 and N = 500 target images (a benchmark, not a test).

The reference implementation keeps every confidence of the target set in RAM to sort it, so its
memory grows linearly with N. ``uda.pseudolabels`` keeps a fixed histogram instead; this script
checks that claim: for each N it runs ``generate_pseudo_labels`` (both passes, labels written,
quality measured against the ground truth) in a SEPARATE fresh Python process and reads that
process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). Growth from the
smallest to the largest N must stay under --max-growth (10 %).

Data: the built-in synthetic benchmark's target training split (``dataset.synthetic``, 256x512
images with gtFine labels), generated once into --data with max(--counts) images; each N runs on
a tree of symbolic links to its first N images. Model: a BiSeNet (ResNet-18) with random weights
(or --checkpoint), inferred at --eval-size, labels written at the full 256x512. DataLoader workers
are off so that the one process measured holds everything.

Examples:
  python bench/pseudolabel_memory.py
  python bench/pseudolabel_memory.py --counts 50 500 --eval-size 512x256 --threads 2
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the repository importable
    sys.path.insert(0, str(ROOT))

from cli.options import format_size, positive_int, size_type  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "pseudolabel_memory_cpu"
TARGET = "Cityscapes"
SPLIT = "train"


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=positive_int, nargs="+", default=[50, 500], help="numbers of images N")
    parser.add_argument("--data", default="/tmp/pseudolabel_memory_bench", help="work folder (data, subsets, outputs)")
    parser.add_argument("--eval-size", type=size_type, default=(128, 256), help="inference size WIDTHxHEIGHT")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads in each run")
    parser.add_argument("--checkpoint", default=None, help="BiSeNet checkpoint (default: random ResNet-18 BiSeNet)")
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed relative growth of peak RSS")
    parser.add_argument("--output", default=str(RESULTS), help="results path without extension (.json and .md)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measured run
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def cpu_model():
    """The CPU's model name (Linux), for the results file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args):
    """One measured run in this (fresh) process; prints one JSON line."""
    import torch

    from dataset.cityscapes import CityscapesDataset
    from dataset.transforms import eval_transform
    from model import build_bisenet, load_bisenet
    from uda.pseudolabels import generate_pseudo_labels

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_bisenet(args.checkpoint) if args.checkpoint else build_bisenet("resnet18", pretrained="none")
    dataset = CityscapesDataset(args.root, split=SPLIT, transform=eval_transform(args.eval_size), labeled=True)
    before = peak_rss_mib()
    start = time.perf_counter()
    result = generate_pseudo_labels(model.eval(), dataset, args.out, "cpu", batch_size=args.batch_size,
                                    num_workers=0, progress=False, log=lambda message: None)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(dataset), "peak_rss_mib": peak_rss_mib(), "peak_rss_before_run_mib": before,
                      "seconds": seconds, "images_per_s": 2 * len(dataset) / seconds,
                      "written": result["written"], "kept_fraction": result["quality"]["overall"]["kept_fraction"],
                      "accuracy_kept": result["quality"]["overall"].get("accuracy_kept")}))


def prepare_data(work, counts):
    """The synthetic target split with max(counts) images, and a symlinked subset tree per count."""
    from PIL import Image

    from dataset.synthetic import ensure_synthetic_benchmark

    data = ensure_synthetic_benchmark(work / "synthetic", num_source=0, num_target_train=max(counts),
                                      num_target_val=0, progress=False) / TARGET
    images = sorted((data / "leftImg8bit" / SPLIT).glob("*/*_leftImg8bit.png"))
    with Image.open(images[0]) as first:
        image_size = f"{first.width}x{first.height}"
    roots = {}
    for count in counts:
        root = work / "subsets" / str(count)
        for image in images[:count]:
            label = data / "gtFine" / SPLIT / image.parent.name / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
            for source, folder in ((image, "leftImg8bit"), (label, "gtFine")):
                link = root / folder / SPLIT / image.parent.name / source.name
                if not link.is_symlink():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(source)
        roots[count] = root
    return roots, image_size


def run_child(args, count, root):
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--root", str(root),
               "--out", str(Path(args.data) / "outputs" / str(count)), "--eval-size", format_size(args.eval_size),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    print(f"[bench] N = {count}: {' '.join(command)}", flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"[bench] the run with N = {count} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result):
    lines = [f"# Pseudo-label pass memory vs number of images ({result['device']}: {result['cpu']})", "",
             f"torch {result['torch']}, Python {result['python']}, BiSeNet {result['model']} at "
             f"{result['eval_size']} (labels at the images' full {result['image_size']}), batch "
             f"{result['batch_size']}, {result['threads']} thread(s), DataLoader workers off. Each N in a fresh "
             f"process; peak RSS = ru_maxrss of that process. Times depend on the machine's load (it may be shared) "
             f"and include writing the PNGs.", "",
             "| N images | peak RSS (MiB) | RSS before the passes (MiB) | time (s) | images/s (2 passes) |",
             "|---|---|---|---|---|"]
    for run in result["runs"]:
        lines.append(f"| {run['images']} | {run['peak_rss_mib']:.1f} | {run['peak_rss_before_run_mib']:.1f} | "
                     f"{run['seconds']:.1f} | {run['images_per_s']:.2f} |")
    verdict = "PASS" if result["pass"] else "FAIL"
    lines += ["", f"Peak RSS growth from N = {result['runs'][0]['images']} to N = {result['runs'][-1]['images']}: "
                  f"{100 * result['growth']:+.2f} % (limit {100 * result['max_growth']:.0f} %): **{verdict}**.", ""]
    return "\n".join(lines)


def main(args):
    import torch

    from utils.benchmark import device_name
    from utils.logger import write_json, write_text

    counts = sorted(set(args.counts))
    roots, image_size = prepare_data(Path(args.data), counts)
    runs = [run_child(args, count, roots[count]) for count in counts]
    growth = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"] - 1
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "pseudolabel_memory", "device": device_name(torch.device("cpu")), "torch": torch.__version__,
        "cpu": cpu_model(), "python": platform.python_version(), "platform": platform.platform(),
        "model": f"resnet18 ({args.checkpoint or 'random weights'})", "eval_size": format_size(args.eval_size),
        "image_size": image_size, "batch_size": args.batch_size, "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"), "runs": runs, "growth": growth, "max_growth": args.max_growth,
        "pass": growth < args.max_growth,
    }
    write_json(Path(f"{args.output}.json"), result)
    write_text(Path(f"{args.output}.md"), markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    arguments = get_args()
    if arguments.child:
        child(arguments)
    else:
        main(arguments)
