"""The main job: the report's whole pipeline on the built-in synthetic benchmark, then its tables.

Runs, for each seed, at a small size that fits a laptop CPU:
  1. supervised upper bound (target labels, from scratch; it converges slowest, so it trains longest)
  2. source-only baseline (from scratch)
  then, each fine-tuning the source-only model for the same number of iterations:
  3. source only, continued (the control: as much training, no adaptation)
  4. adversarial with FCD                                   5. adversarial with DSC
  6. pseudo labels from the DSC model    7. DSC + pseudo labels, from the DSC model
  8. DSC + MPL (student and teacher), both starting from the DSC model
then scores every method on target val and writes into --output-dir:
  table1.md (per-class IoU, mIoU, pixel accuracy; mean ± std over seeds, Δ vs source only),
  table2.md (parameters and GFLOPs at 1024x512), miou_curves.png, qualitative.png, results.json.
Each stage is the normal script with its own command line (printed), so any row can be rerun alone.

Examples:
  python experiments.py --output-dir results/synthetic
  python experiments.py --output-dir results/synthetic --seeds 3
  python experiments.py --output-dir /tmp/toy --iterations 4 --val-every 2 --stages source_only fcd
"""
import json
import time
from pathlib import Path

import torch

from dataset.gta5 import GTA5Dataset
from dataset.normalization import get_normalization
from dataset.transforms import eval_transform
from model import load_bisenet
from utils.builders import gta5_split, make_eval_loader, resolve_data, target_eval_dataset
from utils.distributed import resolve_device
from utils.evaluate import eval_mode, evaluate, predict_logits
from utils.experiments import (BASELINE, METHODS, STAGE_BY_KEY, STAGE_KEYS, STAGES, Settings, run_stage, start_iteration,
                               total_iterations)
from utils.logger import git_commit, write_json, write_text
from utils.metrics import scores_from_json, scores_to_json
from utils.optim import OPTIMIZERS
from utils.options import make_parser, non_negative_float, non_negative_int, positive_float, positive_int, size_type
from utils.precision import Precision
from utils.report import mean_std, plot_miou_curves, plot_qualitative, table1_markdown, table2_markdown
from utils.cli import run_main

QUALITATIVE_IMAGES = 4
COMPLEXITY_SIZE = (512, 1024)  # the report's Table II resolution (height, width)


