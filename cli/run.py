"""What every training script does around its step: set-up, run length, validation, final table."""
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.labels import colorize
from utils.distributed import barrier, get_world_size, init_distributed, is_main_process
from engine.evaluate import evaluate, eval_mode, predict_logits
from utils.logger import RunLogger, setup_console_logging, write_json, write_text
from engine.metrics import markdown_table, text_report
from utils.errors import OptionError
from cli.options import ensure_writable_dir
from engine.precision import Precision
from cli.builders import resolve_fast_paths
from utils.seed import seed_everything
from engine.trainer import BEST_CHECKPOINT, LAST_CHECKPOINT, LOSS_LOG_FILE, METRICS_FILE

DEFAULT_EPOCHS = 50
# What a run that has trained leaves in its folder; a folder holding any of them holds a run.
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, METRICS_FILE, LOSS_LOG_FILE)
# Flags that name files a run reads: --overwrite must not delete them before they are read.
INPUT_FLAGS = ("init_from", "teacher_checkpoint", "student_checkpoint", "use_pseudolabels", "thresholds", "pretrained")
LOGGED_IMAGES = 3


@dataclass
class RunContext:
    device: object
    precision: Precision
    logger: RunLogger
    output_dir: Path


def start_run(args):
    """Device (torchrun-aware), seeds, precision, a writable output folder, logger."""
    setup_console_logging()
    device = init_distributed(args.device)
    resolve_fast_paths(args, device)
    seed_everything(args.seed)
    precision = Precision(device, args.amp)
    args.amp = precision.mode
    output_dir = Path(args.output_dir)
    claim_output_dir(args)
    if is_main_process():
        ensure_writable_dir(output_dir, "--output-dir")  # run_info.json: when the trainer starts
    logger = RunLogger(output_dir / "tensorboard", tensorboard=getattr(args, "tensorboard", False),
                       wandb=getattr(args, "wandb", False), wandb_project=getattr(args, "wandb_project", None),
                       config=vars(args), run_name=output_dir.name)
    processes = f" x {get_world_size()} processes" if get_world_size() > 1 else ""
    print(f"[run] {output_dir} on {device}{processes}, precision {precision.mode}, seed {args.seed}")
    return RunContext(device, precision, logger, output_dir)


def claim_output_dir(args):
    """Refuse a folder that holds a run unless --resume continues it; --overwrite empties it first.

    A fresh run into an old run's folder would replace its best.pth with a worse model and leave
    the old TensorBoard events beside the new ones, mixing two runs' curves.
    """
    output_dir = Path(args.output_dir)
    overwrite = getattr(args, "overwrite", False)
    if overwrite and args.resume:
        raise OptionError("--overwrite deletes the run that --resume would continue: give one of them")
    held = [name for name in RUN_FILES if (output_dir / name).exists()] if output_dir.is_dir() else []
    if not held or args.resume:
        return
    if not overwrite:
        raise OptionError(f"--output-dir {output_dir} already holds a run ({', '.join(held)}): add --resume "
                         f"{output_dir / LAST_CHECKPOINT} to continue it, --overwrite to delete it and start "
                         f"afresh, or name a new --output-dir")
    for flag in INPUT_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str) and Path(value).resolve().is_relative_to(output_dir.resolve()):
            raise OptionError(f"--{flag.replace('_', '-')} {value} lies inside --output-dir {output_dir}, "
                             f"which --overwrite would delete first: copy it elsewhere or name a new --output-dir")
    if is_main_process():
        for entry in output_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        print(f"[run] --overwrite: deleted the previous run in {output_dir}")
    barrier()  # no process starts writing before the folder is empty


def resolve_schedule(args, batches_per_epoch):
    """--max-iters or --epochs (x batches per epoch of the first stream) -> iterations; val cadence."""
    if args.max_iters is None:
        args.max_iters = (args.epochs or DEFAULT_EPOCHS) * batches_per_epoch
    if not args.val_every:
        args.val_every = min(batches_per_epoch, args.max_iters)
    if not args.checkpoint_every:
        args.checkpoint_every = args.val_every
    return args.max_iters


def make_validator(networks, loader, context, progress=True):
    """iteration -> {name: scores} on the target validation loader for each named network."""
    def validate(iteration):
        return {name: evaluate(network, loader, context.device, precision=context.precision,
                               progress=progress, description=f"val {name}")
                for name, network in networks.items()}
    return validate


def make_image_logger(network, dataset, context, normalization, count=LOGGED_IMAGES):
    """iteration -> {tag: [image, ground truth, prediction] strips} for a few target-val images."""
    indices = list(range(min(count, len(dataset))))

    def images(iteration):
        strips = []
        with eval_mode(network), torch.no_grad():
            for index in indices:
                sample = dataset[index]
                image = sample["image"].unsqueeze(0).to(context.device)
                label = sample["label"]
                prediction = predict_logits(network, image, label.shape[-2:], context.precision).argmax(1)[0].cpu()
                picture = normalization.denormalize(sample["image"])
                if picture.shape[:2] != tuple(label.shape):
                    picture = np.asarray(Image.fromarray(picture).resize(label.shape[::-1]))
                strips.append(np.concatenate([picture, colorize(label.numpy()), colorize(prediction.numpy())], axis=0))
        return {"val/predictions": strips}
    return images


def finish_run(trainer, context, title):
    """Print and write the final table (metrics of the last validation) and close the logger."""
    context.logger.close()
    if not trainer.history or not is_main_process():
        return None
    final = trainer.history[-1]["scores"]
    rows = []
    for name, scores in final.items():
        plain = {"miou": _nan(scores["miou"]), "pixel_accuracy": _nan(scores["pixel_accuracy"]),
                 "iou": [_nan(value) for value in scores["iou"].values()]}
        rows.append((f"{title} ({name})" if len(final) > 1 else title, plain))
        print(f"\n== {title}: {name}, iteration {trainer.history[-1]['iteration']} ==")
        print(text_report(plain))
    table = markdown_table(rows)
    print("\n" + table)
    write_text(context.output_dir / "final_table.md", table + "\n")
    write_json(context.output_dir / "final_scores.json", {
        "iteration": trainer.history[-1]["iteration"], "best_miou": trainer.best_score, "scores": final})
    return final


def _nan(value):
    return math.nan if value is None else value
