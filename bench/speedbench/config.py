"""The speed benchmark's settings: the issue's anchors and goals, the profiles (sizes and
repetitions per device), and the configurations (levers) each section measures."""
from dataclasses import dataclass

SCHEMA = "bench.speed/1"
SECTIONS = ("flops", "inference", "training", "pseudolabels", "mpl", "loader", "lut", "trace")
GIB = 2 ** 30
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
TRAIN_GOALS_MS = {(R18, "dsc"): 25.0, (R101, "dsc"): 70.0}
MEMORY_ANCHORS_GIB = {(R18, "dsc"): 3.9, (R101, "dsc"): 9.0}
PSEUDO_ANCHOR_MS_PER_IMAGE = 6.0
PSEUDO_GOAL = 1000.0  # images/s
MPL_GOAL = 2.5  # pham MPL iteration / adversarial iteration, same run
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
    train_pairs: tuple          # ((context_path, discriminator, "levers" | "pair"), ...): every lever, or naive /
                                # fast paths / ours
    train_compile: tuple        # ((context_path, discriminator, priority), ...): compiled as --compile on does it
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
    mpl_variants: tuple = ("adversarial", "pham", "course", "adversarial_fast_paths", "pham_fast_paths",
                           "adversarial_fused_loss", "pham_fused_loss")  # the fused ones on CUDA only
    run_order: tuple = SECTIONS  # the order the eager entries run in while the budget lasts (the files keep SECTIONS')


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
        # The goals still open (training, MPL) first; the inference figures, all met, last.
        run_order=("training", "mpl", "trace", "pseudolabels", "loader", "lut", "flops", "inference"),
        train_compile=((R18, "dsc", 2), (R101, "dsc", 6)),
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
    optimizer: str = "for-loop"    # for-loop | foreach | fused (engine.optim.build_optimizer)
    compile: str = None            # None | "scripts" (engine.compilation.compile_network, as --compile on)
    discriminator_channels_last: bool = False
    finite_checks: bool = True     # False: engine.steps.check_finite (its one host sync per step) patched out
    # The model's speed levers (BiSeNet.set_speed_levers; docs/speed.md), off in the naive baseline.
    skip_unread_aux: bool = False  # target passes without the auxiliary heads no loss reads (exact)
    classifier_first: bool = False  # --classifier-first: 1x1 classifier before the x8 upsampling
    matmul_resize: bool = False    # --matmul-resize: bilinear resizing as two matrix products (+ discriminator)
    fused_loss: bool = False       # --fused-loss: Triton upsample + log-softmax + NLL of the low-res heads and
    #                                upsample + softmax of the discriminator's maps (CUDA)
    depthwise: str = "native"      # --depthwise: DSC's depthwise convolutions native, dense (block-diagonal) or triton
    cuda_graph: bool = False       # --cuda-graph on: the step captured once and replayed (engine.cuda_graph)


TRAIN_NAIVE_CUDA = TrainConfig("naive", "naive: fp16 autocast + 2 GradScalers, NCHW, for-loop optimizers", "fp16")
CUDA_FAST_PATHS = dict(amp="bf16", channels_last=True, cudnn_benchmark=True, optimizer="fused")
CUDA_LEVERS = dict(CUDA_FAST_PATHS, skip_unread_aux=True, classifier_first=True, matmul_resize=True)
TRAIN_FAST_PATHS_CUDA = TrainConfig("fast_paths", "bf16 + channels_last + fused + cudnn.benchmark (the levers below off)",
                                    **CUDA_FAST_PATHS)
TRAIN_SCRIPTS_CUDA = TrainConfig("ours", "+ matmul resize (= the scripts' default on CUDA)", **CUDA_LEVERS)
TRAIN_FUSED_LOSS_CUDA = TrainConfig("fused_loss", "ours + fused upsample/log-softmax/NLL and upsample/softmax "
                                    "(Triton, --fused-loss on)", **CUDA_LEVERS, fused_loss=True)
TRAIN_CUDA_GRAPH = TrainConfig("ours_cuda_graph", "ours captured in a CUDA graph, losses checked on the device "
                               "(--cuda-graph on)", **CUDA_LEVERS, cuda_graph=True)
# Every opt-in lever at once (each off by default until timed): what the goals are measured against.
TRAIN_OPT_INS_CUDA = TrainConfig("ours_opt_ins", "ours + --fused-loss on --depthwise triton --cuda-graph on",
                                 **CUDA_LEVERS, fused_loss=True, depthwise="triton", cuda_graph=True)
