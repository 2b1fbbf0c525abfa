"""Time of one MPL iteration relative to one adversarial iteration (same sizes, same device).

The baseline is ``uda.adversarial.adversarial_step`` (BiSeNet + discriminator, one source and one
target batch); MPL is ``uda.meta_pseudo_labels.MPLStep`` with the same sizes, a teacher of the same
architecture and both feedback rules (pham: the student's extra step on the pseudo labels alone
and two no-grad student forwards on the source batch; course: nothing beyond the teacher's
update; see uda/mpl_feedback.py). Inputs are
random tensors already on the device, so data loading is out of the measurement. Each variant
is timed with ``utils.benchmark.time_callable`` (CUDA events on a GPU, ``perf_counter`` on the
CPU) in several interleaved rounds, so that a machine whose load drifts slows all variants
alike; the reported time is the median over every timed call. On the CPU the headline ratio uses
this process's CPU time instead of the wall clock: with one thread (the CPU default here) it is
the compute time itself, which other processes on a shared machine cannot inflate; the wall-clock
ratio is recorded next to it. The goal of the issue is a ratio of at most --goal (2.5) for the
default (pham) feedback; ``mpl_pham_no_uda`` (--uda-weight 0: no augmented view) shows what the
consistency term costs, and ``adversarial_pl`` (the same step with target pseudo labels, i.e. a
DSC + PL iteration, which is the course rule's student step) what that student alone costs.
The JSON and Markdown record the command line and OMP_NUM_THREADS.

Examples:
  python bench/mpl_cost.py                                   # CPU: bench/results/mpl_cost_cpu.{json,md}
  python bench/mpl_cost.py --device cuda --runs 30 --rounds 3  # GPU: bench/results/mpl_cost_cuda.{json,md}
"""
import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the repository importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dataset.labels import NUM_CLASSES  # noqa: E402
from model import build_bisenet, build_discriminator  # noqa: E402
from model.bisenet import CONTEXT_PATHS  # noqa: E402
from model.discriminator import DISCRIMINATORS  # noqa: E402
from utils.benchmark import device_name, load_average, time_callable, with_process_time  # noqa: E402
from cli.builders import prepare_network, resolve_fast_paths  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from uda.adversarial import adversarial_step  # noqa: E402
from utils.logger import write_json, write_text  # noqa: E402
from uda.meta_pseudo_labels import DEFAULT_UDA_WEIGHT, Learner, MPLStep, PseudoLabeler  # noqa: E402
from uda.mpl_feedback import CourseFeedback, PhamFeedback  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from cli.options import format_size, positive_int, size_type  # noqa: E402
from engine.precision import AMP_CHOICES, Precision  # noqa: E402
from bench.speedbench.config import MPL_GOAL  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOAL = MPL_GOAL  # the speed benchmark's: pham MPL iteration / adversarial iteration
LAMBDA_ADV = 1e-3


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--size", type=size_type, default=(128, 256), help="input size WIDTHxHEIGHT of both domains")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="images per domain and step")
    parser.add_argument("--context-path", choices=CONTEXT_PATHS, default="resnet18")
    parser.add_argument("--discriminator", choices=tuple(DISCRIMINATORS), default="dsc")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="auto: bf16/fp16 on CUDA, off on the CPU")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed calls before the first round")
    parser.add_argument("--runs", type=positive_int, default=3, help="timed calls per variant and round")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds over the variants")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (CPU only; 1 makes CPU time equal compute time)")
    parser.add_argument("--goal", type=float, default=GOAL, help="largest acceptable MPL/adversarial time ratio")
    parser.add_argument("--output", default=None,
                        help="results path without extension (default: bench/results/mpl_cost_<cpu|cuda>)")
    return parser.parse_args(argv)


def make_learner(args, device):
    model = prepare_network(build_bisenet(args.context_path, NUM_CLASSES), args, device)
    discriminator = build_discriminator(args.discriminator, NUM_CLASSES).to(device)
    precision = args.precision
    return Learner(model, build_optimizer("sgd", model.parameters(), 1e-3), precision.grad_scaler(), discriminator,
                   build_optimizer("adam", discriminator.parameters(), 1e-4, weight_decay=0.0), precision.grad_scaler())


