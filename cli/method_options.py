"""The flags of the adaptation methods (trainUnsupervised.py, MPL.py, experiments.py) and what they
resolve to: the discriminator, pseudo labels, and the self-training methods of ``uda/``.

The methods themselves live in ``uda/``; this is the wiring that reads them from a command line.
"""
import argparse
from pathlib import Path

from cli.options import non_negative_float, positive_float, unit_interval
from dataset.common import DatasetError
from engine.optim import OPTIMIZERS
from model import resolve_discriminator_name
from uda.adversarial import DEFAULT_LAMBDA_ADV, DEFAULT_LR_D
from uda.dacs import DEFAULT_EMA_DECAY, DEFAULT_PSEUDO_THRESHOLD
from uda.entropy import DEFAULT_ENTROPY_WEIGHT

SELF_TRAINING = ("none", "dacs")
MAX_FDA_BETA = 0.5  # the window then covers every frequency


def discriminator_type(text):
    try:
        return resolve_discriminator_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_adversarial_args(parser, default="dsc", allow_none=True):
    group = parser.add_argument_group("adversarial adaptation")
    group.add_argument("--discriminator", type=discriminator_type, default=default,
                       help="fcd (fully convolutional), dsc (depthwise-separable)"
                            + (", none (source-only baseline)" if allow_none else "")
                            + "; the old numeric codes 0 = FCD and 1 = DSC are accepted")
    group.add_argument("--optimizer-d", choices=OPTIMIZERS, default="adam", help="discriminator optimizer")
    group.add_argument("--learning-rate-d", type=positive_float, default=DEFAULT_LR_D, help="discriminator initial learning rate (poly decay)")
    group.add_argument("--lambda-adv", type=non_negative_float, default=DEFAULT_LAMBDA_ADV, help="weight of the adversarial loss")
    return group


def add_pseudo_label_args(parser):
    group = parser.add_argument_group("pseudo labels")
    group.add_argument("--use-pseudolabels", metavar="DIR", default=None,
                       help="train the target branch on the pseudo labels that createpseudolabels.py wrote to DIR")
    group.add_argument("--usepseudolabels", type=int, choices=(0, 1), default=0,
                       help="old spelling: 1 = use the pseudo labels in --pseudo-path")
    group.add_argument("--pseudo-path", "--pseudolabels-path", dest="pseudo_path", default=None,
                       help="old spelling's folder of pseudo labels (with --usepseudolabels 1)")
    return group


def resolve_pseudo_label_dir(args):
    """The one pseudo-label folder the flags name (new or old spelling), or None."""
    if args.usepseudolabels and args.use_pseudolabels is None:
        if args.pseudo_path is None:
            raise DatasetError("--usepseudolabels 1 needs --pseudo-path DIR (or use --use-pseudolabels DIR)")
        args.use_pseudolabels = args.pseudo_path
    if args.use_pseudolabels is not None and not Path(args.use_pseudolabels).is_dir():
        raise DatasetError(f"--use-pseudolabels {args.use_pseudolabels}: no such folder "
                         f"(create it with createpseudolabels.py --output-dir {args.use_pseudolabels})")
    return args.use_pseudolabels


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
