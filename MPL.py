"""Meta Pseudo Labels for unsupervised domain adaptation GTA5 -> Cityscapes with BiSeNet.

A teacher (initialised from --teacher-checkpoint, e.g. the DSC run) labels each target batch;
its hard predictions, thresholded per class (refreshed every --refresh iterations from a running
histogram, or fixed from a thresholds.json), train a student (fresh or --init-from/--student-checkpoint)
with the adversarial step of trainUnsupervised.py. The teacher learns from its source labels,
its own discriminator, a consistency term on an augmented target view and the student's
feedback, by one of two rules (--feedback):
  pham   (the MPL paper, default): the student steps on the pseudo labels alone; h, the drop of its
         labeled (source) loss over that step minus a moving baseline, weighs the teacher's
         pseudo-label loss; then the student takes its source + adversarial step.
  course (the course's MPL.py): one source + pseudo-label + adversarial student step; weight
         alpha x student_lr x L_pseudo x L_source, alpha = exp(epoch/40) - 1 for epochs 1..25, 1 after,
         and exactly 1 in epoch 0; teacher adversarial weight 1, three heads in its pseudo-label
         loss, teacher SGD at 1.25e-2 by default. Unlike the course, the teacher's discriminator
         learns from the teacher's own maps (the course used the student's: a bug).
Formulas, signs and costs: uda/meta_pseudo_labels.py and uda/mpl_feedback.py. Student and teacher are validated
on Cityscapes val (the student ranks best.pth); both networks, both discriminators, their
optimizers and scalers and the threshold/baseline state are checkpointed together, so --resume
continues exactly. ``eval.py --checkpoint RUN/last.pth --network teacher`` scores the teacher.

--discriminator none trains both networks without adversarial terms (an ablation).

Examples:
  python MPL.py --teacher-checkpoint runs/dsc/best.pth --output-dir runs/mpl --max-iters 300
  python MPL.py --teacher-checkpoint runs/dsc/best.pth --output-dir runs/mpl_course --feedback course
  python MPL.py --teacher-checkpoint runs/dsc/best.pth --thresholds runs/pseudo/thresholds.json --output-dir runs/mpl_fixed
"""
from model import model_config as bisenet_config
from cli.method_options import add_adversarial_args
from uda.adversarial import build_discriminator_parts
from cli.builders import (initial_bisenet, load_initial_bisenet, make_eval_loader, maybe_compile, prepare_network,
                            resolve_data, source_train_dataset, target_eval_dataset, target_train_dataset,
                            train_stream)
from utils.distributed import cleanup_distributed, wrap_ddp
from cli.mpl_options import add_mpl_args, read_thresholds, resolve_mpl_args, resolve_mpl_schedule
from uda.meta_pseudo_labels import Learner, MPLStep, PseudoLabeler
from uda.mpl_feedback import build_feedback
from engine.optim import build_optimizer
from cli.options import add_data_args, add_model_args, add_runtime_args, add_training_args, make_parser
from cli.run import finish_run, make_image_logger, make_validator, resolve_schedule, start_run
from engine.trainer import Trainer
from dataset.normalization import get_normalization
from cli.entry import run_main


def get_args(argv=None):
    parser = make_parser(__doc__)
    add_data_args(parser)
    add_model_args(parser)
    add_training_args(parser)
    add_adversarial_args(parser)
    add_mpl_args(parser)
    add_runtime_args(parser)
    return parser.parse_args(argv)


def main(args):
    resolve_mpl_args(args)
    resolve_data(args)
    # Data and the initial weights first: a wrong path fails here, before any network is built.
    source = source_train_dataset(args)
    target = target_train_dataset(args)
    val = target_eval_dataset(args)
    teacher = load_initial_bisenet(args.teacher_checkpoint, args, key=args.teacher_network)  # any architecture
    thresholds = read_thresholds(args.thresholds, args.num_classes) if args.thresholds else None
    context = start_run(args)
    device = context.device

    student = initial_bisenet(args)  # after start_run: a fresh student's weights follow --seed
    student, teacher = prepare_network(student, args, device), prepare_network(teacher, args, device)
    optimizer = build_optimizer(args.optimizer, student.parameters(), args.learning_rate, args.weight_decay, args.momentum)
    optimizer_t = build_optimizer(args.teacher_optimizer, teacher.parameters(), args.teacher_learning_rate,
                                  args.weight_decay, args.momentum)
    discriminator, optimizer_d, discriminator_config = build_discriminator_parts(args, device, args.num_classes)
    discriminator_t, optimizer_dt, _ = build_discriminator_parts(args, device, args.num_classes)
    scalers = {name: context.precision.grad_scaler() for name in ("model", "teacher", "discriminator", "discriminator_teacher")}

    streams = {"source": train_stream(args, source, device), "target": train_stream(args, target, device, seed_offset=1)}
    max_iters = resolve_schedule(args, streams["source"].batches_per_epoch)
    resolve_mpl_schedule(args)

    mpl = MPLStep(
        student=Learner(wrap_ddp(maybe_compile(student, args), device, find_unused_parameters=True), optimizer,
                        scalers["model"], wrap_ddp(discriminator, device), optimizer_d, scalers["discriminator"]),
        teacher=Learner(wrap_ddp(maybe_compile(teacher, args), device, find_unused_parameters=True), optimizer_t,
                        scalers["teacher"], wrap_ddp(discriminator_t, device), optimizer_dt, scalers["discriminator_teacher"]),
        labeler=PseudoLabeler(args.num_classes, args.refresh, thresholds).to(device),
        feedback=build_feedback(args, streams["source"].batches_per_epoch).to(device),
        precision=context.precision, lambda_adv=args.lambda_adv, uda_weight=args.uda_weight,
        uda_ramp_iters=args.uda_ramp_iters, seed=args.seed)

    def step(batches, iteration):
        return mpl(batches["source"]["image"], batches["source"]["label"], batches["target"]["image"], iteration)

    networks = {"model": student, "teacher": teacher, "mpl": mpl.state_module()}
    optimizers = {"model": (optimizer, args.learning_rate), "teacher": (optimizer_t, args.teacher_learning_rate)}
    configs = {"model": bisenet_config(student, args.input_convention), "teacher": bisenet_config(teacher, args.input_convention)}
    if discriminator is not None:
        networks.update(discriminator=discriminator, discriminator_teacher=discriminator_t)
        optimizers.update(discriminator=(optimizer_d, args.learning_rate_d), discriminator_teacher=(optimizer_dt, args.learning_rate_d))
        configs.update(discriminator=discriminator_config, discriminator_teacher=discriminator_config)
    scalers = {name: scalers[name] for name in optimizers}

    val_loader = make_eval_loader(args, val, device)
    trainer = Trainer(
        args=args, output_dir=context.output_dir, device=device, networks=networks, optimizers=optimizers,
        scalers=scalers, streams=streams, step_fn=step, configs=configs, max_iters=max_iters,
        validate_fn=make_validator({"student": student, "teacher": teacher}, val_loader, context, args.progress),
        image_fn=make_image_logger(student, val, context, get_normalization(args.input_convention, "cityscapes")),
        val_every=args.val_every, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
        logger=context.logger, fp16_skipping=context.precision.mode == "fp16")
    if args.resume:
        trainer.resume(args.resume)
    trainer.run()
    title = f"MPL/{args.feedback}" + ("" if discriminator is None else f" + {args.discriminator.upper()}")
    finish_run(trainer, context, title)
    cleanup_distributed()
    return trainer


if __name__ == "__main__":
    run_main(main, get_args)
