"""Datasets, loaders and networks built from the shared command-line options.

With no dataset path on the command line the scripts use the built-in synthetic benchmark
(generated on first use) at its native sizes; with real data, the report's sizes (GTA5 1280x720,
Cityscapes 1024x512) unless flags say otherwise. Resolved values are written back into ``args``
so each run records what it really used. Data are checked before any network is built, so a
wrong path fails in a second, not after minutes of set-up.
"""
from pathlib import Path

import torch

from dataset.cityscapes import CityscapesDataset
from dataset.common import DatasetError
from dataset.gta5 import GTA5Dataset
from dataset.normalization import get_normalization
from dataset.transforms import eval_transform, train_transform
from model import build_bisenet, load_bisenet
from model.discriminator import MIN_INPUT_SIDE, STRIDED_LAYERS
from engine.compilation import compile_network, configure_compile_cache
from engine.optim import build_optimizer
from engine.precision import Precision
from engine.data import BatchStream, eval_loader
from utils.distributed import configure_batchnorm, get_world_size
from utils.errors import OptionError
from utils.triton_support import triton_unavailable

REPORT_SOURCE_SIZE = (720, 1280)   # (height, width), GTA5 as trained in the report
REPORT_TARGET_SIZE = (512, 1024)   # Cityscapes
SOURCE_DIR, TARGET_DIR = "GTA5", "Cityscapes"


def resolve_data(args, need_source=True, training=True):
    """Fill ``args.source_root``/``args.target_root`` and the sizes; generate synthetic data if needed."""
    explicit = [getattr(args, name, None) for name in ("data_root", "source_root", "target_root")]
    args.synthetic = not any(explicit)
    if args.synthetic:
        from dataset.synthetic import SOURCE_SIZE, TARGET_SIZE, ensure_synthetic_benchmark

        args.data_root = str(ensure_synthetic_benchmark())
        default_source, default_target = SOURCE_SIZE, TARGET_SIZE
    else:
        default_source, default_target = REPORT_SOURCE_SIZE, REPORT_TARGET_SIZE
    if not args.synthetic and not args.data_root:
        needed = ["--source-root"] * (need_source and hasattr(args, "source_root")) + ["--target-root"]
        missing = [flag for flag in needed if getattr(args, flag[2:].replace("-", "_"), None) is None]
        if missing:
            raise OptionError(f"{' and '.join(missing)} missing: without --data-root give "
                             f"{' and '.join(needed)} (or --data-root alone, holding {SOURCE_DIR}/ and {TARGET_DIR}/)")
    if args.data_root:
        if not Path(args.data_root).is_dir():
            raise DatasetError(f"--data-root {args.data_root} does not exist or is not a folder "
                               f"(expected it to hold {SOURCE_DIR}/ and {TARGET_DIR}/)")
        if need_source and getattr(args, "source_root", None) is None and hasattr(args, "source_root"):
            args.source_root = str(Path(args.data_root) / SOURCE_DIR)
        if getattr(args, "target_root", None) is None:
            args.target_root = str(Path(args.data_root) / TARGET_DIR)
    if hasattr(args, "source_size") and args.source_size is None:
        args.source_size = default_source
    if hasattr(args, "target_size") and args.target_size is None:
        args.target_size = default_target
    if getattr(args, "eval_size", None) is None:
        args.eval_size = args.target_size
    crop = getattr(args, "crop_size", None)
    if crop is not None and args.scale_range is None:
        for flag, size in (("--source-size", getattr(args, "source_size", None)), ("--target-size", args.target_size)):
            if size is not None and (crop[0] > size[0] or crop[1] > size[1]):
                raise DatasetError(f"--crop-size {crop[1]}x{crop[0]} is larger than {flag} {size[1]}x{size[0]}; "
                                 f"choose a smaller crop (padding with ignore pixels would only waste compute)")
    if training:
        check_training_sizes(args)
    return args


def check_training_sizes(args):
    """Training images (after the crop) must be at least MIN_INPUT_SIDE a side: the discriminator's
    strided convolutions fail on less, long after start-up."""
    crop = getattr(args, "crop_size", None)
    for flag, size in (("--crop-size", crop), ("--source-size", None if crop else getattr(args, "source_size", None)),
                       ("--target-size", None if crop else getattr(args, "target_size", None))):
        if size is not None and min(size) < MIN_INPUT_SIDE:
            raise OptionError(f"{flag} {size[1]}x{size[0]} is too small to train on: each side must be at least "
                             f"{MIN_INPUT_SIDE} pixels (the discriminator's {STRIDED_LAYERS} stride-2 convolutions)")