def make_variants(args, device):
    """name -> a callable doing one training iteration; each variant owns its networks."""
    height, width = args.size
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(args.batch_size, 3, height, width, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size, height, width), generator=generator).to(device)
    target = torch.randn(args.batch_size, 3, height, width, generator=generator).to(device)
    if args.channels_last == "on":
        source, target = (x.contiguous(memory_format=torch.channels_last) for x in (source, target))

    target_labels = torch.randint(0, NUM_CLASSES, (args.batch_size, height, width), generator=generator).to(device)

    def adversarial_variant(with_labels):
        baseline = make_learner(args, device)
        return lambda: adversarial_step(baseline.model, baseline.discriminator, baseline.optimizer, baseline.optimizer_d,
                                        baseline.scaler, baseline.scaler_d, args.precision, source, labels, target,
                                        target_labels if with_labels else None, lambda_adv=LAMBDA_ADV)

    def mpl_variant(feedback, uda_weight=DEFAULT_UDA_WEIGHT):
        step = MPLStep(make_learner(args, device), make_learner(args, device), PseudoLabeler(NUM_CLASSES).to(device),
                       feedback.to(device), args.precision, lambda_adv=LAMBDA_ADV, uda_weight=uda_weight)
        counter = iter(range(10 ** 9))
        return lambda: step(source, labels, target, next(counter))

    return {"adversarial": adversarial_variant(False), "adversarial_pl": adversarial_variant(True),
            "mpl_pham": mpl_variant(PhamFeedback()),
            "mpl_course": mpl_variant(CourseFeedback(batches_per_epoch=1000)),
            "mpl_pham_no_uda": mpl_variant(PhamFeedback(), uda_weight=0.0)}


def measure(variants, device, args):
    """Wall-clock samples per variant (time_callable) and, on the CPU, this process's CPU time.

    CPU time is what a busy shared machine cannot inflate (other processes' load shows in wall
    time only), so on the CPU both are reported; on a GPU only the CUDA-event times mean anything.
    """
    samples = {name: [] for name in variants}
    cpu_samples = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]  # rotate who goes first
        for name in order:
            warmup = args.warmup if round_index == 0 else 1
            record = []
            _, timed = time_callable(with_process_time(variants[name], record), device, warmup=warmup, runs=args.runs)
            samples[name] += timed
            cpu_samples[name] += record[warmup:]
        print(f"[round {round_index + 1}/{args.rounds}] "
              + ", ".join(f"{name} {statistics.median(values):.3f} s" for name, values in samples.items()))
    return samples, cpu_samples


def markdown(result):
    lines = [f"# MPL iteration cost ({result['device']})", "",
             f"torch {result['torch']}, {result['context_path']} + {result['discriminator'].upper()}, "
             f"batch {result['batch_size']} per domain, {result['size']} (WxH), precision {result['precision']}, "
             f"channels_last {result['channels_last']}; median of {result['samples_per_variant']} timed calls "
             f"per variant ({result['rounds']} interleaved rounds).", "",
             f"Command: `{result['command']}` (OMP_NUM_THREADS={result['omp_num_threads']}).", "",
             "| variant | median s / iteration | x adversarial | CPU time s | x adversarial (CPU time) |",
             "|---|---|---|---|---|"]
    for name, entry in result["variants"].items():
        cpu = (f"{entry['cpu_time_s']:.4f} | {entry['cpu_time_ratio']:.2f}" if "cpu_time_s" in entry else "- | -")
        lines.append(f"| {name} | {entry['median_s']:.4f} | {entry['ratio']:.2f} | {cpu} |")
    verdict = "meets" if result["meets_goal"] else "misses"
    lines += ["", f"MPL (pham) / adversarial = **{result['ratio']:.2f}** by {result['ratio_basis']}: {verdict} the goal "
              f"of <= {result['goal']}x (wall clock: {result['wall_clock_ratio']:.2f}, load average "
              f"{result['load_average']}).", ""]
    return "\n".join(lines)


def main(args):
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.compile = "off"
    resolve_fast_paths(args, device)
    args.precision = Precision(device, args.amp)
    torch.manual_seed(0)
    variants = make_variants(args, device)
    started = time.perf_counter()
    samples, cpu_samples = measure(variants, device, args)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_samples.items()}
    result = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "context_path": args.context_path, "discriminator": args.discriminator, "batch_size": args.batch_size,
        "size": format_size(args.size), "precision": args.precision.mode, "channels_last": args.channels_last,
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "warmup": args.warmup, "runs": args.runs, "rounds": args.rounds,
        "samples_per_variant": args.runs * args.rounds,
        "variants": {name: {"median_s": medians[name], "ratio": medians[name] / medians["adversarial"],
                            "samples_s": samples[name]} for name in samples},
        "wall_clock_ratio": medians["mpl_pham"] / medians["adversarial"], "goal": args.goal,
        "load_average": load_average(),
        "command": "python " + shlex.join(sys.argv), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "wall_s": time.perf_counter() - started,
    }
    if device.type == "cpu":
        for name, entry in result["variants"].items():
            entry.update(cpu_time_s=cpu_medians[name], cpu_time_ratio=cpu_medians[name] / cpu_medians["adversarial"],
                         cpu_time_samples_s=cpu_samples[name])
        result.update(ratio=cpu_medians["mpl_pham"] / cpu_medians["adversarial"],
                      ratio_basis=f"process CPU time ({result['threads']} thread(s))")
    else:
        result.update(ratio=result["wall_clock_ratio"], ratio_basis="CUDA events")
    result["meets_goal"] = result["ratio"] <= args.goal
    output = Path(args.output) if args.output else RESULTS / f"mpl_cost_{device.type}"
    write_json(output.with_suffix(".json"), result)
    write_text(output.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(get_args())
