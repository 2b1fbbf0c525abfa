"""Options and set-up shared by the adaptation scripts (trainUnsupervised.py, MPL.py)."""
import argparse
from pathlib import Path

from dataset.common import DatasetError
from model import build_discriminator, resolve_discriminator_name
from utils.optim import OPTIMIZERS, build_optimizer
from utils.options import non_negative_float, positive_float

DEFAULT_LAMBDA_ADV = 1e-3
DEFAULT_LR_D = 1e-4


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


def build_discriminator_parts(args, device, num_classes):
    """(discriminator, its optimizer, its config) or (None, None, None) for --discriminator none."""
    if args.discriminator == "none":
        return None, None, None
    discriminator = build_discriminator(args.discriminator, num_classes=num_classes).to(device)
    optimizer = build_optimizer(args.optimizer_d, discriminator.parameters(), args.learning_rate_d,
                                weight_decay=0.0 if args.optimizer_d != "sgd" else None, momentum=args.momentum)
    return discriminator, optimizer, {"name": args.discriminator, "num_classes": num_classes}
