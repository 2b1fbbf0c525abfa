"""The speed benchmark of the project: every figure of the speed issue, naive baseline and fast paths
measured side by side in one run, written as JSON and a Markdown summary.

Sections (``--only``/``--skip`` choose; all by default):

* ``inference``: images/s of BiSeNet (eval mode, random input, ``utils.benchmark.inference_throughput``)
  per shape, for the naive baseline (fp32 eager, NCHW, cuDNN autotuning off) and the levers one by
  one (cudnn.benchmark, bf16/fp16 autocast, channels_last, torch.compile default / reduce-overhead
  (CUDA graphs) / max-autotune-no-cudagraphs); each entry also reports the share of pixels whose
  argmax agrees with a strict fp32 eager reference (TF32 off) on a batch of structured scenes.
* ``training``: milliseconds per ``utils.engine.adversarial_step`` (BiSeNet + discriminator, source
  and target batch), naive (fp16 autocast with two GradScalers, NCHW, for-loop optimizers) against
  the levers, with the peak GPU memory; a short loss-curve comparison (fp32 vs naive AMP vs ours on a
  fixed batch); the same step fed by the project's real loaders (``BatchStream`` over PNG files).
* ``pseudolabels``: images/s of the dataset-wide threshold pass (forward + softmax + max +
  ``ConfidenceHistogram.update`` on the device) against the course's routine (fp32, one image at a
  time, per-class ``np.median`` in a Python loop), and of the statistic alone.
* ``mpl``: one MPL iteration (``utils.mpl.MPLStep``) over one adversarial iteration, same sizes.
* ``loader``: images/s of the project's datasets + transforms (decode, id -> trainId remap, resize,
  flip, normalise) on generated PNGs of the real sizes, in one process and with DataLoader workers.
* ``lut``: the 256-entry lookup-table remap against a per-class loop on the same label maps.
* ``flops``: GFLOPs (2 x MACs, ``torch.utils.flop_counter``; thop's count too where installed).
* ``trace``: where one adversarial and one MPL step spend their time (``torch.profiler``, top
  operators and kernels by self time on the device).

Weights: with random initialisation and BatchNorm statistics at their initial values the logits are
meaningless and nearly tied, so argmax agreement would measure noise; each context path is therefore
trained briefly on synthetic scenes first (``--prep-steps``), or loaded from ``--checkpoint``.

Timing: ``utils.benchmark.time_callable`` (CUDA events after warm-up on a GPU, ``perf_counter`` on
the CPU), median of many runs. The JSON is rewritten after every entry, so a run cut short keeps
what it measured; one failing entry records its error and the run goes on. A time budget
(``--budget-s``) skips what would not fit, expensive compilations last.

Examples:
  python bench/speed.py --profile gpu --out bench/results          # one H100 call, < 9 minutes
  python bench/speed.py --profile cpu --out bench/results          # small sizes on the CPU
  python bench/speed.py --profile gpu --only inference --no-compile
"""
import argparse
import contextlib
import gc
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the repository importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from dataset.labels import ID_TO_TRAINID, IGNORE_INDEX, LABELS, NUM_CLASSES  # noqa: E402
from dataset.normalization import get_normalization  # noqa: E402
from model import build_bisenet, build_discriminator  # noqa: E402
from utils.benchmark import device_name, inference_throughput, time_callable  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.engine import adversarial_step, supervised_step  # noqa: E402
from utils.logger import git_commit, plain_args, write_json, write_text  # noqa: E402
from utils.optim import ADAM_BETAS, SGD_MOMENTUM, SGD_WEIGHT_DECAY, build_optimizer  # noqa: E402
from utils.options import format_size  # noqa: E402
from utils.precision import Precision  # noqa: E402
from utils.pseudolabel_stats import MAX_THRESHOLD, ConfidenceHistogram, per_image_thresholds  # noqa: E402

SCHEMA = "bench.speed/1"
SECTIONS = ("flops", "inference", "training", "pseudolabels", "mpl", "loader", "lut", "trace")
GIB = 2 ** 30

# Learning rates of the scripts' defaults (trainUnsupervised / utils.adaptation).
LR_MODEL, LR_DISCRIMINATOR, LAMBDA_ADV = 2.5e-2, 1e-4, 1e-3
PREP_LR = 1e-2  # brief supervised training that makes the agreement check meaningful

# ---------------------------------------------------------------------------------------------
# The anchors (course code, one H100 80GB, torch 2.11) and goals, keyed by the gpu profile's
# shapes: (context path, (height, width), batch). They only apply to figures of those sizes.
# ---------------------------------------------------------------------------------------------
R18, R101 = "resnet18", "resnet101"
HALF, FULL = (512, 1024), (1024, 2048)
INFERENCE_ANCHORS = {  # images/s
    (R18, HALF, 1): {"fp32 eager": 346, "fp16 + channels_last eager": 412,
                     "compile reduce-overhead + fp16 + channels_last": 1318},
    (R18, HALF, 16): {"compile reduce-overhead + fp16 + channels_last": 2265},
    (R18, FULL, 1): {"fp32 eager": 167},
    (R101, HALF, 1): {"fp32 eager": 107},
    (R101, FULL, 1): {"fp32 eager": 59},
}
INFERENCE_GOALS = {(R18, HALF, 1): 1300, (R18, HALF, 16): 2300, (R18, FULL, 1): 450, (R101, HALF, 1): 250}
AGREEMENT_GOAL = 0.995
TRAIN_SOURCE, TRAIN_TARGET, TRAIN_BATCH = (720, 1280), (512, 1024), 4
TRAIN_ANCHORS_MS = {(R18, "dsc"): 74.8, (R18, "fcd"): 73.5, (R101, "dsc"): 138.0}
TRAIN_GOALS_MS = {(R18, "dsc"): 25.0, (R101, "dsc"): 55.0}
MEMORY_ANCHORS_GIB = {(R18, "dsc"): 3.9, (R101, "dsc"): 9.0}
PSEUDO_ANCHOR_MS_PER_IMAGE = 6.0
PSEUDO_GOAL = 1000.0  # images/s
MPL_GOAL = 2.2
E2E_GOAL = 1.10  # loader-fed iteration within 10 % of the synthetic-input one
LUT_GOAL = 10.0
FLOPS_ANCHORS = {"BiSeNet-R18": 51.3, "BiSeNet-R101": 182.8, "FCD": 30.9, "DSC": 2.1}
GTA5_FILE, CITYSCAPES_FILE = (1052, 1914), (1024, 2048)  # (height, width) of the real files
IMAGE_NOISE = 2.0  # grey levels of sensor noise: gives PNGs about the size of the real ones


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    inference: tuple            # ((context_path, (H, W), batch), ...)
    compile_plan: tuple         # ((context_path, (H, W), batch, mode, priority), ...)
    infer_warmup: int
    infer_runs: int
    compiled_runs: int
    train_source: tuple
    train_target: tuple
    train_batch: int
    train_pairs: tuple          # ((context_path, discriminator, "levers" | "pair"), ...)
    train_compile: tuple        # ((context_path, discriminator, priority), ...)
    train_warmup: int
    train_runs: int
    curve_iters: int
    e2e_iters: int
    pl_size: tuple
    pl_batch: int
    pl_naive_images: int
    pl_runs: int
    mpl_runs: int
    loader_images: int
    loader_batch: int
    loader_batches: int
    gta5_file: tuple
    cityscapes_file: tuple
    gta5_size: tuple
    cityscapes_size: tuple
    lut_shape: tuple
    lut_maps: int
    lut_runs: int
    prep_steps: int
    prep_size: tuple
    prep_batch: int
    budget_s: float
    entry_timeout_s: float
    flops_size: tuple = HALF
    flops_models: tuple = ("BiSeNet-R18", "BiSeNet-R101", "FCD", "DSC")
    flops_thop: bool = True  # also thop's count (the report's convention) where thop is installed
    mpl_variants: tuple = ("adversarial", "pham", "course")


PROFILES = {
    # One H100 call, well under the 10-minute limit: eager measurements first (~4 min), then the
    # torch.compile entries by priority while the budget lasts.
    "gpu": Profile(
        name="gpu",
        inference=((R18, HALF, 1), (R18, HALF, 16), (R18, FULL, 1), (R101, HALF, 1), (R101, FULL, 1)),
        compile_plan=((R18, HALF, 1, "reduce-overhead", 1), (R18, HALF, 16, "reduce-overhead", 3),
                      (R101, HALF, 1, "reduce-overhead", 4), (R18, FULL, 1, "reduce-overhead", 5),
                      (R18, HALF, 1, "default", 7), (R101, FULL, 1, "reduce-overhead", 9)),
        infer_warmup=10, infer_runs=30, compiled_runs=30,
        train_source=TRAIN_SOURCE, train_target=TRAIN_TARGET, train_batch=TRAIN_BATCH,
        train_pairs=((R18, "dsc", "levers"), (R18, "fcd", "pair"), (R101, "dsc", "pair")),
        train_compile=((R18, "dsc", "scripts", 2), (R101, "dsc", "scripts", 6), (R18, "dsc", "static", 10)),
        train_warmup=3, train_runs=15, curve_iters=30, e2e_iters=15,
        pl_size=HALF, pl_batch=16, pl_naive_images=16, pl_runs=10, mpl_runs=8,
        loader_images=16, loader_batch=4, loader_batches=32,
        gta5_file=GTA5_FILE, cityscapes_file=CITYSCAPES_FILE, gta5_size=TRAIN_SOURCE, cityscapes_size=TRAIN_TARGET,
        lut_shape=CITYSCAPES_FILE, lut_maps=4, lut_runs=5,
        prep_steps=60, prep_size=(256, 512), prep_batch=8,
        budget_s=480, entry_timeout_s=300),
    # Small sizes on a CPU: every code path, numbers only comparable within the run.
    "cpu": Profile(
        name="cpu",
        inference=((R18, (128, 256), 1), (R18, (128, 256), 4)),
        compile_plan=((R18, (128, 256), 1, "default", 1),),
        infer_warmup=3, infer_runs=15, compiled_runs=15,
        train_source=(128, 256), train_target=(128, 256), train_batch=2,
        train_pairs=((R18, "dsc", "levers"), (R18, "fcd", "pair")),
        train_compile=(),
        train_warmup=2, train_runs=6, curve_iters=10, e2e_iters=6,
        pl_size=(128, 256), pl_batch=4, pl_naive_images=4, pl_runs=5, mpl_runs=4,
        loader_images=8, loader_batch=2, loader_batches=8,
        gta5_file=GTA5_FILE, cityscapes_file=CITYSCAPES_FILE, gta5_size=TRAIN_SOURCE, cityscapes_size=TRAIN_TARGET,
        lut_shape=CITYSCAPES_FILE, lut_maps=4, lut_runs=5,
        prep_steps=10, prep_size=(128, 256), prep_batch=4,
        budget_s=1200, entry_timeout_s=300),
    # Toy sizes for the smoke test: seconds, no timing meaning at all.
    "toy": Profile(
        name="toy",
        inference=((R18, (64, 128), 1),),
        compile_plan=((R18, (64, 128), 1, "default", 1),),
        infer_warmup=1, infer_runs=2, compiled_runs=2,
        train_source=(64, 64), train_target=(64, 64), train_batch=2,
        train_pairs=((R18, "dsc", "pair"),),
        train_compile=(),
        train_warmup=0, train_runs=1, curve_iters=2, e2e_iters=1,
        pl_size=(64, 128), pl_batch=2, pl_naive_images=2, pl_runs=1, mpl_runs=1,
        loader_images=2, loader_batch=1, loader_batches=2,
        gta5_file=(70, 128), cityscapes_file=(64, 128), gta5_size=(64, 96), cityscapes_size=(32, 64),
        lut_shape=(64, 128), lut_maps=2, lut_runs=1,
        prep_steps=1, prep_size=(64, 128), prep_batch=2,
        budget_s=120, entry_timeout_s=60, flops_size=(64, 128), flops_models=("BiSeNet-R18", "DSC"),
        flops_thop=False, mpl_variants=("adversarial", "pham")),
}