def _train_transform(args, size_hw):
    return train_transform(args.crop_size or size_hw, resize_hw=size_hw, scale_range=args.scale_range, flip=args.flip)


def gta5_split(root, wanted="train"):
    """Use the list file ``root/<wanted>.txt`` when the dataset has one, else every image."""
    return wanted if (Path(root) / f"{wanted}.txt").is_file() else "all"


def source_train_dataset(args):
    return GTA5Dataset(args.source_root, split=gta5_split(args.source_root, "train"),
                       transform=_train_transform(args, args.source_size),
                       normalization=get_normalization(args.input_convention, "gta5"), skip_bad=args.skip_bad)


def target_train_dataset(args, labeled=False, pseudo_label_dir=None):
    return CityscapesDataset(args.target_root, split="train", transform=_train_transform(args, args.target_size),
                             normalization=get_normalization(args.input_convention, "cityscapes"),
                             labeled=labeled or pseudo_label_dir is not None, pseudo_label_dir=pseudo_label_dir,
                             skip_bad=args.skip_bad)


def target_eval_dataset(args, split="val", labeled=True):
    return CityscapesDataset(args.target_root, split=split, transform=eval_transform(args.eval_size),
                             normalization=get_normalization(args.input_convention, "cityscapes"),
                             labeled=labeled, skip_bad=args.skip_bad)


def train_stream(args, dataset, device, seed_offset=0, sampler=None):
    return BatchStream(dataset, args.batch_size, seed=args.seed + seed_offset, num_workers=args.workers,
                       pin_memory=device.type == "cuda", sampler=sampler)


