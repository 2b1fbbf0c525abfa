"""Soak run on the CPU: thousands of tiny adversarial iterations; resident memory must stay flat.

Runs ``trainUnsupervised.main`` itself (real datasets, BatchStream, adversarial_step, Trainer with
its validation, checkpoints, loss log and TensorBoard writer) on a tiny GTA5/Cityscapes tree (64x36
and 64x32 images, batch 2; 8 source images, so a new epoch and DataLoader iterator every 4
iterations), and samples the process's resident set size from ``/proc/self/statm`` every
``--sample-every`` iterations. The check of the issue: RSS at the end within 5% of RSS after the
first hundred iterations. ``--workers 0`` (default) loads in the measured process, so a leak in the
datasets or transforms shows up too.

  python bench/soak.py --iterations 2000 --output bench/results/soak_cpu

writes ``soak_cpu.json`` (config, every sample, summary) and ``soak_cpu.md``.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import trainUnsupervised  # noqa: E402
from dataset.tiny import write_tiny_tree  # noqa: E402

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 2 ** 20
BASELINE_ITERATION = 100
TOLERANCE = 0.05  # the bound: final RSS within 5% of RSS after the first hundred iterations


def rss_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_BYTES / MIB


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--val-every", type=int, default=500, help="validation and last.pth every N iterations")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "soak_cpu"),
                        help="path without extension for the .json and .md results")
    return parser.parse_args(argv)


def run_soak(args, workdir):
    data = write_tiny_tree(workdir / "data")
    samples = []
    started = time.perf_counter()
    real_trainer = trainUnsupervised.Trainer

    class SampledTrainer(real_trainer):
        """The real Trainer; its step also records RSS every ``sample_every`` iterations."""

        def __init__(self, **kwargs):
            step = kwargs["step_fn"]

            def sampled_step(batches, iteration):
                losses = step(batches, iteration)
                done = iteration + 1
                if done % args.sample_every == 0 or done == 1:
                    samples.append({"iteration": done, "rss_mib": round(rss_mib(), 2),
                                    "elapsed_s": round(time.perf_counter() - started, 1)})
                    print(f"[soak] iteration {done}: RSS {samples[-1]['rss_mib']:.1f} MiB", flush=True)
                return losses

            kwargs["step_fn"] = sampled_step
            super().__init__(**kwargs)

    trainUnsupervised.Trainer = SampledTrainer
    try:
        trainUnsupervised.main(trainUnsupervised.get_args([
            "--data-root", str(data), "--output-dir", str(workdir / "run"), "--source-size", "64x36",
            "--target-size", "64x32", "--batch-size", "2", "--workers", str(args.workers), "--no-progress",
            "--discriminator", "dsc", "--max-iters", str(args.iterations), "--val-every", str(args.val_every),
            "--checkpoint-every", str(args.val_every), "--log-every", "50", "--seed", "0"]))
    finally:
        trainUnsupervised.Trainer = real_trainer
    elapsed = time.perf_counter() - started
    after_run = rss_mib()
    return samples, elapsed, after_run


def summarise(args, samples, elapsed, after_run):
    by_iteration = {sample["iteration"]: sample["rss_mib"] for sample in samples}
    baseline = by_iteration[BASELINE_ITERATION]
    final = by_iteration[args.iterations]
    later = [sample["rss_mib"] for sample in samples if sample["iteration"] >= BASELINE_ITERATION]
    return {
        "baseline_iteration": BASELINE_ITERATION,
        "baseline_rss_mib": baseline,
        "final_iteration": args.iterations,
        "final_rss_mib": final,
        "after_run_rss_mib": round(after_run, 2),
        "change_percent": round(100 * (final - baseline) / baseline, 2),
        "max_rss_mib_after_baseline": max(later),
        "max_change_percent_after_baseline": round(100 * (max(later) - baseline) / baseline, 2),
        "within_5_percent": abs(final - baseline) <= TOLERANCE * baseline,
        "elapsed_s": round(elapsed, 1),
        "iterations_per_s": round(args.iterations / elapsed, 2),
    }


def markdown(result):
    summary, config = result["summary"], result["config"]
    lines = [
        "# CPU soak run: resident memory over a long tiny training run",
        "",
        f"`python bench/soak.py --iterations {config['iterations']}`: `trainUnsupervised.main` (DSC discriminator, "
        f"source 64x36, target 64x32, batch 2, {config['workers']} DataLoader workers, {config['threads']} torch "
        f"thread(s), validation and last.pth every {config['val_every']} iterations) on "
        f"{result['environment']['machine']}, torch {result['environment']['torch']}.",
        "",
        f"* RSS after iteration {summary['baseline_iteration']}: **{summary['baseline_rss_mib']:.1f} MiB**",
        f"* RSS after iteration {summary['final_iteration']}: **{summary['final_rss_mib']:.1f} MiB** "
        f"({summary['change_percent']:+.2f}%; bound ±5%: {'met' if summary['within_5_percent'] else 'NOT met'})",
        f"* highest RSS from iteration {summary['baseline_iteration']} on: {summary['max_rss_mib_after_baseline']:.1f} MiB "
        f"({summary['max_change_percent_after_baseline']:+.2f}%)",
        f"* RSS after the run returned (final validation and checkpoint): {summary['after_run_rss_mib']:.1f} MiB",
        f"* {summary['elapsed_s']:.0f} s, {summary['iterations_per_s']:.2f} iterations/s",
        "",
        "| iteration | RSS (MiB) | elapsed (s) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {s['iteration']} | {s['rss_mib']:.1f} | {s['elapsed_s']:.0f} |" for s in result["samples"]]
    return "\n".join(lines) + "\n"


def main():
    args = get_args()
    if args.iterations < BASELINE_ITERATION or args.iterations % args.sample_every or BASELINE_ITERATION % args.sample_every:
        raise SystemExit(f"--iterations must be >= {BASELINE_ITERATION} and a multiple of --sample-every, which "
                         f"must divide {BASELINE_ITERATION}")
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="soak_"))
    try:
        samples, elapsed, after_run = run_soak(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "config": {"iterations": args.iterations, "sample_every": args.sample_every, "val_every": args.val_every,
                   "workers": args.workers, "threads": args.threads, "batch_size": 2,
                   "source_size": "64x36", "target_size": "64x32", "discriminator": "dsc"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared)"},
        "samples": samples,
        "summary": summarise(args, samples, elapsed, after_run),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["summary"]["within_5_percent"] else 1


if __name__ == "__main__":
    sys.exit(main())