# ---------------------------------------------------------------------------------------------
# Configurations (the levers)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferConfig:
    key: str
    label: str
    amp: str = "off"               # Precision mode, or "best" = the faster of bf16/fp16 measured eager
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile_mode: str = None       # None: eager


INFER_NAIVE = InferConfig("naive", "naive: fp32 eager, NCHW")
CUDA_INFER_LEVERS = (
    INFER_NAIVE,
    InferConfig("cudnn", "fp32 + cudnn.benchmark", cudnn_benchmark=True),
    InferConfig("bf16", "bf16 autocast", "bf16", cudnn_benchmark=True),
    InferConfig("fp16", "fp16 autocast", "fp16", cudnn_benchmark=True),
    InferConfig("bf16_cl", "bf16 + channels_last", "bf16", True, True),
    InferConfig("fp16_cl", "fp16 + channels_last", "fp16", True, True),
)
CPU_INFER_LEVERS = (INFER_NAIVE, InferConfig("cl", "fp32 + channels_last", channels_last=True))
COMPILE_LABELS = {"default": "torch.compile (default)", "reduce-overhead": "torch.compile reduce-overhead (CUDA graphs)",
                  "max-autotune-no-cudagraphs": "torch.compile max-autotune-no-cudagraphs"}
COMPILE_COST_S = {R18: 30, R101: 45}  # first call + timing on an H100 machine (16 cores): measured 14-22 s + ~5 s
MAX_AUTOTUNE_COST_S = 240


@dataclass(frozen=True)
class TrainConfig:
    key: str
    label: str
    amp: str = "off"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    optimizer: str = "for-loop"    # for-loop | foreach | fused (utils.optim.build_optimizer)
    compile: str = None            # None | "scripts" (torch.compile(model), as maybe_compile) | "static" (dynamic=False)
    discriminator_channels_last: bool = False
    finite_checks: bool = True     # False: utils.engine.check_finite (3 host syncs per step) patched out


TRAIN_NAIVE_CUDA = TrainConfig("naive", "naive: fp16 autocast + 2 GradScalers, NCHW, for-loop optimizers", "fp16")
TRAIN_SCRIPTS_CUDA = TrainConfig("ours", "bf16 + channels_last + fused + cudnn.benchmark (scripts' default)",
                                 "bf16", True, True, "fused")
CUDA_TRAIN_LEVERS = (
    TRAIN_NAIVE_CUDA,
    TrainConfig("cudnn", "+ cudnn.benchmark", "fp16", False, True),
    TrainConfig("foreach", "+ foreach optimizers", "fp16", False, True, "foreach"),
    TrainConfig("bf16", "bf16 instead of fp16 (no loss scaling)", "bf16", False, True, "foreach"),
    TRAIN_SCRIPTS_CUDA,
    TrainConfig("ours_d_cl", "ours + discriminator channels_last", "bf16", True, True, "fused",
                discriminator_channels_last=True),
    TrainConfig("ours_foreach", "ours with foreach optimizers instead of fused", "bf16", True, True, "foreach"),
    TrainConfig("ours_no_sync", "ours without the per-step finiteness checks (3 host syncs; bench-only patch)",
                "bf16", True, True, "fused", finite_checks=False),
)
TRAIN_NAIVE_CPU = TrainConfig("naive", "naive: fp32, NCHW, for-loop optimizers")
TRAIN_SCRIPTS_CPU = TrainConfig("ours", "fp32 + channels_last + fused (scripts' default on the CPU)",
                                channels_last=True, optimizer="fused")
CPU_TRAIN_LEVERS = (TRAIN_NAIVE_CPU, TRAIN_SCRIPTS_CPU,
                    TrainConfig("nchw", "ours in NCHW (--channels-last off)", optimizer="fused"),
                    TrainConfig("foreach", "ours with foreach optimizers instead of fused", channels_last=True,
                                optimizer="foreach"))
# Compiling a training step (forward + backward, source and target shapes) is slow: R18 took 200 s
# on the H100 machine (bench/results/speed_gpu_classlast_nll.md), 183 s on 2 CPU cores at toy size.
TRAIN_COMPILE_COST_S = {R18: 240, R101: 300}


def scripts_train_config(bench):
    """The training settings the scripts use by default on this bench's device."""
    return TRAIN_SCRIPTS_CUDA if bench.cuda else TRAIN_SCRIPTS_CPU


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
class EntryTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise EntryTimeout in the main thread after ``seconds`` (best effort; no-op elsewhere)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise EntryTimeout(f"entry stopped after its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_average():
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cudnn_flags(benchmark=False, allow_tf32=True, deterministic=False):
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=benchmark,
                                      deterministic=deterministic, allow_tf32=allow_tf32)


@contextlib.contextmanager
def strict_fp32():
    """No TF32 anywhere: the reference that 'fp32 eager' predictions are compared against."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with cudnn_flags(benchmark=False, allow_tf32=False, deterministic=True):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_compiler():
    """Forget earlier compilations (and their CUDA-graph pools): each compiled entry starts clean."""
    import torch._dynamo

    torch._dynamo.reset()


def quantiles(samples_s):
    """Median, p10 and p90 of timing samples, in milliseconds."""
    ordered = sorted(samples_s)
    pick = lambda q: 1e3 * ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"median_ms": 1e3 * statistics.median(ordered), "p10_ms": pick(0.1), "p90_ms": pick(0.9)}


def json_safe(value):
    """NaN/inf -> None, numpy and torch scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def size_text(size_hw):
    return format_size(size_hw)


def make_optimizer(kind, parameters, lr, implementation):
    """SGD (segmentation network) or Adam (discriminator) with the scripts' hyper-parameters.

    ``fused`` is ``utils.optim.build_optimizer`` itself; ``for-loop`` and ``foreach`` change only
    the implementation of the same update.
    """
    if implementation == "fused":
        if kind == "sgd":
            return build_optimizer("sgd", parameters, lr)
        return build_optimizer("adam", parameters, lr, weight_decay=0.0)
    flags = {"foreach": implementation == "foreach"}
    parameters = [p for p in parameters if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY, **flags)
    return torch.optim.Adam(parameters, lr=lr, betas=ADAM_BETAS, weight_decay=0.0, **flags)


class RepeatedDataset(torch.utils.data.Dataset):
    """``times`` passes over ``dataset`` as one epoch, so a loader's workers start once."""

    def __init__(self, dataset, times):
        self.dataset, self.times = dataset, times

    def __len__(self):
        return len(self.dataset) * self.times

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]