CUDA_TRAIN_LEVERS = (
    TRAIN_NAIVE_CUDA,
    TrainConfig("cudnn", "+ cudnn.benchmark", "fp16", False, True),
    TrainConfig("foreach", "+ foreach optimizers", "fp16", False, True, "foreach"),
    TrainConfig("bf16", "bf16 instead of fp16 (no loss scaling)", "bf16", False, True, "foreach"),
    TRAIN_FAST_PATHS_CUDA,
    # The model's levers, cumulative: each entry adds one to the one before.
    TrainConfig("skip_aux", "+ target passes skip the unread auxiliary heads", **CUDA_FAST_PATHS, skip_unread_aux=True),
    TrainConfig("classifier_first", "+ classifier before the x8 upsampling", **CUDA_FAST_PATHS, skip_unread_aux=True,
                classifier_first=True),
    TRAIN_SCRIPTS_CUDA,
    # Opt-in (--fused-loss, off by default until it has run on a GPU): ours + the fused loss and softmax kernels.
    TRAIN_FUSED_LOSS_CUDA,
    # Opt-in (--cuda-graph, off by default until it has run on a GPU): ours replayed from one graph; then all opt-ins.
    TRAIN_CUDA_GRAPH,
    TRAIN_OPT_INS_CUDA,
    # --depthwise (native by default until timed here): ours with DSC's depthwise convolutions as one
    # block-diagonal dense convolution, then by the NHWC Triton kernels.
    TrainConfig("ours_depthwise_dense", "ours + depthwise as one block-diagonal dense conv (--depthwise dense)",
                **CUDA_LEVERS, depthwise="dense"),
    TrainConfig("ours_depthwise_triton", "ours + depthwise by NHWC Triton kernels (--depthwise triton)", **CUDA_LEVERS,
                depthwise="triton"),
    TrainConfig("ours_d_cl", "ours + discriminator channels_last", **CUDA_LEVERS, discriminator_channels_last=True),
    TrainConfig("ours_foreach", "ours with foreach optimizers instead of fused", **dict(CUDA_LEVERS, optimizer="foreach")),
    TrainConfig("ours_no_sync", "ours without the per-step finiteness check (one host sync; bench-only patch)",
                **CUDA_LEVERS, finite_checks=False),
)
TRAIN_NAIVE_CPU = TrainConfig("naive", "naive: fp32, NCHW, for-loop optimizers")
CPU_FAST_PATHS = dict(channels_last=True, optimizer="fused")
TRAIN_FAST_PATHS_CPU = TrainConfig("fast_paths", "fp32 + channels_last + fused (the levers below off)", **CPU_FAST_PATHS)
TRAIN_SCRIPTS_CPU = TrainConfig("ours", "+ target passes skip the unread auxiliary heads (= the scripts' default on "
                                "the CPU)", **CPU_FAST_PATHS, skip_unread_aux=True)
CPU_TRAIN_LEVERS = (TRAIN_NAIVE_CPU, TRAIN_FAST_PATHS_CPU, TRAIN_SCRIPTS_CPU,
                    # Opt-in on the CPU (they change the rounding of the committed CPU results): cumulative.
                    TrainConfig("classifier_first", "ours + classifier before the x8 upsampling (opt-in here)",
                                **CPU_FAST_PATHS, skip_unread_aux=True, classifier_first=True),
                    TrainConfig("matmul_resize", "+ matmul resize (opt-in here)", **CPU_FAST_PATHS,
                                skip_unread_aux=True, classifier_first=True, matmul_resize=True),
                    TrainConfig("depthwise_dense", "ours + depthwise as one block-diagonal dense conv (opt-in)",
                                **CPU_FAST_PATHS, skip_unread_aux=True, depthwise="dense"),
                    TrainConfig("nchw", "ours in NCHW (--channels-last off)", optimizer="fused", skip_unread_aux=True),
                    TrainConfig("foreach", "ours with foreach optimizers instead of fused", channels_last=True,
                                optimizer="foreach", skip_unread_aux=True))
# Compiling a training step (forward + backward, source and target shapes): R18 took 200 s on the
# H100 machine with automatic dynamic shapes (bench/results/speed_gpu_classlast_nll.md), most of it in
# the dynamic recompile's sympy work. With dynamic=False (as the scripts compile) an estimate, not yet
# measured: cold about as long as 4 static inference compiles (9-22 s each), plus the warm compile.
TRAIN_COMPILE_COST_S = {R18: 150, R101: 220}


def scripts_train_config(bench):
    """The training settings the scripts use by default on this bench's device."""
    return TRAIN_SCRIPTS_CUDA if bench.cuda else TRAIN_SCRIPTS_CPU


def fast_paths_train_config(bench):
    """The scripts' default settings with the model's speed levers off (before issue 19's levers)."""
    return TRAIN_FAST_PATHS_CUDA if bench.cuda else TRAIN_FAST_PATHS_CPU


def variant_train_config(bench, variant):
    """The settings of a section's variant suffix: "fast_paths" (the model's levers off), "fused_loss"
    (the scripts' defaults + --fused-loss on; CUDA only), anything else the scripts' defaults."""
    if variant == "fast_paths":
        return fast_paths_train_config(bench)
    if variant == "fused_loss":
        return TRAIN_FUSED_LOSS_CUDA
    return scripts_train_config(bench)
