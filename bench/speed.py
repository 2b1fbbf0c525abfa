"""The speed benchmark of the project: every figure of the speed issue, naive baseline and fast paths
measured side by side in one run, written as JSON and a Markdown summary.

Sections (``--only``/``--skip`` choose; all by default):

* ``inference``: images/s of BiSeNet (eval mode, random input, ``utils.benchmark.inference_throughput``)
  per shape, for the naive baseline (fp32 eager, NCHW, cuDNN autotuning off) and the levers one by
  one (cudnn.benchmark, bf16/fp16 autocast, channels_last, torch.compile default / reduce-overhead
  (CUDA graphs) / max-autotune-no-cudagraphs); each entry also reports the share of pixels whose
  argmax agrees with a strict fp32 eager reference (TF32 off) on a batch of structured scenes.
* ``training``: milliseconds per ``uda.adversarial.adversarial_step`` (BiSeNet + discriminator, source
  and target batch), naive (fp16 autocast with two GradScalers, NCHW, for-loop optimizers) against
  the levers, with the peak GPU memory; the step compiled as ``--compile on`` compiles it (static
  shapes), its compile time cold (empty cache folder) and warm (from that folder); a short loss-curve
  comparison (fp32 vs naive AMP vs ours on a fixed batch); the same step fed by the project's real
  loaders (``BatchStream`` over PNG files).
* ``pseudolabels``: images/s of the dataset-wide threshold pass (forward + softmax + max +
  ``ConfidenceHistogram.update`` on the device) against the course's routine (fp32, one image at a
  time, per-class ``np.median`` in a Python loop), and of the statistic alone.
* ``mpl``: one MPL iteration (``uda.meta_pseudo_labels.MPLStep``) over one adversarial iteration, same sizes.
* ``loader``: images/s of the project's datasets + transforms (decode, id -> trainId remap, resize,
  flip, normalise) on generated PNGs of the real sizes, in one process and with DataLoader workers.
* ``lut``: the 256-entry lookup-table remap against a per-class loop on the same label maps.
* ``flops``: GFLOPs (2 x MACs, ``torch.utils.flop_counter``; thop's count too where installed).
* ``trace``: where one adversarial and one MPL step spend their time (``torch.profiler``, top
  operators and kernels by self time on the device).

Weights: with random initialisation and BatchNorm statistics at their initial values the logits are
meaningless and nearly tied, so argmax agreement would measure noise; each context path is therefore
trained briefly on synthetic scenes first (``--prep-steps``), or loaded from ``--checkpoint``.

Timing: ``utils.benchmark.time_callable`` (CUDA events after warm-up on a GPU, ``perf_counter`` on
the CPU), median of many runs. The JSON is rewritten after every entry, so a run cut short keeps
what it measured; one failing entry records its error and the run goes on. A time budget
(``--budget-s``) skips what would not fit, expensive compilations last.

Examples:
  python bench/speed.py --profile gpu --out bench/results          # one H100 call, < 9 minutes
  python bench/speed.py --profile cpu --out bench/results          # small sizes on the CPU
  python bench/speed.py --profile gpu --only inference --no-compile
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the repository importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.speedbench.common import Job, imports_frozen  # noqa: E402
from bench.speedbench.config import PROFILES, SCHEMA, SECTIONS  # noqa: E402
from bench.speedbench.flops import flops_jobs  # noqa: E402
from bench.speedbench.inference import inference_jobs  # noqa: E402
from bench.speedbench.loader import loader_jobs  # noqa: E402
from bench.speedbench.lut import lut_jobs  # noqa: E402
from bench.speedbench.markdown import markdown  # noqa: E402
from bench.speedbench.mpl import mpl_jobs  # noqa: E402
from bench.speedbench.pseudolabels import pseudolabel_jobs  # noqa: E402
from bench.speedbench.recorder import Recorder  # noqa: E402
from bench.speedbench.state import Bench  # noqa: E402
from bench.speedbench.trace import trace_jobs, trace_tables  # noqa: E402
from bench.speedbench.training import training_jobs  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402

# What the tests and other callers use from this file, beside get_args and main.
__all__ = ["Job", "PROFILES", "Recorder", "SCHEMA", "SECTIONS", "get_args", "get_args_parser", "main", "markdown",
           "trace_tables"]

SECTION_JOBS = {"flops": flops_jobs, "inference": inference_jobs, "training": training_jobs,
                "pseudolabels": pseudolabel_jobs, "mpl": mpl_jobs, "loader": loader_jobs, "lut": lut_jobs,
                "trace": trace_jobs}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--profile", choices=("auto", *PROFILES), default="auto",
                        help="sizes and repetitions: gpu (the issue's sizes), cpu (small), toy (tests); auto: by device")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for speed_<profile>.json/.md")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=(), help="leave these sections out")
    parser.add_argument("--match", nargs="+", default=None, metavar="TEXT",
                        help="keep only the entries whose SECTION/KEY contains one of these texts (a targeted "
                             "rerun, e.g. --match /naive compile_reduce mpl/)")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile entries at all")
    parser.add_argument("--compile-train", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile training entries: auto = the profile's plan while the budget lasts, "
                             "on = every pair, off = none")
    parser.add_argument("--max-autotune", action="store_true",
                        help="also time compile mode max-autotune-no-cudagraphs (minutes of autotuning)")
    parser.add_argument("--checkpoint", default=None,
                        help="BiSeNet checkpoint for the agreement check (its context path); others are trained briefly")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting entries after this many seconds "
                                                                      "(default: the profile's, gpu 480)")
    parser.add_argument("--entry-timeout-s", type=float, default=None, help="time limit of one entry")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="where the loader's PNG files go (default: a temporary folder)")
    parser.add_argument("--keep-data", action="store_true", help="keep the generated PNG files")
    return parser


def get_args(argv=None):
    return get_args_parser().parse_args(argv)


def run_order(jobs, profile):
    """Indices of ``jobs`` in the order they run: the eager ones (phase 0) section by section in the
    profile's ``run_order``, then the compilations by priority; ties in the order they were made."""
    rank = {section: index for index, section in enumerate(profile.run_order)}
    return sorted(range(len(jobs)), key=lambda i: (jobs[i].phase, jobs[i].priority if jobs[i].phase
                                                   else rank.get(jobs[i].section, len(rank)), i))