# ---------------------------------------------------------------------------------------------
# Shared state: scenes, inputs, briefly trained weights, references, loader files
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, profile, device):
        self.args, self.profile, self.device = args, profile, device
        self.cuda = device.type == "cuda"
        self.normalization = get_normalization("imagenet", "cityscapes")
        self._scenes = {}
        self._weights = {}
        self._models = {}
        self._references = {}
        self._structured = {}
        self._train_batch = None
        self._files = None
        self._tempdir = None
        self.results = None  # the Recorder's result dict, for entries that read earlier ones

    # ---- scenes (dataset.synthetic: procedural street scenes with Cityscapes id labels) -------
    def scenes(self, domain, count):
        """``count`` (image uint8 HxWx3, label ids uint8 HxW) scenes of the synthetic benchmark."""
        from dataset.synthetic import render_sample

        have = self._scenes.setdefault(domain, [])
        while len(have) < count:
            have.append(render_sample(domain, seed=0, split="train", index=len(have)))
        return have[:count]

    def scene_batch(self, domain, count, size_hw, channels_last=False):
        """(images float32 [B, 3, H, W] normalised, labels int64 [B, H, W] trainIds) on the device."""
        height, width = size_hw
        images, labels = [], []
        for image, label in self.scenes(domain, count):
            image = np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
            images.append(self.normalization(image))
            labels.append(torch.from_numpy(ID_TO_TRAINID[label].astype(np.int64)))
        images = torch.stack(images).to(self.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.stack(labels).to(self.device)

    def structured(self, size_hw, batch):
        """The fixed structured input of the agreement check (target scenes, NCHW)."""
        key = (tuple(size_hw), batch)
        if key not in self._structured:
            self._structured[key] = self.scene_batch("target", batch, size_hw)[0]
        return self._structured[key]

    def train_batch(self):
        """Fixed source images + labels and target images at the profile's training sizes."""
        if self._train_batch is None:
            p = self.profile
            source, labels = self.scene_batch("source", p.train_batch, p.train_source)
            target, _ = self.scene_batch("target", p.train_batch, p.train_target)
            self._train_batch = (source, labels, target)
        return self._train_batch

    # ---- weights ---------------------------------------------------------------------------
    def weights(self, context_path):
        """State dict of a BiSeNet for ``context_path``: --checkpoint, or briefly trained."""
        if context_path in self._weights:
            return self._weights[context_path]
        info = {"source": None}
        if self.args.checkpoint:
            from model import load_bisenet

            loaded = load_bisenet(self.args.checkpoint, map_location="cpu")
            if loaded.context_path_name == context_path:
                convention = loaded.checkpoint_info.get("input_convention") or "imagenet"
                self.normalization = get_normalization(convention, "cityscapes")
                self._weights[context_path] = ({k: v.clone() for k, v in loaded.state_dict().items()},
                                               {"source": f"checkpoint {self.args.checkpoint}",
                                                "input_convention": convention})
                return self._weights[context_path]
        p = self.profile
        torch.manual_seed(0)
        model = build_bisenet(context_path).to(self.device).train()
        optimizer = build_optimizer("sgd", model.parameters(), PREP_LR)
        precision = Precision(self.device, "auto")
        scaler = precision.grad_scaler()
        # Trained on source-like scenes, checked on target-like ones: predictions as unsure as a
        # GTA5-trained model's on Cityscapes, not the over-confident ones of its own training images.
        images, labels = self.scene_batch("source", max(p.prep_batch, 2), p.prep_size)
        started = time.perf_counter()
        losses = []
        with cudnn_flags(benchmark=self.cuda):
            for step in range(p.prep_steps):
                losses.append(supervised_step(model, optimizer, scaler, precision, images, labels)["loss_seg"])
        synchronize(self.device)
        info.update(source=f"random init + {p.prep_steps} supervised steps on {len(images)} synthetic source scenes "
                           f"at {size_text(p.prep_size)} (precision {precision.mode}, SGD lr {PREP_LR})",
                    first_loss=float(losses[0]) if losses else None, last_loss=float(losses[-1]) if losses else None,
                    seconds=time.perf_counter() - started)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del model, optimizer
        self._weights[context_path] = (state, info)
        return self._weights[context_path]

    def model(self, context_path, channels_last=False):
        """Eval-mode BiSeNet with the prepared weights, on the device, NCHW or channels_last."""
        key = (context_path, channels_last)
        if key not in self._models:
            state, _ = self.weights(context_path)
            model = build_bisenet(context_path)
            model.load_state_dict(state)
            model = model.to(self.device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            self._models[key] = model.eval()
        return self._models[key]

    @torch.no_grad()
    def reference(self, context_path, size_hw, batch):
        """Strict fp32 eager argmax on the structured batch, and the share of near-tied pixels."""
        key = (context_path, tuple(size_hw), batch)
        if key not in self._references:
            model = self.model(context_path)
            with strict_fp32():
                logits = model(self.structured(size_hw, batch)).float()
            top2 = logits.topk(2, dim=1).values
            ambiguous = float(((top2[:, 0] - top2[:, 1]) < 1e-2).float().mean())
            self._references[key] = (logits.argmax(1), ambiguous)
            del logits, top2
        return self._references[key]

    @torch.no_grad()
    def agreement(self, context_path, size_hw, batch, network, precision, channels_last):
        reference, ambiguous = self.reference(context_path, size_hw, batch)
        images = self.structured(size_hw, batch)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            prediction = network(images).argmax(1)
        return {"agreement": float((prediction == reference).float().mean()),
                "reference_near_ties": ambiguous}

    # ---- PNG files of the real sizes for the loader measurements ---------------------------
    def loader_files(self):
        """GTA5 (images + palette labels) and Cityscapes (official layout) PNGs at the real sizes."""
        if self._files is not None:
            return self._files
        p = self.profile
        if self.args.data_dir:
            root = Path(self.args.data_dir)
        else:
            self._tempdir = tempfile.mkdtemp(prefix="speed_bench_")
            root = Path(self._tempdir)
        gta_images, gta_labels = root / "GTA5" / "images", root / "GTA5" / "labels"
        city = "benchcity"
        cs_images = root / "Cityscapes" / "leftImg8bit" / "train" / city
        cs_labels = root / "Cityscapes" / "gtFine" / "train" / city
        for folder in (gta_images, gta_labels, cs_images, cs_labels):
            folder.mkdir(parents=True, exist_ok=True)
        palette = np.zeros((256, 3), np.uint8)
        for label in LABELS:
            palette[label.id] = label.color
        jobs = []
        for index in range(p.loader_images):
            name = f"{index + 1:05d}.png"
            jobs.append(("source", index, p.gta5_file, gta_images / name, gta_labels / name, palette))
        for index in range(p.loader_images):
            stem = f"{city}_{index:06d}_000019"
            jobs.append(("target", index, p.cityscapes_file, cs_images / f"{stem}_leftImg8bit.png",
                         cs_labels / f"{stem}_gtFine_labelIds.png", None))
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_write_scene_pngs, jobs))
        sizes = {"gta5": [p_.stat().st_size for p_ in gta_images.glob("*.png")],
                 "cityscapes": [p_.stat().st_size for p_ in cs_images.glob("*.png")]}
        self._files = {
            "root": str(root), "gta5": str(root / "GTA5"), "cityscapes": str(root / "Cityscapes"),
            "images_per_domain": p.loader_images, "generation_s": time.perf_counter() - started,
            "gta5_file_size": size_text(p.gta5_file), "cityscapes_file_size": size_text(p.cityscapes_file),
            "mean_image_mb": {k: float(np.mean(v)) / 1e6 for k, v in sizes.items()},
            "note": "synthetic street scenes upsampled to the real file sizes plus sensor noise "
                    f"(sigma {IMAGE_NOISE}); real leftImg8bit PNGs are about 2-2.5 MB",
        }
        return self._files

    def close(self):
        if self._tempdir and not self.args.keep_data:
            shutil.rmtree(self._tempdir, ignore_errors=True)


