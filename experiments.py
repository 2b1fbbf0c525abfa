"""The main job: the report's whole pipeline on the built-in synthetic benchmark, then its tables.

For each seed, at a size that fits a laptop CPU: the supervised upper bound and source only (from
scratch); then, each fine-tuning the source-only model for as long: the control (source only,
continued), adversarial FCD and DSC; pseudo labels from the DSC model and DSC + PL; DSC + MPL with
each feedback rule (pham, course); and the self-training rows of uda/ (DACS, DACS + DSC, FDA + DSC,
entropy + DSC, DACS + DSC + RCS; --methods picks rows, default the report's plus DACS + DSC). Then it
scores every method on target val and writes table1.md, deltas.md (every row against source only,
the control, DSC, DSC + PL and the best report row, paired by seed), table2.md, miou_curves.png,
qualitative.png and results.json into --output-dir. Each stage is the normal script with its own command line
(printed), so any row can be rerun alone.

Examples:
  python experiments.py                      # make demo: one seed, written to runs/synthetic
  python experiments.py --output-dir results/synthetic --seeds 3 --methods all   # the committed table
  python experiments.py --output-dir /tmp/toy --iterations 4 --val-every 2 --stages source_only fcd
  python experiments.py --output-dir results/synthetic --stages source_only dacs fda_dsc --methods dacs fda_dsc
"""
import dataclasses
import time
from argparse import Namespace
from pathlib import Path

import torch

import createpseudolabels
import MPL
import trainSupervised
import trainUnsupervised
from cli.builders import gta5_split, make_eval_loader, resolve_data, target_eval_dataset
from cli.entry import run_main
from cli.method_options import fda_beta
from cli.options import format_size, make_parser, non_negative_float, non_negative_int, positive_float, positive_int, size_type
from dataset.gta5 import GTA5Dataset
from dataset.normalization import get_normalization
from dataset.transforms import eval_transform
from engine.optim import OPTIMIZERS
from reporting.pipeline import (BASELINE, DEFAULT_METHODS, METHOD_CHOICES, METHODS, STAGE_BY_KEY, STAGE_KEYS, Settings,
                                run_stage, selected_stage_keys, total_iterations)
from reporting.scheduler import default_jobs, run_stages_in_parallel, threads_per_job
from reporting.report import paired_deltas_markdown, plot_miou_curves, plot_qualitative, table1_markdown
from reporting.scoring import (complexity_markdown, curves, paired_references, paired_summary, results_summary,
                               score_methods)
from utils.distributed import resolve_device
from utils.logger import git_commit, write_json, write_text

# The scripts the pipeline's stages run, by module name (reporting.pipeline imports no script).
# A scratch folder, ignored by git: a default run never overwrites the committed results/synthetic.
DEFAULT_OUTPUT_DIR = "runs/synthetic"
STAGE_SCRIPTS = {script.__name__: script for script in (trainSupervised, trainUnsupervised, createpseudolabels, MPL)}


