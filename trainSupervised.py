"""Supervised BiSeNet training on one labeled domain.

Cityscapes train (the report's upper bound, default) or GTA5 (a source-only baseline without a
target branch). Validates on Cityscapes val through the shared evaluation, keeps last.pth and
best.pth in --output-dir and prints the final table.

Examples:
  python trainSupervised.py --output-dir runs/supervised --max-iters 300
  python trainSupervised.py --output-dir runs/gta5_only --train-domain gta5
  torchrun --standalone --nproc_per_node=4 trainSupervised.py --output-dir runs/supervised --batch-size 2 --sync-bn

Under torchrun an iteration is a global step of --batch-size x processes samples per domain;
see docs/multi-gpu.md.
"""
from dataset.normalization import get_normalization
from cli.builders import (make_eval_loader, maybe_compile, resolve_data, segmentation_parts, source_train_dataset,
                            target_eval_dataset, target_train_dataset, train_stream)
from utils.distributed import cleanup_distributed, wrap_ddp
from engine.cuda_graph import DeferredFiniteCheck, GraphedStep
from engine.steps import supervised_step
from model import model_config as bisenet_config
from cli.options import (add_cuda_graph_arg, add_data_args, add_model_args, add_runtime_args, add_training_args,
                         make_parser)
from cli.run import finish_run, make_image_logger, make_validator, resolve_schedule, start_run
from engine.trainer import Trainer
from cli.entry import run_main

TRAIN_DOMAINS = ("cityscapes", "gta5")


def get_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--train-domain", choices=TRAIN_DOMAINS, default="cityscapes",
                        help="labeled training data: Cityscapes train (upper bound) or GTA5 (source only)")
    add_data_args(parser)
    add_model_args(parser)
    add_training_args(parser)
    add_cuda_graph_arg(add_runtime_args(parser))
    return parser.parse_args(argv)


def main(args):
    resolve_data(args, need_source=args.train_domain == "gta5")
    if args.train_domain == "gta5":
        train = source_train_dataset(args)
    else:
        train = target_train_dataset(args, labeled=True)
    val = target_eval_dataset(args)
    context = start_run(args)
    device = context.device

    model, optimizer = segmentation_parts(args, device)
    scaler = context.precision.grad_scaler()
    train_model = wrap_ddp(maybe_compile(model, args), device)
    streams = {"train": train_stream(args, train, device)}
    max_iters = resolve_schedule(args, streams["train"].batches_per_epoch)

    finite_check = DeferredFiniteCheck([optimizer], device) if args.cuda_graph == "on" else None

    def step(batches, iteration):
        return supervised_step(train_model, optimizer, scaler, context.precision,
                               batches["train"]["image"], batches["train"]["label"], check=finite_check)
    if finite_check is not None:  # --cuda-graph on: the step captured once and replayed
        step = GraphedStep(step, finite_check, context.precision)

    trainer = Trainer(
        args=args, output_dir=context.output_dir, device=device, networks={"model": model},
        optimizers={"model": (optimizer, args.learning_rate)}, scalers={"model": scaler}, streams=streams,
        step_fn=step, configs={"model": bisenet_config(model, args.input_convention)}, max_iters=max_iters,
        validate_fn=make_validator({"model": model}, make_eval_loader(args, val, device), context, args.progress),
        image_fn=make_image_logger(model, val, context, get_normalization(args.input_convention, "cityscapes")),
        val_every=args.val_every, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
        logger=context.logger, fp16_skipping=context.precision.mode == "fp16", finite_check=finite_check)
    if args.resume:
        trainer.resume(args.resume)
    trainer.run()
    finish_run(trainer, context, "supervised" if args.train_domain == "cityscapes" else "source only (GTA5)")
    cleanup_distributed()
    return trainer


if __name__ == "__main__":
    run_main(main, get_args)