def _write_scene_pngs(job):
    """Render one synthetic scene, upsample it to the real file size, add noise, write image + label."""
    from dataset.synthetic import render_sample

    domain, index, size_hw, image_path, label_path, palette = job
    image, label = render_sample(domain, seed=0, split="train", index=index)
    height, width = size_hw
    rng = np.random.default_rng(index)
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR), np.float32)
    image = np.clip(image + rng.normal(0.0, IMAGE_NOISE, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(image_path)
    label = Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST)
    if palette is not None:  # GTA5 ships palette PNGs whose indices are the ids
        label = label.convert("P")
        label.putpalette(palette.reshape(-1).tolist())
    label.save(label_path)


# ---------------------------------------------------------------------------------------------
# Recorder: budget, per-entry time limit, errors, incremental JSON + Markdown
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    section: str
    key: str
    name: str
    fn: object
    settings: dict = field(default_factory=dict)
    cost_s: float = 5.0
    phase: int = 0       # 0: eager measurements, 1: compilations (after every eager entry)
    priority: float = 0  # within phase 1: lower first


class Recorder:
    def __init__(self, args, profile, device, out_dir):
        self.args, self.profile, self.device = args, profile, device
        self.out_dir = Path(out_dir)
        self.started = time.perf_counter()
        self.budget_s = args.budget_s if args.budget_s is not None else profile.budget_s
        self.result = {
            "schema": SCHEMA,
            "profile": profile.name,
            "device": device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "git_commit": git_commit(),
            "args": plain_args(args),
            "settings": {
                "cudnn.allow_tf32 (default)": torch.backends.cudnn.allow_tf32,
                "matmul.allow_tf32 (default)": torch.backends.cuda.matmul.allow_tf32,
                "budget_s": self.budget_s,
                "timing": "CUDA events after warm-up, median" if device.type == "cuda" else "perf_counter, median",
            },
            "load_average_start": load_average(),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "sections": {},
            "summary": [],
        }
        self.before_write = None  # hook: refresh derived fields before each write

    def elapsed(self):
        return time.perf_counter() - self.started

    def remaining(self):
        return self.budget_s - self.elapsed()

    def section(self, name):
        return self.result["sections"].setdefault(name, {"entries": [], "notes": []})

    def note(self, section, text):
        notes = self.section(section)["notes"]
        if text not in notes:
            notes.append(text)

    def find(self, section, key):
        for entry in self.section(section)["entries"]:
            if entry["key"] == key:
                return entry
        return None

    def run(self, job):
        entry = {"key": job.key, "name": job.name, "settings": job.settings}
        remaining = self.remaining()
        started, started_cpu = time.perf_counter(), time.process_time()
        if remaining < job.cost_s:
            entry["skipped"] = f"time budget: {remaining:.0f} s left of {self.budget_s:.0f} s, needs about {job.cost_s:.0f} s"
        else:
            if self.device.type == "cpu":
                entry["load_average_before"] = load_average()
            limit = min(self.args.entry_timeout_s or self.profile.entry_timeout_s, remaining + 20)
            try:
                with time_limit(limit):
                    outcome = job.fn() or {}
                entry.update(outcome)
            except Exception as error:  # noqa: BLE001 - one failed measurement must not end the run
                entry["error"] = f"{type(error).__name__}: {error}".strip()[:2000]
                traceback.print_exc(limit=4)
            finally:
                release_memory(self.device)
        entry["wall_s"] = round(time.perf_counter() - started, 2)
        entry["process_cpu_s"] = round(time.process_time() - started_cpu, 2)  # this process only, all threads
        self.section(job.section)["entries"].append(entry)
        if self.before_write is not None:
            self.before_write()
        print(f"[{self.elapsed():6.0f} s] {job.section:12s} {job.name}: {_short(entry)}", flush=True)
        self.write()
        return entry

    def write(self, final=False):
        self.result["wall_s"] = round(self.elapsed(), 1)
        self.result["load_average_end"] = load_average()
        self.result["complete"] = final
        self.result["summary"] = summary_rows(self.result, self.profile)
        stem = self.out_dir / f"speed_{self.profile.name}"
        write_json(stem.with_suffix(".json"), json_safe(self.result))
        write_text(stem.with_suffix(".md"), markdown(self.result))


def _version(package):
    try:
        module = __import__(package)
        return getattr(module, "__version__", None)
    except ImportError:
        return None


def _short(entry):
    if "error" in entry:
        return "ERROR " + entry["error"][:160]
    if "skipped" in entry:
        return "skipped (" + entry["skipped"] + ")"
    for field_name, unit in (("images_per_s", "img/s"), ("median_ms", "ms"), ("speedup", "x"), ("gflops", "GFLOPs"),
                             ("max_rel_diff", "max rel diff")):
        if entry.get(field_name) is not None:
            return f"{entry[field_name]:.4g} {unit}"
    return "done"


# ---------------------------------------------------------------------------------------------
# (1) Inference
# ---------------------------------------------------------------------------------------------
def infer_key(context_path, size_hw, batch, config_key):
    return f"{context_path}/{size_text(size_hw)}/b{batch}/{config_key}"


def best_eager_amp(recorder, context_path, size_hw, batch):
    """fp16 or bf16, whichever was faster eager with channels_last for this shape (fp16 if unknown)."""
    rates = {}
    for amp in ("bf16", "fp16"):
        entry = recorder.find("inference", infer_key(context_path, size_hw, batch, f"{amp}_cl"))
        if entry and entry.get("images_per_s"):
            rates[amp] = entry["images_per_s"]
    return max(rates, key=rates.get) if rates else "fp16"


def measure_inference(bench, recorder, context_path, size_hw, batch, config, warmup, runs):
    device = bench.device
    amp = best_eager_amp(recorder, context_path, size_hw, batch) if config.amp == "best" else config.amp
    precision = Precision(device, amp)
    model = bench.model(context_path, channels_last=config.channels_last)
    height, width = size_hw
    network, compile_s = model, None
    with cudnn_flags(benchmark=config.cudnn_benchmark):
        if config.compile_mode:
            reset_compiler()
            mode = None if config.compile_mode == "default" else config.compile_mode
            network = torch.compile(model, mode=mode, dynamic=False)
            probe = torch.randn(batch, 3, height, width, device=device)
            if config.channels_last:
                probe = probe.contiguous(memory_format=torch.channels_last)
            started = time.perf_counter()
            with torch.no_grad(), precision.autocast():
                network(probe)
            synchronize(device)
            compile_s = time.perf_counter() - started
        result = inference_throughput(network, device, batch, height, width, precision,
                                      channels_last=config.channels_last, warmup=warmup, runs=runs)
        result.update(bench.agreement(context_path, size_hw, batch, network, precision, config.channels_last))
    result.update(precision=amp, compile_s=compile_s, median_ms=1e3 * result["median_s"])
    if config.compile_mode:
        del network
        reset_compiler()
    return result


def inference_jobs(bench, recorder):
    p, cuda, args = bench.profile, bench.cuda, bench.args
    levers = CUDA_INFER_LEVERS if cuda else CPU_INFER_LEVERS
    jobs = []
    for context_path, size_hw, batch in p.inference:
        shape = f"{context_path} {size_text(size_hw)} b{batch}"
        for config in levers:
            jobs.append(Job("inference", infer_key(context_path, size_hw, batch, config.key), f"{shape} | {config.label}",
                            _bind(measure_inference, bench, recorder, context_path, size_hw, batch, config,
                                  p.infer_warmup, p.infer_runs),
                            settings=_infer_settings(context_path, size_hw, batch, config), cost_s=3))
    if args.no_compile:
        recorder.note("inference", "torch.compile entries not run (--no-compile)")
        return jobs
    plan = list(p.compile_plan)
    if args.max_autotune and cuda:
        plan.append((R18, p.inference[0][1], p.inference[0][2], "max-autotune-no-cudagraphs", 10))
    for context_path, size_hw, batch, mode, priority in plan:
        if mode == "reduce-overhead" and not cuda:
            continue
        amp = "best" if cuda else "off"
        config = InferConfig(f"compile_{mode}", f"{COMPILE_LABELS[mode]} + {'fp16/bf16 (faster eager)' if cuda else 'fp32'}"
                                                f" + channels_last", amp, True, cuda, mode)
        cost = MAX_AUTOTUNE_COST_S if mode.startswith("max-autotune") else COMPILE_COST_S[context_path]
        shape = f"{context_path} {size_text(size_hw)} b{batch}"
        jobs.append(Job("inference", infer_key(context_path, size_hw, batch, config.key), f"{shape} | {config.label}",
                        _bind(measure_inference, bench, recorder, context_path, size_hw, batch, config,
                              p.infer_warmup, p.compiled_runs),
                        settings=_infer_settings(context_path, size_hw, batch, config), cost_s=cost if cuda else 30,
                        phase=1, priority=priority))
    return jobs


def _infer_settings(context_path, size_hw, batch, config):
    return {"context_path": context_path, "size": size_text(size_hw), "batch_size": batch, "amp": config.amp,
            "channels_last": config.channels_last, "cudnn_benchmark": config.cudnn_benchmark,
            "compile": config.compile_mode or "off", "model_mode": "eval", "input": "torch.randn (timing); "
            "structured scenes (agreement)"}


def _bind(fn, *args):
    return lambda: fn(*args)


# ---------------------------------------------------------------------------------------------
# (2) Training
# ---------------------------------------------------------------------------------------------
def train_key(context_path, discriminator, config_key):
    return f"{context_path}+{discriminator}/{config_key}"


def build_training(bench, context_path, discriminator_name, config, seed=0):
    """(network to call, model, discriminator, optimizers, scalers, precision) for one configuration."""
    device = bench.device
    torch.manual_seed(seed)
    model = build_bisenet(context_path).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    discriminator = build_discriminator(discriminator_name).to(device)
    if config.discriminator_channels_last:
        discriminator = discriminator.to(memory_format=torch.channels_last)
    model.train()
    discriminator.train()
    optimizer = make_optimizer("sgd", model.parameters(), LR_MODEL, config.optimizer)
    optimizer_d = make_optimizer("adam", discriminator.parameters(), LR_DISCRIMINATOR, config.optimizer)
    precision = Precision(device, config.amp)
    if config.compile == "static":
        network = torch.compile(model, dynamic=False)
    else:
        network = torch.compile(model) if config.compile else model
    return network, model, discriminator, optimizer, optimizer_d, precision.grad_scaler(), precision.grad_scaler(), precision


def measure_training(bench, context_path, discriminator_name, config):
    device, p = bench.device, bench.profile
    source, labels, target = bench.train_batch()
    if config.compile:
        reset_compiler()
    network, model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision = build_training(
        bench, context_path, discriminator_name, config)

    def step():
        adversarial_step(network, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision,
                         source, labels, target, lambda_adv=LAMBDA_ADV)

    result = {}
    with cudnn_flags(benchmark=config.cudnn_benchmark), finite_checks(config.finite_checks):
        if bench.cuda:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if config.compile:
            started = time.perf_counter()
            step()
            synchronize(device)
            result["compile_s"] = time.perf_counter() - started
        _, samples = time_callable(step, device, warmup=p.train_warmup, runs=p.train_runs)
        if bench.cuda:
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    result.update(quantiles(samples), runs=p.train_runs, warmup=p.train_warmup, precision=precision.mode)
    if config.compile:
        reset_compiler()
    return result


@contextlib.contextmanager
def finite_checks(enabled):
    """With ``enabled=False``, ``utils.engine.check_finite`` does nothing while the block runs: what
    the step would cost without its host synchronisations (the measurement only; never in training)."""
    import utils.engine as engine

    original = engine.check_finite
    if not enabled:
        engine.check_finite = lambda losses: None
    try:
        yield
    finally:
        engine.check_finite = original


def _train_settings(bench, context_path, discriminator, config):
    p = bench.profile
    return {"context_path": context_path, "discriminator": discriminator, "batch_size": p.train_batch,
            "source_size": size_text(p.train_source), "target_size": size_text(p.train_target),
            "amp": config.amp, "grad_scalers": 2 if config.amp == "fp16" else 0, "channels_last": config.channels_last,
            "discriminator_channels_last": config.discriminator_channels_last,
            "cudnn_benchmark": config.cudnn_benchmark, "optimizers": config.optimizer,
            "compile": config.compile or "off", "finite_checks": config.finite_checks,
            "step": "utils.engine.adversarial_step",
            "input": "fixed synthetic scenes already on the device"}


def loss_curves(bench):
    """Losses of ``curve_iters`` steps on one fixed batch from one initialisation: fp32 (strict) vs
    naive AMP vs ours; relative deviations from fp32 per loss term.

    Training amplifies any rounding difference, so the yardstick of "within noise" is measured too:
    ``fp32_cl`` is the same strict fp32 computation in channels_last, which only changes the order of
    the sums. On the CPU ``ours`` is fp32 too (channels_last, fused optimizers), so its deviation is
    rounding alone, of the size of fp32_cl's noise floor.
    """
    device, p = bench.device, bench.profile
    source, labels, target = bench.train_batch()
    variants = {"fp32": TrainConfig("fp32", "fp32 strict (no TF32)", "off", False, False, "foreach"),
                "fp32_cl": TrainConfig("fp32_cl", "fp32 strict, channels_last", "off", True, False, "foreach")}
    if bench.cuda:
        variants["naive"] = TRAIN_NAIVE_CUDA
        variants["ours"] = TRAIN_SCRIPTS_CUDA
    else:
        variants["ours"] = TRAIN_SCRIPTS_CPU
    curves = {}
    for name, config in variants.items():
        network, model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision = build_training(
            bench, R18, "dsc", config, seed=0)
        history = []
        context = strict_fp32() if name.startswith("fp32") else cudnn_flags(benchmark=config.cudnn_benchmark)
        with context:
            for _ in range(p.curve_iters):
                history.append(adversarial_step(network, discriminator, optimizer, optimizer_d, scaler, scaler_d,
                                                precision, source, labels, target, lambda_adv=LAMBDA_ADV))
        curves[name] = {term: [float(step[term]) for step in history] for term in history[0]}
        del network, model, discriminator, optimizer, optimizer_d
        release_memory(device)
    result = {"iterations": p.curve_iters, "context_path": R18, "discriminator": "dsc", "curves": curves,
              "deviation_from_fp32": {}}
    for name in curves:
        if name == "fp32":
            continue
        result["deviation_from_fp32"][name] = {
            term: _relative_deviation(curves[name][term], curves["fp32"][term]) for term in curves["fp32"]}
    ours = result["deviation_from_fp32"]["ours"]["loss_seg"]
    result["max_rel_diff"] = ours["max"]
    result["mean_rel_diff"] = ours["mean"]
    deviations = result["deviation_from_fp32"]
    if "naive" in deviations:
        result["naive_mean_rel_diff"] = deviations["naive"]["loss_seg"]["mean"]
    result["noise_mean_rel_diff"] = deviations.get("fp32_cl", deviations["ours"])["loss_seg"]["mean"]
    return result


def _relative_deviation(values, reference):
    diffs = [abs(a - b) / max(abs(b), 1e-8) for a, b in zip(values, reference)]
    return {"max": max(diffs), "mean": float(np.mean(diffs)), "last": diffs[-1]}


def measure_e2e(bench, recorder):
    """The scripts' default step fed by the project's loaders (BatchStream over the PNG files)."""
    from dataset.cityscapes import CityscapesDataset
    from dataset.gta5 import GTA5Dataset
    from dataset.transforms import train_transform
    from utils.data import BatchStream, to_device

    device, p = bench.device, bench.profile
    files = bench.loader_files()
    workers = max(1, min(16, os.cpu_count() or 1) // 2)  # per stream: both streams share the cores
    source = GTA5Dataset(files["gta5"], transform=train_transform(p.train_source, resize_hw=p.train_source))
    target = CityscapesDataset(files["cityscapes"], split="train", labeled=False,
                               transform=train_transform(p.train_target, resize_hw=p.train_target))
    repeats = max(1, (p.e2e_iters + p.train_warmup + 2) * p.train_batch // len(source) + 1)
    streams = {
        "source": BatchStream(RepeatedDataset(source, repeats), p.train_batch, seed=0, num_workers=workers,
                              pin_memory=bench.cuda),
        "target": BatchStream(RepeatedDataset(target, repeats), p.train_batch, seed=1, num_workers=workers,
                              pin_memory=bench.cuda),
    }
    config = scripts_train_config(bench)
    network, model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision = build_training(
        bench, R18, "dsc", config)

    def step():
        batches = {name: to_device(next(stream), device) for name, stream in streams.items()}
        adversarial_step(network, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision,
                         batches["source"]["image"], batches["source"]["label"], batches["target"]["image"],
                         lambda_adv=LAMBDA_ADV)

    started = time.perf_counter()
    with cudnn_flags(benchmark=config.cudnn_benchmark):
        step()  # starts the workers
        first_s = time.perf_counter() - started
        _, samples = time_callable(step, device, warmup=p.train_warmup, runs=p.e2e_iters)
    result = {**quantiles(samples), "first_iteration_s": first_s, "workers_per_stream": workers,
              "streams": 2, "pin_memory": bench.cuda, "files": files}
    synthetic = recorder.find("training", train_key(R18, "dsc", "ours"))
    if synthetic and synthetic.get("median_ms"):
        result["synthetic_median_ms"] = synthetic["median_ms"]
        result["ratio_to_synthetic"] = result["median_ms"] / synthetic["median_ms"]
    return result


def training_jobs(bench, recorder):
    p, args = bench.profile, bench.args
    levers = CUDA_TRAIN_LEVERS if bench.cuda else CPU_TRAIN_LEVERS
    naive, scripts = (TRAIN_NAIVE_CUDA, TRAIN_SCRIPTS_CUDA) if bench.cuda else (TRAIN_NAIVE_CPU, TRAIN_SCRIPTS_CPU)
    jobs = []
    for context_path, discriminator, scope in p.train_pairs:
        configs = levers if scope == "levers" else (naive, scripts)
        for config in configs:
            jobs.append(Job("training", train_key(context_path, discriminator, config.key),
                            f"{context_path}+{discriminator.upper()} | {config.label}",
                            _bind(measure_training, bench, context_path, discriminator, config),
                            settings=_train_settings(bench, context_path, discriminator, config), cost_s=5))
    jobs.append(Job("training", "loss_curves", f"loss curves R18+DSC, {p.curve_iters} iterations, fixed batch",
                    _bind(loss_curves, bench), settings={"variants": "fp32 strict / naive AMP / ours"}, cost_s=10))
    jobs.append(Job("training", "e2e", "R18+DSC ours, fed by the real loaders (PNG files, workers)",
                    _bind(measure_e2e, bench, recorder),
                    settings={"loader": "utils.data.BatchStream x2", "transforms": "resize + flip + normalise"},
                    cost_s=20))
    if args.no_compile or args.compile_train == "off":
        recorder.note("training", "torch.compile entries not run (--no-compile / --compile-train off)")
        return jobs
    pairs = p.train_compile if args.compile_train == "auto" else tuple(
        (cp, d, "scripts", 5 + i) for i, (cp, d, _) in enumerate(p.train_pairs))
    labels = {"scripts": "ours + torch.compile(model) as utils.builders.maybe_compile",
              "static": "ours + torch.compile(model, dynamic=False)"}
    for context_path, discriminator, kind, priority in pairs:
        config = TrainConfig(f"ours_compile_{kind}", labels[kind], scripts.amp, scripts.channels_last,
                             scripts.cudnn_benchmark, scripts.optimizer, kind)
        jobs.append(Job("training", train_key(context_path, discriminator, config.key),
                        f"{context_path}+{discriminator.upper()} | {config.label}",
                        _bind(measure_training, bench, context_path, discriminator, config),
                        settings=_train_settings(bench, context_path, discriminator, config),
                        cost_s=TRAIN_COMPILE_COST_S[context_path], phase=1, priority=priority))
    return jobs


# ---------------------------------------------------------------------------------------------
# (3) Pseudo labels
# ---------------------------------------------------------------------------------------------
def course_thresholds(pred, conf, num_classes=NUM_CLASSES, max_threshold=MAX_THRESHOLD):
    """The course's per-image routine: a Python loop over classes, np.median of each one's confidences."""
    thresholds = np.zeros(num_classes)
    for class_id in range(num_classes):
        values = conf[pred == class_id]
        if values.size:
            thresholds[class_id] = min(float(np.median(values)), max_threshold)
    return thresholds


def pseudolabel_jobs(bench, recorder):
    p, device = bench.profile, bench.device
    height, width = p.pl_size
    batch = p.pl_batch
    amp = "best" if bench.cuda else "off"
    settings = {"context_path": R18, "size": size_text(p.pl_size), "batch_size": batch}

    def images():
        return bench.structured(p.pl_size, batch)

    def naive_routine():
        model = bench.model(R18)
        x = images()[:p.pl_naive_images] if p.pl_naive_images <= batch else bench.structured(p.pl_size, p.pl_naive_images)

        @torch.no_grad()
        def routine():
            for index in range(len(x)):
                probs = F.softmax(model(x[index:index + 1]), dim=1)
                conf, pred = probs.max(dim=1)
                course_thresholds(pred[0].cpu().numpy(), conf[0].cpu().numpy())

        with cudnn_flags(benchmark=False):
            _, samples = time_callable(routine, device, warmup=1, runs=max(2, p.pl_runs // 3))
        median = statistics.median(samples)
        return {"images_per_s": len(x) / median, "ms_per_image": 1e3 * median / len(x), "images": len(x)}

    cache = {}

    @torch.no_grad()
    def predictions():
        """(conf float32, pred int64) [B, H, W] of the fp32 model on the structured batch, once."""
        if "predictions" not in cache:
            logits = bench.model(R18)(images())
            cache["predictions"] = F.softmax(logits.float(), dim=1).max(dim=1)
        return cache["predictions"]

    def statistic_naive():
        conf, pred = predictions()
        conf, pred = conf.cpu().numpy(), pred.cpu().numpy()
        started = time.perf_counter()
        naive = [course_thresholds(pr, co) for pr, co in zip(pred, conf)]
        elapsed = time.perf_counter() - started
        ours = per_image_thresholds(torch.from_numpy(pred), torch.from_numpy(conf)).numpy()
        return {"images_per_s": len(pred) / elapsed, "images": len(pred),
                "max_abs_diff_vs_per_image_thresholds": float(np.abs(np.stack(naive) - ours).max())}

    def statistic_ours(per_image):
        conf, pred = predictions()
        histogram = ConfidenceHistogram(NUM_CLASSES, device=device)
        fn = (lambda: per_image_thresholds(pred, conf)) if per_image else (lambda: histogram.update(pred, conf))
        median, _ = time_callable(fn, device, warmup=2, runs=p.pl_runs)
        return {"images_per_s": batch / median, "median_ms": 1e3 * median}

    def pass_one(benchmark, deterministic, scale=1, compile_mode=None):
        from utils.pseudolabels import predict_probabilities

        chosen = best_eager_amp(recorder, R18, p.pl_size, batch) if amp == "best" else amp
        precision = Precision(device, chosen)
        model = bench.model(R18, channels_last=bench.cuda)
        network = model
        if compile_mode:
            reset_compiler()
            network = torch.compile(model, mode=None if compile_mode == "default" else compile_mode, dynamic=False)
        x = images()
        histogram = ConfidenceHistogram(NUM_CLASSES, device=device)
        output_size = (height * scale, width * scale)

        @torch.no_grad()
        def step():
            probs = predict_probabilities(network, x, output_size, precision)
            conf, pred = probs.max(dim=1)
            histogram.update(pred, conf)

        with cudnn_flags(benchmark=benchmark, deterministic=deterministic):
            median, _ = time_callable(step, device, warmup=3, runs=p.pl_runs)
        if compile_mode:
            del network
            reset_compiler()
        return {"images_per_s": batch / median, "median_ms": 1e3 * median, "precision": chosen,
                "output_size": size_text(output_size)}

    jobs = [
        Job("pseudolabels", "naive", "naive: course routine (fp32 eager, one image at a time, per-class np.median loop)",
            naive_routine, settings={**settings, "batch_size": 1, "amp": "off"}),
        Job("pseudolabels", "stat_naive", "statistic only: per-class np.median loop on CPU arrays (same predictions)",
            statistic_naive, settings=settings),
        Job("pseudolabels", "stat_per_image", "statistic only: per_image_thresholds, batched on the device",
            _bind(statistic_ours, True), settings=settings),
        Job("pseudolabels", "stat_histogram", "statistic only: ConfidenceHistogram.update on the device",
            _bind(statistic_ours, False), settings=settings),
        Job("pseudolabels", "pass1", "pass 1 as utils.pseudolabels runs it (deterministic cuDNN)",
            _bind(pass_one, False, True), settings={**settings, "amp": amp, "cudnn": "deterministic"}),
        Job("pseudolabels", "pass1_benchmark", "pass 1 with cudnn.benchmark",
            _bind(pass_one, True, False), settings={**settings, "amp": amp, "cudnn": "benchmark"}),
        Job("pseudolabels", "pass1_fullres", "pass 1, softmax at 2x the inference size (labels at full resolution)",
            _bind(pass_one, True, False, 2), settings={**settings, "amp": amp, "output": "2x"}),
    ]
    if bench.cuda and not bench.args.no_compile:
        jobs.append(Job("pseudolabels", "pass1_compiled", "pass 1 with torch.compile reduce-overhead",
                        _bind(pass_one, True, False, 1, "reduce-overhead"),
                        settings={**settings, "amp": amp, "compile": "reduce-overhead"},
                        cost_s=COMPILE_COST_S[R18], phase=1, priority=8))
    return jobs


# ---------------------------------------------------------------------------------------------
# (4) MPL
# ---------------------------------------------------------------------------------------------
def mpl_step_callable(bench, kind):
    """One call = one iteration of ``kind`` (adversarial | pham | course) with the scripts' default
    settings at the training sizes (ImportError when ``utils.mpl`` cannot be imported)."""
    from utils.mpl import Learner, MPLStep, PseudoLabeler
    from utils.mpl_feedback import CourseFeedback, PhamFeedback

    config = scripts_train_config(bench)
    source, labels, target = bench.train_batch()
    precision = Precision(bench.device, config.amp)

    def learner():
        network, _, discriminator, optimizer, optimizer_d, scaler, scaler_d, _ = build_training(
            bench, R18, "dsc", config)
        return Learner(network, optimizer, scaler, discriminator, optimizer_d, scaler_d)

    if kind == "adversarial":
        student = learner()
        return lambda: adversarial_step(student.model, student.discriminator, student.optimizer, student.optimizer_d,
                                        student.scaler, student.scaler_d, precision, source, labels, target,
                                        lambda_adv=LAMBDA_ADV)
    feedback = PhamFeedback() if kind == "pham" else CourseFeedback(batches_per_epoch=1000)
    step = MPLStep(learner(), learner(), PseudoLabeler(NUM_CLASSES).to(bench.device), feedback.to(bench.device),
                   precision, lambda_adv=LAMBDA_ADV)
    counter = iter(range(10 ** 9))
    return lambda: step(source, labels, target, next(counter))


def _train_default_settings(bench):
    p, config = bench.profile, scripts_train_config(bench)
    return {"context_path": R18, "discriminator": "dsc", "batch_size": p.train_batch,
            "source_size": size_text(p.train_source), "target_size": size_text(p.train_target),
            "amp": config.amp, "channels_last": config.channels_last, "optimizers": config.optimizer}


def mpl_jobs(bench, recorder):
    p = bench.profile
    config = scripts_train_config(bench)

    def measure(kind):
        try:
            call = mpl_step_callable(bench, kind)
        except ImportError as error:
            return {"skipped": f"utils.mpl not importable ({error})"}
        with cudnn_flags(benchmark=config.cudnn_benchmark):
            _, samples = time_callable(call, bench.device, warmup=p.train_warmup, runs=p.mpl_runs)
        result = quantiles(samples)
        if kind != "adversarial":
            baseline = recorder.find("mpl", "adversarial")
            if baseline and baseline.get("median_ms"):
                result["ratio_to_adversarial"] = result["median_ms"] / baseline["median_ms"]
        return result

    return [Job("mpl", kind, name, _bind(measure, kind), settings=_train_default_settings(bench), cost_s=10)
            for kind, name in (("adversarial", "adversarial step (ours)"), ("pham", "MPL step, pham feedback"),
                               ("course", "MPL step, course feedback")) if kind in p.mpl_variants]


# ---------------------------------------------------------------------------------------------
# Where a step's time goes: torch.profiler, per operator and kernel
# ---------------------------------------------------------------------------------------------
TRACE_ROWS = 25


def _event_time_us(event, cuda):
    """Self time of a profiler average on the device (CUDA) or the CPU, in microseconds (names
    changed across torch versions: device_* since 2.4, cuda_* before)."""
    names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def trace_step(bench, kind, steps):
    """torch.profiler over ``steps`` iterations of ``kind`` (after warm-up): the top operators and
    kernels by self time on the device, and how busy the device was over the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    config = scripts_train_config(bench)
    call = mpl_step_callable(bench, kind)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    with cudnn_flags(benchmark=config.cudnn_benchmark):
        for _ in range(max(2, bench.profile.train_warmup)):
            call()
        synchronize(bench.device)
        started = time.perf_counter()
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                call()
            synchronize(bench.device)
        wall_s = time.perf_counter() - started
    averages = profiler.key_averages()
    rows = sorted(((event.key, event.count, _event_time_us(event, bench.cuda)) for event in averages),
                  key=lambda row: -row[2])
    total_us = sum(row[2] for row in rows)
    top = [{"name": name[:120], "calls_per_step": count / steps, "ms_per_step": us / steps / 1e3,
            "share": us / total_us if total_us else None} for name, count, us in rows[:TRACE_ROWS]]
    return {"steps": steps, "wall_ms_per_step_profiled": 1e3 * wall_s / steps,
            "device_busy_ms_per_step": total_us / steps / 1e3 if bench.cuda else None,
            "top": top, "timer": "self device time" if bench.cuda else "self CPU time",
            "note": "profiling adds overhead: compare shares, not the wall time, with the timed entries"}


def trace_jobs(bench, recorder):
    steps = 3 if bench.cuda else 1
    return [Job("trace", kind, f"torch.profiler: {name}, {steps} steps", _bind(trace_step, bench, kind, steps),
                settings=_train_default_settings(bench), cost_s=15)
            for kind, name in (("adversarial", "adversarial step R18+DSC (ours)"), ("pham", "MPL step, pham feedback"))
            if kind in bench.profile.mpl_variants]


# ---------------------------------------------------------------------------------------------
# (5) CPU side: loaders and the label remap
# ---------------------------------------------------------------------------------------------
def loader_jobs(bench, recorder):
    from dataset.cityscapes import CityscapesDataset
    from dataset.gta5 import GTA5Dataset
    from dataset.transforms import train_transform
    from utils.data import BatchStream

    p = bench.profile
    workers = min(16, os.cpu_count() or 1)

    def dataset(domain):
        files = bench.loader_files()
        if domain == "gta5":
            return GTA5Dataset(files["gta5"], transform=train_transform(p.gta5_size, resize_hw=p.gta5_size))
        return CityscapesDataset(files["cityscapes"], split="train", labeled=True,
                                 transform=train_transform(p.cityscapes_size, resize_hw=p.cityscapes_size))

    def one_process(domain):
        data = dataset(domain)
        data.load(0)  # first file read: page cache, imports
        started = time.perf_counter()
        for index in range(len(data)):
            data.load(index)
        elapsed = time.perf_counter() - started
        return {"images_per_s": len(data) / elapsed, "ms_per_image": 1e3 * elapsed / len(data), "images": len(data),
                "files": bench.loader_files()}

    def with_workers(domain):
        data = dataset(domain)
        repeats = max(1, (p.loader_batches + 1) * p.loader_batch // len(data) + 1)
        stream = BatchStream(RepeatedDataset(data, repeats), p.loader_batch, seed=0, num_workers=workers,
                             pin_memory=bench.cuda)
        started = time.perf_counter()
        next(stream)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(p.loader_batches):
            next(stream)
        elapsed = time.perf_counter() - started
        del stream
        return {"images_per_s": p.loader_batches * p.loader_batch / elapsed, "first_batch_s": first_s,
                "workers": workers, "batch_size": p.loader_batch, "batches": p.loader_batches,
                "pin_memory": bench.cuda}

    jobs = []
    for domain, file_hw, size_hw in (("gta5", p.gta5_file, p.gta5_size), ("cityscapes", p.cityscapes_file,
                                                                           p.cityscapes_size)):
        what = f"{'GTA5' if domain == 'gta5' else 'Cityscapes'} {size_text(file_hw)} -> {size_text(size_hw)}"
        settings = {"file_size": size_text(file_hw), "output_size": size_text(size_hw),
                    "pipeline": "PNG decode + label LUT remap + resize + flip + normalise (dataset classes)",
                    "labels": "read and remapped"}
        jobs.append(Job("loader", f"{domain}/1", f"{what}, one process (no workers)", _bind(one_process, domain),
                        settings=settings, cost_s=10))
        jobs.append(Job("loader", f"{domain}/workers", f"{what}, BatchStream with {workers} workers",
                        _bind(with_workers, domain), settings={**settings, "workers": workers}, cost_s=10))
    return jobs


def lut_jobs(bench, recorder):
    p = bench.profile
    from dataset.common import KNOWN_ID

    def maps():
        height, width = p.lut_shape
        return np.stack([np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
                         for _, label in bench.scenes("target", p.lut_maps)])

    def per_class_loop(ids):
        out = np.full_like(ids, IGNORE_INDEX)
        for label in LABELS:
            out[ids == label.id] = label.train_id
        return out

    def project_path(ids):  # dataset.common.SegmentationDataset.ids_to_train_ids without the warning
        np.count_nonzero(~KNOWN_ID[ids])
        return ID_TO_TRAINID[ids]

    table = ID_TO_TRAINID.tolist()

    def pil_point(ids):  # the same table applied by PIL to the decoded "L" image, in C
        return np.stack([np.asarray(Image.fromarray(m).point(table)) for m in ids])

    def measure():
        ids = maps()
        pixels = ids.size
        timings = {}
        for name, fn in (("loop", per_class_loop), ("lut", lambda a: ID_TO_TRAINID[a]), ("project", project_path),
                         ("pil_point", pil_point)):
            samples = []
            for _ in range(max(1, p.lut_runs)):
                started = time.perf_counter()
                out = fn(ids)
                samples.append(time.perf_counter() - started)
            timings[name] = (statistics.median(samples), out)
        same = all(np.array_equal(timings["loop"][1], timings[name][1]) for name in ("lut", "project", "pil_point"))
        result = {"maps": len(ids), "map_size": size_text(p.lut_shape), "identical_output": same,
                  "classes_in_loop": len(LABELS)}
        for name, (median, _) in timings.items():
            result[f"{name}_ms_per_map"] = 1e3 * median / len(ids)
            result[f"{name}_mpixels_per_s"] = pixels / median / 1e6
        result["speedup"] = timings["loop"][0] / timings["lut"][0]
        result["speedup_project_path"] = timings["loop"][0] / timings["project"][0]
        result["speedup_pil_point"] = timings["loop"][0] / timings["pil_point"][0]
        return result

    return [Job("lut", "remap", f"id -> trainId of {p.lut_maps} label maps {size_text(p.lut_shape)}: LUT vs per-class loop",
                measure, settings={"maps": p.lut_maps, "map_size": size_text(p.lut_shape)}, cost_s=5)]


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def flops_jobs(bench, recorder):
    from model.bisenet import BiSeNet
    from model.discriminator import DSCDiscriminator, FCDiscriminator

    height, width = bench.profile.flops_size
    models = (("BiSeNet-R18", lambda: BiSeNet(context_path=R18), 3, "bisenet-r18"),
              ("BiSeNet-R101", lambda: BiSeNet(context_path=R101), 3, "bisenet-r101"),
              ("FCD", FCDiscriminator, NUM_CLASSES, "fcd"), ("DSC", DSCDiscriminator, NUM_CLASSES, "dsc"))

    def count(build, channels, report_name, thop):
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):  # shapes only: no memory, no arithmetic
            network = build().eval()
            x = torch.empty(1, channels, height, width)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(x)
        result = {"gflops": counter.get_total_flops() / 1e9, "params": sum(q.numel() for q in network.parameters()),
                  "counter": "torch.utils.flop_counter (2 x MACs of convolutions; resizes not counted)"}
        result["gflops_thop"] = None
        if thop:
            try:  # the report's convention (thop, resizes counted as nn.Upsample); optional dependency
                from model.flops import complexity_table

                result["gflops_thop"] = complexity_table(height, width, models=(report_name,))[0].gflops
            except ImportError:
                pass
        return result

    profile = bench.profile
    return [Job("flops", name, f"{name} at {width}x{height}", _bind(count, build, channels, report_name, profile.flops_thop),
                settings={"size": f"{width}x{height}", "batch_size": 1}, cost_s=1)
            for name, build, channels, report_name in models if name in profile.flops_models]


SECTION_JOBS = {"flops": flops_jobs, "inference": inference_jobs, "training": training_jobs,
                "pseudolabels": pseudolabel_jobs, "mpl": mpl_jobs, "loader": loader_jobs, "lut": lut_jobs,
                "trace": trace_jobs}


# ---------------------------------------------------------------------------------------------
# Summary: figure | anchor | naive | ours | ratio ours/naive | goal | met?
# ---------------------------------------------------------------------------------------------
def _entries(result, section):
    return result["sections"].get(section, {}).get("entries", [])


def _get(result, section, key):
    for entry in _entries(result, section):
        if entry["key"] == key:
            return entry
    return {}


def _best(entries, metric, higher=True, exclude=("naive",)):
    candidates = [e for e in entries if e.get(metric) is not None and e["key"].rsplit("/", 1)[-1] not in exclude]
    if not candidates:
        return {}
    return (max if higher else min)(candidates, key=lambda e: e[metric])


def bench_is_fp32_only(result):
    return result["device_type"] != "cuda"


def summary_rows(result, profile):
    gpu = profile.name == "gpu" and result["device_type"] == "cuda"
    rows = []

    def add(figure, anchor, naive, ours, goal_text, met, ours_config=None, ratio=None, note=None):
        if ratio is None and naive not in (None, 0) and ours is not None:
            ratio = ours / naive
        rows.append({"figure": figure, "anchor": anchor, "naive": naive, "ours": ours, "ours_config": ours_config,
                     "ratio": ratio, "goal": goal_text, "met": met, "note": note})

    def speed_goal(value, goal, higher=True):
        if goal is None or value is None:
            return None
        if not gpu:
            return "n/a (not the gpu profile on a GPU)"
        return value >= goal if higher else value <= goal

    # Inference.
    for context_path, size_hw, batch in profile.inference:
        prefix = f"{context_path}/{size_text(size_hw)}/b{batch}/"
        entries = [e for e in _entries(result, "inference") if e["key"].startswith(prefix)]
        naive = next((e for e in entries if e["key"] == prefix + "naive"), {})
        best = _best(entries, "images_per_s")
        key = (context_path, tuple(size_hw), batch)
        anchors = INFERENCE_ANCHORS.get(key) if profile.name == "gpu" else None
        goal = INFERENCE_GOALS.get(key) if profile.name == "gpu" else None
        add(f"inference {context_path} {size_text(size_hw)} batch {batch} (img/s)",
            "; ".join(f"{v} ({k})" for k, v in anchors.items()) if anchors else None,
            naive.get("images_per_s"), best.get("images_per_s"), f">= {goal}" if goal else None,
            speed_goal(best.get("images_per_s"), goal), best.get("name", "").split(" | ")[-1] or None)
    # Agreement of the fastest path of the first shape.
    context_path, size_hw, batch = profile.inference[0]
    prefix = f"{context_path}/{size_text(size_hw)}/b{batch}/"
    entries = [e for e in _entries(result, "inference") if e["key"].startswith(prefix)]
    best = _best(entries, "images_per_s")
    naive = next((e for e in entries if e["key"] == prefix + "naive"), {})
    if best:
        value = best.get("agreement")
        add(f"pixel agreement with strict fp32 eager, fastest path, {context_path} {size_text(size_hw)} b{batch}",
            None, naive.get("agreement"), value, f">= {AGREEMENT_GOAL:.1%}",
            None if value is None else value >= AGREEMENT_GOAL, best.get("name", "").split(" | ")[-1],
            note=f"weights: {result.get('weights', {}).get(context_path, {}).get('source')}")
    # Training.
    for context_path, discriminator, _ in profile.train_pairs:
        prefix = f"{context_path}+{discriminator}/"
        entries = [e for e in _entries(result, "training") if e["key"].startswith(prefix)]
        naive = next((e for e in entries if e["key"] == prefix + "naive"), {})
        # Not a configuration the scripts can run: an estimate of what removing the syncs would give.
        best = _best(entries, "median_ms", higher=False, exclude=("naive", "ours_no_sync"))
        key = (context_path, discriminator)
        sized = profile.name == "gpu"
        goal = TRAIN_GOALS_MS.get(key) if sized else None
        add(f"adversarial iteration {context_path}+{discriminator.upper()}, batch {profile.train_batch}, "
            f"{size_text(profile.train_source)} + {size_text(profile.train_target)} (ms)",
            TRAIN_ANCHORS_MS.get(key) if sized else None, naive.get("median_ms"), best.get("median_ms"),
            f"<= {goal:g}" if goal else None, speed_goal(best.get("median_ms"), goal, higher=False),
            best.get("name", "").split(" | ")[-1] or None)
        if best.get("peak_memory_gib") is not None or naive.get("peak_memory_gib") is not None:
            add(f"peak GPU memory {context_path}+{discriminator.upper()} (GiB)",
                MEMORY_ANCHORS_GIB.get(key) if sized else None, naive.get("peak_memory_gib"),
                best.get("peak_memory_gib"), None, None, best.get("name", "").split(" | ")[-1] or None)
    curves = _get(result, "training", "loss_curves")
    if curves.get("mean_rel_diff") is not None:
        naive_dev, noise = curves.get("naive_mean_rel_diff"), curves.get("noise_mean_rel_diff")
        figure = (f"loss curve R18+DSC, {curves.get('iterations')} it.: mean rel. deviation of the seg loss from "
                  f"strict fp32")
        if bench_is_fp32_only(result):
            add(figure, None, None, curves["mean_rel_diff"], "within noise",
                "n/a (ours is fp32 here: this deviation is the noise floor)", "ours (scripts' default)")
        else:
            limit = max(2 * max(naive_dev or 0.0, noise or 0.0), 1e-3)
            add(figure, None, naive_dev, curves["mean_rel_diff"],
                f"<= {limit:.3g} (2x the larger of the naive AMP's deviation and fp32 channels_last's "
                f"{_fmt(noise, 3)}, at least 0.001)",
                curves["mean_rel_diff"] <= limit, "ours (scripts' default)")
    e2e = _get(result, "training", "e2e")
    if e2e.get("median_ms") is not None:
        ratio = e2e.get("ratio_to_synthetic")
        add("R18+DSC iteration fed by the real loaders vs synthetic input (ms)", None, e2e.get("synthetic_median_ms"),
            e2e["median_ms"], f"ratio <= {E2E_GOAL}", speed_goal(ratio, E2E_GOAL, higher=False),
            f"{e2e.get('workers_per_stream')} workers x 2 streams", ratio=ratio)
    # Pseudo labels.
    naive = _get(result, "pseudolabels", "naive")
    passes = [e for e in _entries(result, "pseudolabels") if e["key"].startswith("pass1") and e["key"] != "pass1_fullres"]
    best = _best(passes, "images_per_s", exclude=())
    if naive or best:
        sized = profile.name == "gpu"
        add(f"pseudo-label threshold pass, R18 {size_text(profile.pl_size)} (img/s)",
            round(1e3 / PSEUDO_ANCHOR_MS_PER_IMAGE, 1) if sized else None, naive.get("images_per_s"),
            best.get("images_per_s"), f">= {PSEUDO_GOAL:g}" if sized else None,
            speed_goal(best.get("images_per_s"), PSEUDO_GOAL if sized else None), best.get("name"))
    stat_naive, stat_ours = _get(result, "pseudolabels", "stat_naive"), _get(result, "pseudolabels", "stat_per_image")
    if stat_naive.get("images_per_s") and stat_ours.get("images_per_s"):
        add("per-image medians only: per-class np.median loop vs per_image_thresholds (img/s)", None,
            stat_naive["images_per_s"], stat_ours["images_per_s"], None, None, "per_image_thresholds")
    # MPL.
    mpl = _get(result, "mpl", "pham")
    if mpl.get("ratio_to_adversarial") is not None:
        ratio = mpl["ratio_to_adversarial"]
        add("MPL iteration / adversarial iteration (ms)", None, _get(result, "mpl", "adversarial").get("median_ms"),
            mpl["median_ms"], f"ratio <= {MPL_GOAL}", speed_goal(ratio, MPL_GOAL, higher=False), "pham feedback",
            ratio=ratio)
    # Loader.
    for domain, label in (("gta5", f"GTA5 {size_text(profile.gta5_file)} -> {size_text(profile.gta5_size)}"),
                          ("cityscapes", f"Cityscapes {size_text(profile.cityscapes_file)} -> "
                                         f"{size_text(profile.cityscapes_size)}")):
        single, workers = _get(result, "loader", f"{domain}/1"), _get(result, "loader", f"{domain}/workers")
        if single or workers:
            add(f"loader {label} (img/s)", None, single.get("images_per_s"), workers.get("images_per_s"), None, None,
                f"{workers.get('workers')} workers" if workers.get("workers") else None,
                note="naive = one process; ours = BatchStream with workers")
    lut = _get(result, "lut", "remap")
    if lut.get("speedup") is not None:
        add(f"label remap, {lut.get('map_size')} maps (Mpixel/s)", None, lut.get("loop_mpixels_per_s"),
            lut.get("lut_mpixels_per_s"), f"ratio >= {LUT_GOAL:g}", lut["speedup"] >= LUT_GOAL and lut["identical_output"],
            "ID_TO_TRAINID[ids]", ratio=lut["speedup"])
    for entry in _entries(result, "flops"):
        if entry.get("gflops") is not None:
            add(f"GFLOPs {entry['key']} at {entry['settings'].get('size')}",
                FLOPS_ANCHORS.get(entry["key"]) if profile.flops_size == HALF else None, None, entry["gflops"], None, None,
                "flop_counter", note=f"thop: {entry['gflops_thop']:.4g}" if entry.get("gflops_thop") else None)
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _cell(value, digits=4):
    """A Markdown table cell: formatted, with pipes escaped."""
    return _fmt(value, digits).replace("|", "\\|")


def _status(entry):
    if "error" in entry:
        return "error: " + entry["error"].splitlines()[0][:120]
    if "skipped" in entry:
        return "skipped: " + entry["skipped"]
    return ""


def _row(*cells):
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _table(header, rows):
    return [_row(*header), "|" + "---|" * len(header), *(_row(*row) for row in rows)]


def markdown(result):
    lines = [f"# Speed benchmark, profile `{result['profile']}`: {result['device']}", ""]
    lines.append(f"torch {result['torch']}, torchvision {result['torchvision']}, CUDA {result['cuda']}, cuDNN "
                 f"{result['cudnn']}, Python {result['python']}; {result['cpu_count']} CPUs, {result['torch_threads']} "
                 f"torch threads; load average {result['load_average_start']} at the start, "
                 f"{result.get('load_average_end')} at the end; {result.get('wall_s')} s; commit "
                 f"{result['git_commit']}; {result['started_at']}.")
    if not result.get("complete"):
        lines.append("\n**Incomplete run** (written after each entry; this is the state when it stopped).")
    lines += ["", "## Summary", ""]
    lines += _table(("figure", "anchor (course code, H100)", "naive (ours, same run)", "ours", "ratio ours/naive",
                     "goal", "met?"),
                    [(row["figure"], row["anchor"],
                      _fmt(row["naive"]), _fmt(row["ours"]) + (f" ({row['ours_config']})" if row.get("ours_config") else ""),
                      _fmt(row["ratio"], 3), row["goal"], row["met"]) for row in result["summary"]])
    lines += ["", "Anchors were measured by the issue's authors with the old course code on one H100; they only "
                  "apply to the gpu profile's sizes. Speed goals are judged on the gpu profile only.", ""]
    sections = result["sections"]
    if "inference" in sections:
        rows, naive = [], {}
        for entry in sections["inference"]["entries"]:
            shape, _, config = entry["name"].partition(" | ")
            if entry["key"].endswith("/naive"):
                naive[shape] = entry.get("images_per_s")
            rate = entry.get("images_per_s")
            speedup = rate / naive[shape] if rate and naive.get(shape) else None
            rows.append((shape, config, _fmt(rate), _fmt(speedup, 3), _fmt(entry.get("latency_ms")),
                         _fmt(entry.get("agreement")), _fmt(entry.get("compile_s"), 3), _status(entry)))
        lines += ["## Inference", "", "img/s: blocks of back-to-back calls (throughput); latency: one call timed "
                                      "alone (host dispatch included).", ""]
        lines += _table(("shape", "configuration", "img/s", "x naive", "latency ms", "agreement", "compile s",
                         "note"), rows)
        lines.append("")
    if "training" in sections:
        rows, naive = [], {}
        for entry in sections["training"]["entries"]:
            if entry["key"] in ("loss_curves", "e2e"):
                continue
            pair, _, config = entry["name"].partition(" | ")
            if entry["key"].endswith("/naive"):
                naive[pair] = entry.get("median_ms")
            ms = entry.get("median_ms")
            speedup = naive[pair] / ms if ms and naive.get(pair) else None
            spread = f"{entry['p10_ms']:.4g}-{entry['p90_ms']:.4g}" if entry.get("p10_ms") else "-"
            rows.append((pair, config, _fmt(ms), spread, _fmt(speedup, 3), _fmt(entry.get("peak_memory_gib"), 3),
                         _status(entry)))
        lines += ["## Training (one adversarial iteration)", ""]
        lines += _table(("pair", "configuration", "median ms", "p10-p90 ms", "x naive", "peak GiB", "note"), rows)
        curves = next((e for e in sections["training"]["entries"] if e["key"] == "loss_curves"), None)
        if curves:
            lines += ["", f"Loss curves ({curves['name']}) {_status(curves)}"]
            for variant, terms in curves.get("deviation_from_fp32", {}).items():
                text = ", ".join(f"{term} max {d['max']:.3g} / mean {d['mean']:.3g}" for term, d in terms.items())
                lines.append(f"- relative deviation of {variant} from fp32: {text}")
            fp32 = curves.get("curves", {}).get("fp32", {}).get("loss_seg")
            if fp32:
                lines.append(f"- fp32 seg loss: {fp32[0]:.4g} -> {fp32[-1]:.4g}")
        e2e = next((e for e in sections["training"]["entries"] if e["key"] == "e2e"), None)
        if e2e:
            lines += ["", f"Loader-fed iteration: {_fmt(e2e.get('median_ms'))} ms vs "
                          f"{_fmt(e2e.get('synthetic_median_ms'))} ms on synthetic input (ratio "
                          f"{_fmt(e2e.get('ratio_to_synthetic'), 3)}), {e2e.get('workers_per_stream')} workers per "
                          f"stream, first iteration {_fmt(e2e.get('first_iteration_s'), 3)} s. {_status(e2e)}"]
        lines.append("")
    simple = (("pseudolabels", "Pseudo labels", ("images_per_s", "median_ms", "precision", "output_size")),
              ("mpl", "MPL", ("median_ms", "p10_ms", "p90_ms", "ratio_to_adversarial")),
              ("loader", "Loader", ("images_per_s", "ms_per_image", "first_batch_s", "workers")),
              ("lut", "Label remap", ("loop_ms_per_map", "lut_ms_per_map", "project_ms_per_map",
                                      "pil_point_ms_per_map", "speedup", "speedup_pil_point", "identical_output")),
              ("flops", "FLOPs", ("gflops", "gflops_thop", "params")))
    for name, title, fields in simple:
        if name not in sections:
            continue
        rows = [(entry["name"], *(_fmt(entry.get(f)) for f in fields), _status(entry))
                for entry in sections[name]["entries"]]
        lines += [f"## {title}", ""] + _table(("entry", *fields, "note"), rows) + [""]
    for entry in sections.get("trace", {}).get("entries", []):
        lines += [f"## {entry['name']}", ""]
        if entry.get("top"):
            busy = entry.get("device_busy_ms_per_step")
            lines.append(f"{entry['timer']}; profiled wall {_fmt(entry.get('wall_ms_per_step_profiled'))} ms per step"
                         + (f", device busy {_fmt(busy)} ms per step" if busy is not None else "") + ".")
            lines.append("")
            lines += _table(("operator / kernel", "calls per step", "ms per step", "share"),
                            [(row["name"], row["calls_per_step"], row["ms_per_step"], row["share"]) for row in entry["top"]])
        else:
            lines.append(_status(entry))
        lines.append("")
    notes = [(name, note) for name, section in sections.items() for note in section.get("notes", [])]
    if notes or result.get("weights"):
        lines += ["## Notes", ""]
        for context_path, info in result.get("weights", {}).items():
            losses = (f" (seg loss {info['first_loss']:.3g} -> {info['last_loss']:.3g})"
                      if info.get("first_loss") is not None else "")
            lines.append(f"- weights of {context_path}: {info.get('source')}{losses}")
        lines += [f"- {name}: {note}" for name, note in notes]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--profile", choices=("auto", *PROFILES), default="auto",
                        help="sizes and repetitions: gpu (the issue's sizes), cpu (small), toy (tests); auto: by device")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for speed_<profile>.json/.md")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=(), help="leave these sections out")
    parser.add_argument("--match", nargs="+", default=None, metavar="TEXT",
                        help="keep only the entries whose SECTION/KEY contains one of these texts (a targeted "
                             "rerun, e.g. --match /naive compile_reduce mpl/)")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile entries at all")
    parser.add_argument("--compile-train", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile training entries: auto = the profile's plan while the budget lasts, "
                             "on = every pair, off = none")
    parser.add_argument("--max-autotune", action="store_true",
                        help="also time compile mode max-autotune-no-cudagraphs (minutes of autotuning)")
    parser.add_argument("--checkpoint", default=None,
                        help="BiSeNet checkpoint for the agreement check (its context path); others are trained briefly")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting entries after this many seconds "
                                                                      "(default: the profile's, gpu 480)")
    parser.add_argument("--entry-timeout-s", type=float, default=None, help="time limit of one entry")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="where the loader's PNG files go (default: a temporary folder)")
    parser.add_argument("--keep-data", action="store_true", help="keep the generated PNG files")
    return parser


def get_args(argv=None):
    return get_args_parser().parse_args(argv)


def main(args):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[("gpu" if device.type == "cuda" else "cpu") if args.profile == "auto" else args.profile]
    args.profile = profile.name
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS) and s not in args.skip]
    recorder = Recorder(args, profile, device, args.out)
    bench = Bench(args, profile, device)
    bench.results = recorder.result
    recorder.before_write = lambda: recorder.result.__setitem__(
        "weights", {cp: info for cp, (_, info) in bench._weights.items()})
    print(f"[speed] profile {profile.name} on {recorder.result['device']}, torch {torch.__version__}, sections "
          f"{' '.join(sections)}, budget {recorder.budget_s:.0f} s, load average {recorder.result['load_average_start']}",
          flush=True)
    jobs = []
    for section in sections:
        recorder.section(section)
        try:
            jobs += SECTION_JOBS[section](bench, recorder)
        except Exception as error:  # noqa: BLE001 - a section that cannot even be set up is recorded
            recorder.note(section, f"not run: {type(error).__name__}: {error}")
    if args.match:  # a targeted rerun: only the entries named
        jobs = [job for job in jobs if any(text in f"{job.section}/{job.key}" for text in args.match)]
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].phase, jobs[i].priority if jobs[i].phase else 0, i))
    try:
        for index in order:
            recorder.run(jobs[index])
    finally:
        bench.close()
        recorder.write(final=True)
    print(markdown(recorder.result).split("## Inference")[0], flush=True)
    print(f"[speed] wrote {Path(args.out) / f'speed_{profile.name}.json'} and .md in {recorder.elapsed():.0f} s")
    return recorder.result


if __name__ == "__main__":
    main(get_args())
