"""Command-line options shared by the scripts, defined once so the scripts never drift apart."""
import argparse
import math
import os
import tempfile
from pathlib import Path

from dataset.labels import NUM_CLASSES
from dataset.normalization import CONVENTIONS
from model.bisenet import CONTEXT_PATHS
from model.depthwise import DEPTHWISE_IMPLEMENTATIONS
from engine.optim import OPTIMIZERS
from engine.precision import AMP_CHOICES
from utils.errors import OptionError
from utils.sizes import format_size, size_type  # noqa: F401 - the scripts import them from here

DEFAULT_LR = 2.5e-2  # initial learning rate of the segmentation network (the scripts' default)


def ensure_writable_dir(path, flag):
    """Create folder ``path`` (a value of ``flag``) and prove a file can be written in it, before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"{flag} {path} is a file, not a folder: name a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OptionError(f"{flag} {path} cannot be written: {error.strerror or error}") from None
    return path


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # NaN and inf would only surface later, in a loss or a JSON file
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def positive_float(text):
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def non_negative_float(text):
    value = finite_float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def momentum_type(text):
    value = float(text)
    if not 0.0 <= value < 1.0:  # also refuses NaN and inf; 1 would never forget a gradient
        raise argparse.ArgumentTypeError(f"expected a momentum in [0, 1), got {text}")
    return value


def unit_interval(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def scale_range_type(text):
    parts = str(text).split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX such as 0.75,1.5, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return low, high


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends '(default: ...)' only where it informs: not to on/off switches ('--no-flip (default: True)'),
    not to None, not where the help already says its default; sizes as the WIDTHxHEIGHT the flag takes."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if (action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS
                or "default" in help_text or "%(default)" in help_text):
            return help_text
        if action.type is size_type and isinstance(action.default, tuple):
            return f"{help_text} (default: {format_size(action.default)})"
        return super()._get_help_string(action)


def make_parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_data_args(parser, source=True, target=True, training=True, convention_from_checkpoint=False):
    group = parser.add_argument_group("data (default: the built-in synthetic benchmark, generated on first use)")
    group.add_argument("--data-root", default=None,
                       help="folder holding GTA5/ and Cityscapes/ (the synthetic benchmark's layout); "
                            "default: $UDA_SYNTHETIC_DIR or data/synthetic")
    if source:
        group.add_argument("--source-root", default=None, help="GTA5 root (images/, labels/, optional train.txt)")
        group.add_argument("--source-size", type=size_type, default=None,
                           help="GTA5 resize WIDTHxHEIGHT (report: 1280x720; synthetic default: native size)")
    if target:
        group.add_argument("--target-root", default=None,
                           help="Cityscapes root, official (leftImg8bit/, gtFine/) or flat (images/, labels/, train.txt) layout")
        group.add_argument("--target-size", type=size_type, default=None,
                           help="Cityscapes resize WIDTHxHEIGHT (report: 1024x512; synthetic default: native size)")
    if training:  # augmentation: nothing for eval.py to take
        group.add_argument("--crop-size", type=size_type, default=None,
                           help="random crop WIDTHxHEIGHT after resizing (default: no crop)")
        group.add_argument("--scale-range", type=scale_range_type, default=None,
                           help="random scale jitter MIN,MAX before cropping (default: none)")
        group.add_argument("--no-flip", dest="flip", action="store_false", help="disable random horizontal flips")
    group.add_argument("--eval-size", type=size_type, default=None,
                       help="inference size WIDTHxHEIGHT for validation; predictions are scored at the label's full "
                            "resolution (default: the target size)")
    if convention_from_checkpoint:  # inference: the checkpoint records the convention it was trained with
        group.add_argument("--input-convention", choices=CONVENTIONS, default=None,
                           help="input normalisation (default: the one recorded in the checkpoint)")
    else:
        group.add_argument("--input-convention", choices=CONVENTIONS, default="imagenet",
                           help="input normalisation: imagenet (RGB, mean/std) or course (BGR, mean subtraction, "
                                "as the old course repository's checkpoints need)")
    group.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    group.add_argument("--skip-bad", action="store_true",
                       help="skip unreadable images/labels (counted and reported) instead of stopping")
    return group


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--context-path", choices=CONTEXT_PATHS, default="resnet18", help="BiSeNet context-path backbone")
    group.add_argument("--num-classes", type=positive_int, default=NUM_CLASSES, help="number of classes")
    group.add_argument("--pretrained", default="none",
                       help="trunk initialisation: imagenet (torchvision weights from $TORCH_HOME/hub/checkpoints), "
                            "none, or the PATH of a torchvision ResNet state_dict")
    return group


def add_runtime_args(parser):
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    group.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                       help="mixed precision: auto = bf16 (or fp16 + loss scaling) on CUDA, off on the CPU "
                            "(bf16 also runs on the CPU, fp16 needs CUDA)")
    group.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                       help="channels_last memory format (auto: on for CUDA and the CPU)")
    group.add_argument("--compile", default="off", choices=("auto", "on", "off"),
                       help="torch.compile the segmentation network (auto: on for CUDA)")
    add_compile_cache_arg(group)
    group.add_argument("--classifier-first", default="auto", choices=("auto", "on", "off"),
                       help="BiSeNet's 1x1 classifier before its x8 upsampling: the same function (bilinear weights "
                            "sum to 1), other rounding (auto: on for CUDA, off on the CPU; docs/speed.md)")
    group.add_argument("--matmul-resize", default="auto", choices=("auto", "on", "off"),
                       help="bilinear resizing (networks and discriminator) as two matrix products: the same "
                            "function, other rounding (auto: on for CUDA, off on the CPU; docs/speed.md)")
    group.add_argument("--fused-loss", default="off", choices=("auto", "on", "off"),
                       help="segmentation losses as one Triton kernel (bilinear upsampling + log-softmax + NLL of "
                            "each head's low-resolution logits, gathering backward), and the discriminator's softmax "
                            "maps as another (upsampling + softmax): the same functions in float32, "
                            "other rounding; CUDA and Triton only. Never run on a GPU yet, hence off by default "
                            "(auto: on for CUDA with Triton; docs/speed.md)")
    group.add_argument("--depthwise", default="auto", choices=("auto", *DEPTHWISE_IMPLEMENTATIONS),
                       help="the DSC discriminator's depthwise convolutions: native (PyTorch's grouped kernels), "
                            "dense (one block-diagonal dense convolution: the same function, other rounding; TF32 "
                            "under fp32 on a GPU), triton (NHWC Triton kernels, CUDA and Triton only: the same "
                            "function in float32, other rounding). auto = native until timed on a GPU; docs/speed.md")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    group.add_argument("--sync-bn", action="store_true",
                       help="under torchrun, BatchNorm statistics over the global batch of all processes "
                            "(SyncBatchNorm; CUDA only, a no-op in one process)")
    return group


def add_training_args(parser, default_lr=DEFAULT_LR):
    group = parser.add_argument_group("training")
    group.add_argument("--output-dir", required=True,
                       help="run folder: checkpoints, args, metrics, logs. A folder holding another run is refused "
                            "unless --resume continues it or --overwrite replaces it")
    group.add_argument("--overwrite", action="store_true",
                       help="delete what --output-dir holds (a previous run) before starting a fresh run there")
    group.add_argument("--batch-size", type=positive_int, default=4,
                       help="batch size per domain and per process; under torchrun one iteration (global step) "
                            "uses batch-size x processes samples of each domain")
    length = group.add_mutually_exclusive_group()
    length.add_argument("--max-iters", type=positive_int, default=None,
                        help="number of training iterations (global steps; the poly LR schedule counts them too)")
    length.add_argument("--epochs", type=positive_int, default=None,
                        help="number of epochs over the (source) training set, in global batches; "
                             "default 50 when --max-iters is not given")
    group.add_argument("--freeze-bn", action="store_true",
                       help="keep BatchNorm layers in eval mode (running statistics, not updated; affine weights "
                            "still train): for small per-process batches, and a step independent of the process count")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="segmentation network optimizer")
    group.add_argument("--learning-rate", type=positive_float, default=default_lr, help="initial learning rate (poly decay, power 0.9)")
    group.add_argument("--momentum", type=momentum_type, default=0.9, help="SGD/RMSprop momentum, in [0, 1)")
    group.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="weight decay of the segmentation network")
    group.add_argument("--val-every", type=non_negative_int, default=0,
                       help="validate every N iterations (0: once per epoch of the source set)")
    group.add_argument("--log-every", type=positive_int, default=10, help="log losses every N iterations")
    group.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                       help="write last.pth every N iterations (0: at each validation)")
    group.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                       help="start from these BiSeNet weights (this project's or the course's checkpoint) with a "
                            "fresh optimizer and LR schedule: fine-tuning, e.g. adaptation from a source-only model")
    group.add_argument("--resume", default=None,
                       help="continue from a last.pth/best.pth of this project exactly (weights, optimizers, "
                            "schedule, data order)")
    group.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="disable TensorBoard logging")
    group.add_argument("--wandb", action="store_true", help="log to Weights & Biases (honours WANDB_MODE=offline)")
    group.add_argument("--wandb-project", default="uda-bisenet", help="W&B project name")
    return group


def add_cuda_graph_arg(group):
    group.add_argument("--cuda-graph", default="off", choices=("on", "off"),
                       help="capture the training step once in a CUDA graph and replay it (engine/cuda_graph.py): "
                            "one launch per step, no host sync; losses checked on the device, a non-finite one "
                            "stops the run at the next log window. One CUDA process, bf16 or fp32, no --compile, "
                            "SGD/Adam, no FDA/DACS. Never run on a GPU yet, hence off by default (docs/speed.md)")
    return group


def add_compile_cache_arg(group):
    group.add_argument("--compile-cache", default=None, metavar="DIR|off",
                       help="with --compile: folder of Inductor's compiled kernels, kept so later runs on this machine "
                            "skip compiling (default: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/uda-bisenet/inductor); "
                            "off: compile from scratch")


def add_inference_runtime_args(parser):
    """--device, --amp, --channels-last, --compile, --no-progress of the inference scripts."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    group.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto", help="channels_last memory format")
    group.add_argument("--compile", choices=("auto", "on", "off"), default="off", help="torch.compile the network")
    add_compile_cache_arg(group)
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return group
