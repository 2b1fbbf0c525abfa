"""Unsupervised domain adaptation GTA5 -> Cityscapes with BiSeNet.

Source GTA5 (labeled) + target Cityscapes (unlabeled): segmentation loss on the source, an
adversarial loss on the target through a discriminator (FCD or the light DSC), optionally a
cross-entropy on target pseudo labels from createpseudolabels.py. --discriminator none is the
source-only baseline in the same loop. Validates on Cityscapes val (mIoU, pixel accuracy,
per-class IoU), keeps last.pth and best.pth in --output-dir and prints the final table.

Self-training methods (uda/, each combinable with any --discriminator): --self-training dacs (EMA
teacher, ClassMix, confidence-weighted mixed loss; the teacher is checkpointed as "teacher"),
--fda-beta B (Fourier amplitude swap of source images), --entropy-weight W (ADVENT entropy
minimisation), --rare-class-sampling T (DAFormer's rare-class sampling of source images).

Examples:
  python trainUnsupervised.py --output-dir runs/dsc --discriminator dsc --max-iters 300
  python trainUnsupervised.py --output-dir runs/dsc_pl --discriminator dsc --use-pseudolabels runs/pseudo
  python trainUnsupervised.py --output-dir runs/dacs_dsc --discriminator dsc --self-training dacs --init-from runs/so/last.pth
  torchrun --standalone --nproc_per_node=4 trainUnsupervised.py --output-dir runs/dsc --batch-size 2 --sync-bn

Under torchrun an iteration is a global step of --batch-size x processes samples per domain;
see docs/multi-gpu.md.
"""
from cli.method_options import (add_adversarial_args, add_pseudo_label_args, add_self_training_args, method_title,
                                resolve_pseudo_label_dir, uses_target_batch)
from uda.adversarial import build_discriminator_parts
from cli.builders import (make_eval_loader, maybe_compile, resolve_data, segmentation_parts, source_train_dataset,
                            target_eval_dataset, target_train_dataset, train_stream)
from utils.distributed import cleanup_distributed, wrap_ddp
from model import model_config as bisenet_config
from cli.options import (add_cuda_graph_arg, add_data_args, add_model_args, add_runtime_args, add_training_args,
                         make_parser)
from cli.run import finish_run, make_image_logger, make_validator, resolve_schedule, start_run
from engine.trainer import Trainer
from dataset.normalization import get_normalization
from cli.entry import run_main
from uda.rare_class_sampling import rare_class_sampler
from uda.step import build_dacs, build_step


def get_args(argv=None):
    parser = make_parser(__doc__)
    add_data_args(parser)
    add_model_args(parser)
    add_training_args(parser)
    add_adversarial_args(parser)
    add_pseudo_label_args(parser)
    add_self_training_args(parser)
    add_cuda_graph_arg(add_runtime_args(parser))
    return parser.parse_args(argv)


def main(args):
    pseudo_dir = resolve_pseudo_label_dir(args)
    resolve_data(args)
    # Data first: a wrong path fails here, before any network is built.
    source = source_train_dataset(args)
    target = target_train_dataset(args, pseudo_label_dir=pseudo_dir)
    val = target_eval_dataset(args)
    context = start_run(args)
    device = context.device

    source_sampler = rare_class_sampler(args, source, context.output_dir)
    model, optimizer = segmentation_parts(args, device)
    discriminator, optimizer_d, discriminator_config = build_discriminator_parts(args, device, args.num_classes)
    scaler, scaler_d = context.precision.grad_scaler(), context.precision.grad_scaler()
    source_normalization = get_normalization(args.input_convention, "gta5")
    target_normalization = get_normalization(args.input_convention, "cityscapes")
    dacs = build_dacs(args, model, source_normalization, target_normalization)

    train_model = wrap_ddp(maybe_compile(model, args), device, find_unused_parameters=True)
    train_discriminator = wrap_ddp(discriminator, device) if discriminator is not None else None
    streams = {"source": train_stream(args, source, device, sampler=source_sampler)}
    uses_target = discriminator is not None or pseudo_dir is not None or uses_target_batch(args)
    if uses_target:  # source only reads no target batch: loading one would only take CPU from training
        streams["target"] = train_stream(args, target, device, seed_offset=1)
    max_iters = resolve_schedule(args, streams["source"].batches_per_epoch)
    step = build_step(args, train_model=train_model, discriminator=train_discriminator, optimizer=optimizer,
                      optimizer_d=optimizer_d, scaler=scaler, scaler_d=scaler_d, precision=context.precision,
                      uses_target=uses_target, pseudo_labels=pseudo_dir is not None, dacs=dacs,
                      source_normalization=source_normalization, target_normalization=target_normalization)

    networks = {"model": model}
    optimizers = {"model": (optimizer, args.learning_rate)}
    scalers = {"model": scaler}
    configs = {"model": bisenet_config(model, args.input_convention)}
    if discriminator is not None:
        networks["discriminator"] = discriminator
        optimizers["discriminator"] = (optimizer_d, args.learning_rate_d)
        scalers["discriminator"] = scaler_d
        configs["discriminator"] = discriminator_config
    if dacs is not None:  # the EMA teacher: checkpointed and restored like any network, no optimizer
        networks["teacher"] = dacs.teacher
        configs["teacher"] = bisenet_config(dacs.teacher, args.input_convention)

    val_loader = make_eval_loader(args, val, device)
    trainer = Trainer(
        args=args, output_dir=context.output_dir, device=device, networks=networks, optimizers=optimizers,
        scalers=scalers, streams=streams, step_fn=step, configs=configs, max_iters=max_iters,
        validate_fn=make_validator({"model": model}, val_loader, context, args.progress),
        image_fn=make_image_logger(model, val, context, target_normalization),
        val_every=args.val_every, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
        logger=context.logger, fp16_skipping=context.precision.mode == "fp16",
        finite_check=getattr(step, "finite_check", None))
    if args.resume:
        trainer.resume(args.resume)
    trainer.run()
    finish_run(trainer, context, method_title(args, pseudo_labels=pseudo_dir is not None))
    cleanup_distributed()
    return trainer


if __name__ == "__main__":
    run_main(main, get_args)