def make_eval_loader(args, dataset, device, batch_size=1):
    return eval_loader(dataset, batch_size=batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")


def resolve_fast_paths(args, device):
    """Turn the ``auto`` choices of --channels-last/--compile into on/off for this device.

    channels_last is on for CUDA and the CPU: cuDNN and oneDNN both run their convolutions faster in
    it (the `channels_last` levers of bench/speed.py, bench/results/speed_cpu.md and speed_gpu.md).
    torch.compile only pays on CUDA, where its minutes of compilation buy faster inference.
    --classifier-first and --matmul-resize (training scripts) change the rounding, so they are on for
    CUDA only: the CPU runs, and the committed CPU results, stay bit for bit what they were.
    --fused-loss (off by default: never run on a GPU yet) needs CUDA and Triton: ``on`` without them
    is an OptionError, before any work; so does --depthwise triton (``resolve_depthwise``).
    """
    levers = (("classifier_first", ("cuda",)), ("matmul_resize", ("cuda",)))
    if hasattr(args, "fused_loss"):
        # Its Triton kernels need CUDA and Triton: auto takes it where both are; on refuses to run without.
        unavailable = triton_unavailable(device) if args.fused_loss != "off" else None
        if unavailable and args.fused_loss == "on":
            raise OptionError(f"--fused-loss on: {unavailable}; use --fused-loss off (or auto)")
        args.fused_loss = "off" if unavailable or args.fused_loss == "off" else "on"
    if hasattr(args, "depthwise"):
        resolve_depthwise(args, device)
    for flag, devices in (("channels_last", ("cuda", "cpu")), ("compile", ("cuda",)),
                          *((flag, on) for flag, on in levers if hasattr(args, flag))):
        value = getattr(args, flag, "off")
        if value == "auto":
            value = "on" if device.type in devices else "off"
        setattr(args, flag, value)
    if getattr(args, "cuda_graph", "off") == "on":
        refuse_cuda_graph_conflicts(args, device)
    if args.compile == "on":  # an unwritable --compile-cache fails here, before any work
        args.compile_cache = configure_compile_cache(getattr(args, "compile_cache", None))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    return args


def refuse_cuda_graph_conflicts(args, device):
    """--cuda-graph on: an OptionError naming the first flag the captured step cannot hold (engine.cuda_graph)."""
    conflicts = (
        (device.type != "cuda", f"needs a CUDA device (got {device})"),
        (get_world_size() > 1, "runs in one process (DistributedDataParallel's reduction is not captured)"),
        (args.compile == "on", "replaces --compile on (give one of them)"),
        (Precision(device, args.amp).mode == "fp16", "needs bf16 or fp32 (--amp fp16 decides on loss scaling "
                                                     "on the host)"),
        ("rmsprop" in (args.optimizer, getattr(args, "optimizer_d", None)),
         "needs --optimizer/--optimizer-d sgd or adam (RMSprop has no fused kernel to refuse a step on the device)"),
        (getattr(args, "self_training", "none") != "none" or getattr(args, "fda_beta", 0) > 0,
         "cannot hold --self-training dacs or --fda-beta (their draws are re-seeded on the host each step)"),
    )
    for conflict, reason in conflicts:
        if conflict:
            raise OptionError(f"--cuda-graph on {reason}; use --cuda-graph off")


def resolve_depthwise(args, device):
    """--depthwise: auto is native (neither alternative has been timed on a GPU yet); triton needs
    CUDA and Triton, else an OptionError before any work."""
    if args.depthwise == "triton":
        unavailable = triton_unavailable(device)
        if unavailable:
            raise OptionError(f"--depthwise triton: {unavailable}; use --depthwise native or dense")
    if args.depthwise == "auto":
        args.depthwise = "native"
    return args


def prepare_network(network, args, device):
    """Move to the device in the chosen memory format; apply --sync-bn / --freeze-bn and BiSeNet's
    speed levers (--classifier-first, --matmul-resize, --fused-loss) where given.

    Call it before building the optimizer and before ``wrap_ddp`` (SyncBatchNorm must be in place
    when DistributedDataParallel wraps the network).
    """
    network = network.to(device)
    if hasattr(network, "set_speed_levers"):  # a BiSeNet; the flags' defaults where a script has none
        network.set_speed_levers(classifier_first=getattr(args, "classifier_first", "off") == "on",
                                 matmul_resize=getattr(args, "matmul_resize", "off") == "on",
                                 fused_loss=getattr(args, "fused_loss", "off") == "on")
    if getattr(args, "channels_last", "off") == "on":
        network = network.to(memory_format=torch.channels_last)
    return configure_batchnorm(network, device, sync_bn=getattr(args, "sync_bn", False),
                               freeze_bn=getattr(args, "freeze_bn", False))


def maybe_compile(network, args):
    """``torch.compile`` (static shapes, cached kernels: ``engine.compilation``) when --compile is on;
    the uncompiled module is kept for checkpoints."""
    if getattr(args, "compile", "off") == "on":
        return compile_network(network)
    return network


def load_initial_bisenet(path, args, key="model", context_path=None):
    """A BiSeNet in training mode from any checkpoint ``load_bisenet`` reads: the starting point
    of a fine-tuning run (``--init-from``) or of an MPL teacher.

    Its number of classes must be ``args.num_classes``, its context path ``context_path`` when
    given (an MPL teacher may be any architecture), and its input convention the data's.
    """
    network = load_bisenet(path, key=key, expect_num_classes=args.num_classes, expect_context_path=context_path)
    if network.checkpoint_info["input_convention"] != args.input_convention:
        raise OptionError(f"{path} was trained with --input-convention {network.checkpoint_info['input_convention']}; "
                         f"pass it here too (got {args.input_convention})")
    return network.train()


def initial_bisenet(args):
    """The network a training run starts from: --init-from's weights (fine-tuning: fresh optimizer
    and schedule) or a new BiSeNet per --context-path/--pretrained."""
    if getattr(args, "init_from", None):
        return load_initial_bisenet(args.init_from, args, context_path=args.context_path)
    return build_bisenet(args.context_path, args.num_classes, args.pretrained)


def segmentation_parts(args, device):
    """The BiSeNet the flags ask for, on the device, and its optimizer (shared by the train scripts)."""
    model = prepare_network(initial_bisenet(args), args, device)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.learning_rate, args.weight_decay, args.momentum)
    return model, optimizer


def resolve_input_convention(args, model, tag):
    """``args.input_convention`` from the checkpoint unless the flag set it; prints which it is
    (eval.py and createpseudolabels.py score checkpoints of either convention)."""
    stored = model.checkpoint_info.get("input_convention") or "imagenet"
    if args.input_convention is None:
        args.input_convention = stored
    note = ("recorded in the checkpoint" if args.input_convention == stored
            else f"from the flag; the checkpoint records {stored}")
    print(f"[{tag}] input convention: {args.input_convention} ({note})")
    return args.input_convention
