"""The self-training flags of trainUnsupervised.py and the step that combines the methods of ``uda/``
with the adversarial step (``--discriminator fcd|dsc|none``) of ``utils.engine``.

One iteration: FDA restyles the source batch (``--fda-beta``); DACS' teacher labels the target batch
and ClassMix builds the mixed batch (``--self-training dacs``); then ``adversarial_step`` trains on the
source, the target's adversarial / entropy (``--entropy-weight``) / pseudo-label terms and the mixed
batch, in one optimizer step; last, the EMA teacher follows the student. Rare-class sampling
(``--rare-class-sampling``) only changes which source images the stream draws.

The step's random draws (FDA's target picks, ClassMix's classes, crops, jitter, blur) come from one
generator re-seeded from (seed, iteration, rank) at each step: a resumed run repeats them exactly.
With none of these flags the step is exactly ``adversarial_step``.
"""
import argparse

from uda.dacs import DACS, DEFAULT_EMA_DECAY, DEFAULT_PSEUDO_THRESHOLD
from uda.entropy import DEFAULT_ENTROPY_WEIGHT, entropy_terms
from uda.fda import FourierStyleTransfer
from utils.distributed import get_rank
from utils.engine import adversarial_step
from utils.options import non_negative_float, positive_float, unit_interval
from utils.seed import StepGenerator

SELF_TRAINING = ("none", "dacs")
MAX_FDA_BETA = 0.5  # the window then covers every frequency


def fda_beta(text):
    value = non_negative_float(text)
    if value > MAX_FDA_BETA:
        raise argparse.ArgumentTypeError(f"expected a number in [0, {MAX_FDA_BETA}] (FDA uses 0.01-0.09), got {text}")
    return value


def add_self_training_args(parser):
    group = parser.add_argument_group("self-training methods (uda/; each combines with --discriminator)")
    group.add_argument("--self-training", choices=SELF_TRAINING, default="none",
                       help="dacs: EMA teacher + ClassMix mixed images + confidence-weighted loss (DACS)")
    group.add_argument("--ema-decay", type=unit_interval, default=DEFAULT_EMA_DECAY,
                       help="DACS teacher's EMA decay (warm-up min(1 - 1/(t+1), decay))")
    group.add_argument("--pseudo-threshold", type=unit_interval, default=DEFAULT_PSEUDO_THRESHOLD,
                       help="DACS: the mixed loss's target pixels are weighted by the share of target pixels "
                            "whose teacher confidence is at least this")
    group.add_argument("--fda-beta", type=fda_beta, default=0.0,
                       help="FDA: restyle source images with the low-frequency amplitudes of a target image, "
                            "window half-width floor(min(H, W) * beta) (0: off; FDA uses 0.01, 0.05, 0.09)")
    group.add_argument("--entropy-weight", type=non_negative_float, default=DEFAULT_ENTROPY_WEIGHT,
                       help="ADVENT entropy minimisation weight on the target predictions (0: off; ADVENT 1e-3)")
    group.add_argument("--rare-class-sampling", type=positive_float, default=None, metavar="T",
                       help="draw source images by rare-class sampling at temperature T (DAFormer: 0.01)")
    return group


def uses_target_batch(args):
    """Whether the self-training flags read target images."""
    return args.self_training != "none" or args.fda_beta > 0 or args.entropy_weight > 0


def method_title(args, pseudo_labels=False):
    """'DACS + DSC', 'FDA β=0.01 + DSC', 'source only + PL', ... for the final table."""
    parts = []
    if args.self_training == "dacs":
        parts.append("DACS")
    if args.fda_beta > 0:
        parts.append(f"FDA β={args.fda_beta:g}")
    if args.entropy_weight > 0:
        parts.append(f"entropy {args.entropy_weight:g}")
    if args.rare_class_sampling is not None:
        parts.append(f"RCS T={args.rare_class_sampling:g}")
    if args.discriminator != "none":
        parts.append(args.discriminator.upper())
    elif not parts:
        parts.append("source only")
    return " + ".join(parts + (["PL"] if pseudo_labels else []))


def build_dacs(args, model, source_normalization, target_normalization):
    """The DACS state (teacher) for --self-training dacs, else None. ``model`` is the unwrapped student."""
    if args.self_training != "dacs":
        return None
    return DACS(model, args.num_classes, source_normalization, target_normalization, ema_decay=args.ema_decay,
                pseudo_threshold=args.pseudo_threshold)


class SelfTrainingStep:
    """``step_fn`` of the Trainer: (batches, iteration) -> detached losses."""

    def __init__(self, *, model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision, lambda_adv,
                 seed, pseudo_labels=False, uses_target=False, dacs=None, fda=None, entropy_weight=0.0):
        self.model = model                    # as trained (maybe DDP / compiled)
        self.discriminator = discriminator
        self.optimizer, self.optimizer_d = optimizer, optimizer_d
        self.scaler, self.scaler_d = scaler, scaler_d
        self.precision = precision
        self.lambda_adv = lambda_adv
        self.pseudo_labels = pseudo_labels
        self.uses_target = uses_target
        self.dacs = dacs
        self.fda = fda
        self.target_terms = entropy_terms(entropy_weight) if entropy_weight > 0 else None
        self.generator = StepGenerator(seed)  # FDA's target picks, ClassMix, crops, jitter, blur

    def __call__(self, batches, iteration):
        source_images, source_labels = batches["source"]["image"], batches["source"]["label"]
        target = batches.get("target", {}) if self.uses_target else {}
        target_images = target.get("image")
        extra_terms = None
        if self.fda is not None or self.dacs is not None:
            generator = self.generator(iteration, source_images.device, get_rank())
            if self.fda is not None:
                source_images = self.fda(source_images, target_images, generator)
            if self.dacs is not None:
                extra_terms = self.dacs.mixed_terms(source_images, source_labels, target_images, generator,
                                                    self.precision)
        losses = adversarial_step(
            self.model, self.discriminator, self.optimizer, self.optimizer_d, self.scaler, self.scaler_d,
            self.precision, source_images, source_labels, target_images,
            target.get("label") if self.pseudo_labels else None, lambda_adv=self.lambda_adv,
            target_terms=self.target_terms, extra_terms=extra_terms)
        if self.dacs is not None:
            self.dacs.update_teacher(iteration)
        return losses


def build_step(args, *, train_model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision,
               uses_target, pseudo_labels, dacs, source_normalization, target_normalization):
    """The SelfTrainingStep the flags ask for."""
    fda = (FourierStyleTransfer(args.fda_beta, source_normalization, target_normalization)
           if args.fda_beta > 0 else None)
    return SelfTrainingStep(model=train_model, discriminator=discriminator, optimizer=optimizer,
                            optimizer_d=optimizer_d, scaler=scaler, scaler_d=scaler_d, precision=precision,
                            lambda_adv=args.lambda_adv, seed=args.seed, pseudo_labels=pseudo_labels,
                            uses_target=uses_target, dacs=dacs, fda=fda, entropy_weight=args.entropy_weight)