def main(args):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[("gpu" if device.type == "cuda" else "cpu") if args.profile == "auto" else args.profile]
    args.profile = profile.name
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS) and s not in args.skip]
    recorder = Recorder(args, profile, device, args.out)
    bench = Bench(args, profile, device)
    bench.results = recorder.result
    recorder.before_write = lambda: recorder.result.__setitem__("weights", bench.weights_info())
    print(f"[speed] profile {profile.name} on {recorder.result['device']}, torch {torch.__version__}, sections "
          f"{' '.join(sections)}, budget {recorder.budget_s:.0f} s, load average {recorder.result['load_average_start']}",
          flush=True)
    jobs = []
    for section in sections:
        recorder.section(section)
        try:
            jobs += SECTION_JOBS[section](bench, recorder)
        except Exception as error:  # noqa: BLE001 - a section that cannot even be set up is recorded
            recorder.note(section, f"not run: {type(error).__name__}: {error}")
    if args.match:  # a targeted rerun: only the entries named
        jobs = [job for job in jobs if any(text in f"{job.section}/{job.key}" for text in args.match)]
    order = run_order(jobs, profile)
    try:
        with imports_frozen():
            for index in order:
                recorder.run(jobs[index])
    finally:
        bench.close()
        recorder.write(final=True)
    print(markdown(recorder.result).split("## Inference")[0], flush=True)
    print(f"[speed] wrote {Path(args.out) / f'speed_{profile.name}.json'} and .md in {recorder.elapsed():.0f} s")
    return recorder.result


if __name__ == "__main__":
    main(get_args())