def get_args(argv=None):
    defaults = Settings()
    parser = make_parser(__doc__)
    parser.add_argument("--output-dir", default="results/synthetic", help="where tables, pictures and runs go")
    parser.add_argument("--seeds", type=positive_int, default=1, help="repeat every row with seeds 0..N-1 (mean ± std)")
    parser.add_argument("--stages", nargs="+", choices=STAGE_KEYS, default=list(STAGE_KEYS),
                        help="stages to run (those they need must have run before in --output-dir)")
    parser.add_argument("--data-root", default=None, help="dataset root (default: the synthetic benchmark)")
    parser.add_argument("--source-size", type=size_type, default=size_type(defaults.source_size), help="GTA5 training size WIDTHxHEIGHT")
    parser.add_argument("--target-size", type=size_type, default=size_type(defaults.target_size),
                        help="Cityscapes training and inference size WIDTHxHEIGHT (scored at full label resolution)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="batch size per domain")
    parser.add_argument("--supervised-iterations", type=positive_int, default=defaults.supervised_iterations,
                        help="iterations of the supervised upper bound, trained from scratch on target labels (it "
                             "converges more slowly than source only: see utils.experiments.Settings)")
    parser.add_argument("--iterations", type=positive_int, default=defaults.iterations,
                        help="iterations of source only, trained from scratch on source labels")
    parser.add_argument("--adapt-iterations", type=positive_int, default=defaults.adapt_iterations,
                        help="iterations of the fine-tuning stages from the source-only model (control, FCD, DSC)")
    parser.add_argument("--pseudo-iterations", type=positive_int, default=defaults.pseudo_iterations,
                        help="iterations of DSC + PL (from the DSC model)")
    parser.add_argument("--mpl-iterations", type=positive_int, default=defaults.mpl_iterations, help="iterations of DSC + MPL")
    parser.add_argument("--val-every", type=positive_int, default=defaults.val_every, help="validation cadence (mIoU curves)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                        help="segmentation optimizer of every stage (Adam: see utils/experiments.Settings)")
    parser.add_argument("--learning-rate", type=positive_float, default=defaults.learning_rate,
                        help="segmentation learning rate of every stage (poly decay within each stage)")
    parser.add_argument("--lambda-adv", type=non_negative_float, default=defaults.lambda_adv, help="adversarial loss weight")
    parser.add_argument("--workers", type=non_negative_int, default=defaults.workers, help="DataLoader workers")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser.parse_args(argv)


def _settings(args):
    def fmt(size):
        return f"{size[1]}x{size[0]}"
    return Settings(data_root=args.data_root, source_size=fmt(args.source_size), target_size=fmt(args.target_size),
                    batch_size=args.batch_size, supervised_iterations=args.supervised_iterations,
                    iterations=args.iterations, adapt_iterations=args.adapt_iterations,
                    pseudo_iterations=args.pseudo_iterations, mpl_iterations=args.mpl_iterations,
                    val_every=args.val_every, workers=args.workers, device=args.device, optimizer=args.optimizer,
                    learning_rate=args.learning_rate, lambda_adv=args.lambda_adv,
                    progress=args.progress)


def _data_args(args):
    """A namespace the dataset builders understand (target val at the inference size)."""
    from argparse import Namespace

    data = Namespace(data_root=args.data_root, source_root=None, target_root=None, source_size=args.source_size,
                     target_size=args.target_size, eval_size=args.target_size, crop_size=None, scale_range=None,
                     flip=False, input_convention="imagenet", workers=args.workers, skip_bad=False)
    return resolve_data(data)


@torch.no_grad()
def score_methods(args, seed_dirs, device):
    """Evaluate every available method of every seed on target val; collect qualitative predictions."""
    data = _data_args(args)
    val = target_eval_dataset(data)
    loader = make_eval_loader(data, val, device)
    precision = Precision(device, "auto")
    picked = list(range(min(QUALITATIVE_IMAGES, len(val))))
    scores, predictions, gap = {}, {}, {}
    settings = _settings(args)
    for label, stage, network in METHODS:
        for seed_dir in seed_dirs:
            checkpoint = Path(seed_dir) / stage / "last.pth"
            if not checkpoint.is_file():
                continue
            # The run validated its last.pth at its final iteration with the same evaluate() on the
            # same data; scoring it again would only cost time (about 5 s a model on 2 CPU cores).
            final = _final_scores(Path(seed_dir) / stage, network, settings.stage_iterations(stage))
            if final is not None and seed_dir != seed_dirs[0] and stage != "source_only":
                scores.setdefault(label, []).append(final)
                continue  # nothing else needs this model: its weights are not even read
            model = load_bisenet(checkpoint, key=network).to(device)
            if final is None:
                final = evaluate(model, loader, device, precision=precision, progress=False)
            scores.setdefault(label, []).append(final)
            if seed_dir == seed_dirs[0]:
                with eval_mode(model):
                    predictions[label] = [
                        predict_logits(model, val[i]["image"][None].to(device), val[i]["label"].shape, precision)
                        .argmax(1)[0].cpu().numpy() for i in picked]
            if stage == "source_only":
                gap.setdefault("source_only_source_val", []).append(_source_val(data, model, device, precision))
    normalization = get_normalization("imagenet", "cityscapes")
    images = []
    for i in picked:
        image = normalization.denormalize(val[i]["image"])
        images.append(_resize_to(image, val[i]["label"].shape))
    labels = [val[i]["label"].numpy() for i in picked]
    return scores, (images, labels, predictions), gap


def _resize_to(image, shape):
    from PIL import Image
    import numpy as np

    if image.shape[:2] == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))


def _source_val(data, model, device, precision):
    """Source-only model on GTA5 val: the other side of the domain gap."""
    dataset = GTA5Dataset(data.source_root, split=gta5_split(data.source_root, "val"),
                          transform=eval_transform(data.source_size), normalization=get_normalization("imagenet", "gta5"))
    return evaluate(model, make_eval_loader(data, dataset, device), device, precision=precision, progress=False)


def _history(run_dir):
    metrics = Path(run_dir) / "metrics.json"
    return json.loads(metrics.read_text())["history"] if metrics.is_file() else []