def get_args(argv=None):
    defaults = Settings()
    parser = make_parser(__doc__)
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help="where tables, pictures and runs go (the committed results are results/synthetic)")
    parser.add_argument("--seeds", type=positive_int, default=1, help="repeat every row with seeds 0..N-1 (mean ± std)")
    parser.add_argument("--stages", nargs="+", choices=STAGE_KEYS, default=list(STAGE_KEYS),
                        help="stages to run (those they need must have run before in --output-dir)")
    parser.add_argument("--methods", nargs="+", choices=METHOD_CHOICES, default=list(DEFAULT_METHODS),
                        help="Table I rows to train: report (the report's rows) and/or self-training rows; all = every row")
    parser.add_argument("--data-root", default=None, help="dataset root (default: the synthetic benchmark)")
    parser.add_argument("--source-size", type=size_type, default=size_type(defaults.source_size), help="GTA5 training size WIDTHxHEIGHT")
    parser.add_argument("--target-size", type=size_type, default=size_type(defaults.target_size),
                        help="Cityscapes training and inference size WIDTHxHEIGHT (scored at full label resolution)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="batch size per domain")
    parser.add_argument("--supervised-iterations", type=positive_int, default=defaults.supervised_iterations,
                        help="iterations of the supervised upper bound, trained from scratch on target labels (it "
                             "converges more slowly than source only: see reporting.pipeline.Settings)")
    parser.add_argument("--iterations", type=positive_int, default=defaults.iterations,
                        help="iterations of source only, trained from scratch on source labels")
    parser.add_argument("--adapt-iterations", type=positive_int, default=defaults.adapt_iterations,
                        help="iterations of the fine-tuning stages from the source-only model (control, FCD, DSC)")
    parser.add_argument("--pseudo-iterations", type=positive_int, default=defaults.pseudo_iterations,
                        help="iterations of DSC + PL (from the DSC model)")
    parser.add_argument("--mpl-iterations", type=positive_int, default=defaults.mpl_iterations, help="iterations of DSC + MPL (each rule)")
    parser.add_argument("--val-every", type=positive_int, default=defaults.val_every, help="validation cadence (mIoU curves)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                        help="segmentation optimizer of every stage (Adam: see utils/experiments.Settings)")
    parser.add_argument("--learning-rate", type=positive_float, default=defaults.learning_rate,
                        help="segmentation learning rate of every stage (poly decay within each stage)")
    parser.add_argument("--lambda-adv", type=non_negative_float, default=defaults.lambda_adv, help="adversarial loss weight")
    parser.add_argument("--fda-beta", type=fda_beta, default=defaults.fda_beta, help="FDA window of the FDA + DSC row")
    parser.add_argument("--entropy-weight", type=positive_float, default=defaults.entropy_weight,
                        help="entropy weight of the Entropy + DSC row")
    parser.add_argument("--rcs-temperature", type=positive_float, default=defaults.rcs_temperature,
                        help="rare-class sampling temperature of the DACS + DSC + RCS row")
    parser.add_argument("--workers", type=non_negative_int, default=defaults.workers, help="DataLoader workers")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--jobs", type=positive_int, default=None,
                        help="stages run at once, each a process with its share of the cores and its log in "
                             "<seed dir>/logs (default: 2 on a CPU with 2 or more cores, 1 on a GPU; 1 runs them "
                             "one after another in this process)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser.parse_args(argv)


def _settings(args):
    """The pipeline's Settings: one flag per field, sizes written back as WIDTHxHEIGHT."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(Settings)}
    return Settings(**{**values, "source_size": format_size(args.source_size),
                       "target_size": format_size(args.target_size)})


def _data_args(args):
    """A namespace the dataset builders understand (target val at the inference size)."""
    data = Namespace(data_root=args.data_root, source_root=None, target_root=None, source_size=args.source_size,
                     target_size=args.target_size, eval_size=args.target_size, crop_size=None, scale_range=None,
                     flip=False, input_convention="imagenet", workers=args.workers, skip_bad=False)
    return resolve_data(data)


def _run_stages(seed_dirs, stages, settings, jobs):
    """Every stage of every seed: side by side in subprocesses (jobs > 1), or one after another in
    this process. Returns {"seedN/key": seconds}."""
    if jobs > 1:
        tasks = [(seed_dir, stage) for seed_dir in seed_dirs for stage in stages]
        script_files = {name: module.__file__ for name, module in STAGE_SCRIPTS.items()}
        quiet = dataclasses.replace(settings, progress=False)  # progress bars would only fill the logs
        return run_stages_in_parallel(tasks, quiet, script_files, jobs, threads_per_job(jobs))
    timings = {}
    for seed_dir in seed_dirs:
        for number, stage in enumerate(stages, start=1):
            print(f"\n===== seed {seed_dir.name[4:]} · stage {number}/{len(stages)}: {stage.title} =====", flush=True)
            timings[f"{seed_dir.name}/{stage.key}"] = run_stage(stage, settings, seed_dir, STAGE_SCRIPTS[stage.script])
    return timings


def main(args):
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    settings = _settings(args)
    data = _data_args(args)  # generates the synthetic benchmark on first use, before any stage starts
    seed_dirs = [output_dir / "runs" / f"seed{seed}" for seed in range(args.seeds)]
    started = time.perf_counter()
    stages = [STAGE_BY_KEY[key] for key in selected_stage_keys(args.methods) if key in args.stages]
    jobs = args.jobs or default_jobs(device)
    timings = _run_stages(seed_dirs, stages, settings, jobs)

    print("\n===== scoring every method on target val =====", flush=True)
    val = target_eval_dataset(data)
    source_val = GTA5Dataset(data.source_root, split=gta5_split(data.source_root, "val"),
                             transform=eval_transform(data.source_size),
                             normalization=get_normalization("imagenet", "gta5"))
    scores, (images, labels, predictions), gap = score_methods(
        [str(d) for d in seed_dirs], settings, val, make_eval_loader(data, val, device),
        make_eval_loader(data, source_val, device), device)
    rows = [(label, scores[label]) for label, _, _ in METHODS if label in scores]
    iterations = {label: total_iterations(settings, stage) for label, stage, _ in METHODS}
    table1 = table1_markdown(rows, baseline=BASELINE if BASELINE in scores else None, iterations=iterations)
    write_text(output_dir / "table1.md", table1 + "\n")
    table2 = complexity_markdown()
    write_text(output_dir / "table2.md", table2 + "\n")
    references = paired_references(scores)
    deltas = paired_deltas_markdown(rows, references)
    write_text(output_dir / "deltas.md", deltas + "\n")
    plot_miou_curves([curves(seed_dir, settings) for seed_dir in seed_dirs], output_dir / "miou_curves.png")
    if predictions:
        plot_qualitative(images, labels, predictions, output_dir / "qualitative.png")
    summary = {
        "git_commit": git_commit(), "seeds": list(range(args.seeds)), "device": str(device),
        "torch": torch.__version__, "settings": vars(settings), "jobs": jobs, "stage_seconds": timings,
        "total_seconds": time.perf_counter() - started,
        **results_summary(scores, gap),
        "paired_deltas": paired_summary(scores, references),
    }
    write_json(output_dir / "results.json", summary)
    print("\nTable I (target val)\n" + table1 + "\n\nPaired by seed (mIoU points)\n" + deltas + "\n\nTable II\n" + table2)
    print(f"\n[experiments] wrote {output_dir}/table1.md, deltas.md, table2.md, miou_curves.png, qualitative.png, results.json "
          f"in {summary['total_seconds'] / 60:.1f} min")
    return summary


if __name__ == "__main__":
    run_main(main, get_args)