def _record_scores(record, network):
    """A validation record's scores of ``network`` ("model": the run's first, e.g. MPL's student)."""
    names = list(record["scores"])
    return record["scores"][network if network in names else names[0]]


def _final_scores(run_dir, network, iterations):
    """The run's own validation of its final weights, or None when it has none at ``iterations``."""
    history = _history(run_dir)
    if not history or history[-1]["iteration"] != iterations:
        return None
    return scores_from_json(_record_scores(history[-1], network))


def _curves(seed_dir, settings):
    """{method: [(iteration, mIoU), ...]}; a fine-tuned stage's curve starts where its parent's ends."""
    curves = {}
    for label, stage, network in METHODS:
        history = _history(Path(seed_dir) / stage)
        if not history:
            continue
        offset = start_iteration(settings, stage)
        points = [(offset + record["iteration"], _record_scores(record, network)["miou"]) for record in history]
        parent = STAGE_BY_KEY[stage].parent
        parent_label = next((label for label, key, net in METHODS if key == parent and net == "model"), None)
        if curves.get(parent_label):  # a branch starts at the model it fine-tunes
            points.insert(0, curves[parent_label][-1])
        curves[label] = points
    return curves


def main(args):
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    settings = _settings(args)
    _data_args(args)  # generates the synthetic benchmark on first use, before any stage starts
    seed_dirs = [output_dir / "runs" / f"seed{seed}" for seed in range(args.seeds)]
    timings = {}
    started = time.perf_counter()
    for seed_dir in seed_dirs:
        for number, stage in enumerate(STAGES, start=1):
            if stage.key not in args.stages:
                continue
            print(f"\n===== seed {seed_dir.name[4:]} · stage {number}/{len(STAGES)}: {stage.title} =====", flush=True)
            timings[f"{seed_dir.name}/{stage.key}"] = run_stage(stage, settings, seed_dir)

    print("\n===== scoring every method on target val =====", flush=True)
    scores, (images, labels, predictions), gap = score_methods(args, [str(d) for d in seed_dirs], device)
    rows = [(label, scores[label]) for label, _, _ in METHODS if label in scores]
    iterations = {label: total_iterations(settings, stage) for label, stage, _ in METHODS}
    table1 = table1_markdown(rows, baseline=BASELINE if BASELINE in scores else None, iterations=iterations)
    write_text(output_dir / "table1.md", table1 + "\n")
    table2 = _table2()
    write_text(output_dir / "table2.md", table2 + "\n")
    plot_miou_curves([_curves(seed_dir, settings) for seed_dir in seed_dirs], output_dir / "miou_curves.png")
    if predictions:
        plot_qualitative(images, labels, predictions, output_dir / "qualitative.png")
    summary = {
        "git_commit": git_commit(), "seeds": list(range(args.seeds)), "device": str(device),
        "torch": torch.__version__, "settings": vars(settings), "stage_seconds": timings,
        "total_seconds": time.perf_counter() - started,
        "methods": {label: {"per_seed": [scores_to_json(s) for s in values],
                            "miou_mean": mean_std([s["miou"] for s in values])[0],
                            "miou_std": mean_std([s["miou"] for s in values])[1],
                            "pixel_accuracy_mean": mean_std([s["pixel_accuracy"] for s in values])[0]}
                    for label, values in scores.items()},
        "domain_gap": {"source_only_source_val_miou": [s["miou"] for s in gap.get("source_only_source_val", [])],
                       "source_only_target_val_miou": [s["miou"] for s in scores.get(BASELINE, [])]},
    }
    write_json(output_dir / "results.json", summary)
    print("\nTable I (target val)\n" + table1 + "\n\nTable II\n" + table2)
    print(f"\n[experiments] wrote {output_dir}/table1.md, table2.md, miou_curves.png, qualitative.png, results.json "
          f"in {summary['total_seconds'] / 60:.1f} min")
    return summary


def _table2():
    from model.flops import complexity_table

    try:
        return table2_markdown(complexity_table(*COMPLEXITY_SIZE))
    except ImportError:  # thop is optional at run time
        return "(thop is not installed: pip install thop for the complexity table)"


if __name__ == "__main__":
    run_main(main, get_args)
