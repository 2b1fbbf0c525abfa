"""Section ``training``: milliseconds per ``uda.adversarial.adversarial_step``, naive against the levers,
with the peak GPU memory; the loss-curve comparison; the same step fed by the real loaders."""
import contextlib
import dataclasses
import os
import time

import numpy as np
import torch

from model import build_bisenet, build_discriminator
from model.depthwise import set_depthwise
from model.resize import set_matmul_resize
from uda.adversarial import DEFAULT_LAMBDA_ADV, DEFAULT_LR_D
from utils.benchmark import time_callable
from uda.adversarial import adversarial_step
from cli.options import DEFAULT_LR
from engine.compilation import compile_network
from engine.cuda_graph import WARMUP_STEPS, DeferredFiniteCheck, GraphedStep
from engine.precision import Precision

from .common import (Job, RepeatedDataset, bind, cudnn_flags, fresh_compile_cache, make_optimizer, quantiles,
                     release_memory, reset_compiler, size_text, strict_fp32, synchronize)
from .config import (CPU_TRAIN_LEVERS, CUDA_TRAIN_LEVERS, GIB, R18, TRAIN_COMPILE_COST_S, TRAIN_NAIVE_CPU,
                     TRAIN_NAIVE_CUDA, TRAIN_OPT_INS_CUDA, TRAIN_SCRIPTS_CPU, TRAIN_SCRIPTS_CUDA, TrainConfig,
                     fast_paths_train_config, scripts_train_config)


# Inductor's FX graph cache (compiled kernels) and AOTAutograd's cache (forward/backward split):
# a miss is one graph generated and compiled, a hit one loaded from the cache folder.
CACHE_COUNTERS = {"inductor": ("fxgraph_cache_miss", "fxgraph_cache_hit"),
                  "aot_autograd": ("autograd_cache_miss", "autograd_cache_hit")}

GRAPH_COMPARE_STEPS = 8  # graph_deviation: the warm-up, the capture and a few replays


def train_key(context_path, discriminator, config_key):
    return f"{context_path}+{discriminator}/{config_key}"


def build_training(bench, context_path, discriminator_name, config, seed=0):
    """(network to call, model, discriminator, optimizers, scalers, precision) for one configuration, with
    the scripts' default learning rates (``cli.options.DEFAULT_LR``, ``uda.adversarial.DEFAULT_LR_D``)."""
    device = bench.device
    torch.manual_seed(seed)
    model = build_bisenet(context_path).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_speed_levers(skip_unread_aux=config.skip_unread_aux, classifier_first=config.classifier_first,
                           matmul_resize=config.matmul_resize, fused_loss=config.fused_loss)
    discriminator = set_matmul_resize(build_discriminator(discriminator_name).to(device), config.matmul_resize)
    set_depthwise(discriminator, config.depthwise)
    if config.discriminator_channels_last:
        discriminator = discriminator.to(memory_format=torch.channels_last)
    model.train()
    discriminator.train()
    optimizer = make_optimizer("sgd", model.parameters(), DEFAULT_LR, config.optimizer)
    optimizer_d = make_optimizer("adam", discriminator.parameters(), DEFAULT_LR_D, config.optimizer)
    precision = Precision(device, config.amp)
    network = compile_network(model) if config.compile else model
    return network, model, discriminator, optimizer, optimizer_d, precision.grad_scaler(), precision.grad_scaler(), precision


def measure_training(bench, context_path, discriminator_name, config):
    """Median ms per step; for a compiled configuration also the compile time cold (first step, empty
    cache folder) and warm (the model compiled again after ``reset_compiler``: what a second run of
    a script pays, its kernels loaded from the persistent cache), with the caches' hit counts."""
    device, p = bench.device, bench.profile
    source, labels, target = bench.train_batch()
    with contextlib.ExitStack() as stack:
        if config.compile:
            reset_compiler()
            stack.enter_context(fresh_compile_cache())  # resets the compiler again on leaving
        network, model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision = build_training(
            bench, context_path, discriminator_name, config)
        compiled = {"network": network}

        if config.cuda_graph:
            step, finite_check = captured_step(bench, network, discriminator, optimizer, optimizer_d, scaler, scaler_d,
                                               precision)
        else:
            finite_check = None

            def step():
                adversarial_step(compiled["network"], discriminator, optimizer, optimizer_d, scaler, scaler_d,
                                 precision, source, labels, target, lambda_adv=DEFAULT_LAMBDA_ADV)
        result = {}
        if config.depthwise != "native":
            result["depthwise_deviation"] = depthwise_deviation(bench, discriminator, config.depthwise, precision)
        with cudnn_flags(benchmark=config.cudnn_benchmark), finite_checks(config.finite_checks):
            if bench.cuda:
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            if config.compile:
                for phase in ("cold", "warm"):
                    if phase == "warm":
                        reset_compiler()
                        compiled["network"] = compile_network(model)
                    result[f"compile_{phase}_s"], result[f"cache_{phase}"] = _first_step(step, device)
                result["compile_s"] = result["compile_cold_s"]
            warmup = p.train_warmup + (WARMUP_STEPS + 1 if config.cuda_graph else 0)  # + warm-up and capture
            _, samples = time_callable(step, device, warmup=warmup, runs=p.train_runs)
            if bench.cuda:
                result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            if finite_check is not None:
                finite_check.raise_if_refused()  # a refused step would have timed a step that updates nothing
    result.update(quantiles(samples), runs=p.train_runs, warmup=warmup, precision=precision.mode)
    if config.cuda_graph:
        result["graph_deviation"] = graph_deviation(bench, context_path, discriminator_name, config)
    return result


def captured_step(bench, network, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision):
    """The adversarial step on the bench's fixed batch as --cuda-graph on runs it: losses checked on the
    device, warmed up eagerly, then captured and replayed (``engine.cuda_graph.GraphedStep``).
    Returns (a callable running one step, its DeferredFiniteCheck)."""
    source, labels, target = bench.train_batch()
    check = DeferredFiniteCheck([optimizer, optimizer_d], bench.device)

    def adversarial(batches, iteration):
        return adversarial_step(network, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision,
                                batches["source"]["image"], batches["source"]["label"], batches["target"]["image"],
                                lambda_adv=DEFAULT_LAMBDA_ADV, check=check)

    graphed = GraphedStep(adversarial, check, precision)
    batches = {"source": {"image": source, "label": labels}, "target": {"image": target}}
    return (lambda: graphed(batches, 0)), check


def graph_deviation(bench, context_path, discriminator_name, config, steps=GRAPH_COMPARE_STEPS):
    """How far ``steps`` captured steps are from the same steps run eagerly (host check, float learning
    rates) from one initialisation on the fixed batch: the largest relative difference of any loss
    at any step, and of the networks' parameters at the end (over the largest eager value). A check
    that the graph replays the step it captured (the tests cover the rest on the CPU)."""
    eager_losses, eager_parameters = _seeded_steps(bench, context_path, discriminator_name,
                                                   dataclasses.replace(config, cuda_graph=False), steps)
    graph_losses, graph_parameters = _seeded_steps(bench, context_path, discriminator_name, config, steps)
    loss_difference = max(abs(g[term] - e[term]) / max(abs(e[term]), 1e-30)
                          for e, g in zip(eager_losses, graph_losses) for term in e)
    parameter_difference = max(float((g - e).abs().max() / e.abs().max().clamp(min=1e-30))
                               for e, g in zip(eager_parameters, graph_parameters))
    return {"steps": steps, "losses": loss_difference, "parameters": parameter_difference,
            "reference": "the same steps eager, same settings"}


def _seeded_steps(bench, context_path, discriminator_name, config, steps):
    """([{term: loss}] per step, the parameters after them) of ``steps`` steps from seed 0."""
    network, model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision = build_training(
        bench, context_path, discriminator_name, config, seed=0)
    if config.cuda_graph:
        step, _ = captured_step(bench, network, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision)
    else:
        source, labels, target = bench.train_batch()

        def step():
            return adversarial_step(network, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision,
                                    source, labels, target, lambda_adv=DEFAULT_LAMBDA_ADV)
    with cudnn_flags(benchmark=config.cudnn_benchmark):
        losses = [{term: float(value) for term, value in step().items()} for _ in range(steps)]
    return losses, [p.detach().float().clone() for p in (*model.parameters(), *discriminator.parameters())]


def depthwise_deviation(bench, discriminator, implementation, precision):
    """How far the discriminator with ``implementation`` of its depthwise convolutions is from the
    native one on this device, under the entry's autocast: the largest difference of its output, and
    of any parameter's gradient (of the mean squared output), over the largest native value, on one
    batch of random softmax maps at the target size. A check that the timed kernels compute the same
    function (the tests run them on the CPU only); the discriminator is left with ``implementation`` and no gradients."""
    p = bench.profile
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(p.train_batch, discriminator.num_classes, *p.train_target, generator=generator)
    maps = logits.softmax(dim=1).to(bench.device).contiguous(memory_format=torch.channels_last)
    computed = {}
    for name in ("native", implementation):
        set_depthwise(discriminator, name)
        discriminator.zero_grad(set_to_none=True)
        with precision.autocast():
            output = discriminator(maps)
        output.float().square().mean().backward()
        computed[name] = (output.detach().float(), [p.grad.float() for p in discriminator.parameters()])
    discriminator.zero_grad(set_to_none=True)
    (native_out, native_grads), (out, grads) = computed["native"], computed[implementation]

    def relative(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
    return {"output": relative(out, native_out), "grads": max(relative(g, n) for g, n in zip(grads, native_grads)),
            "reference": "native depthwise, same autocast"}


def _first_step(step, device):
    """Seconds of one step (the one that compiles) and the cache counters it moved."""
    from torch._dynamo.utils import counters

    before = {group: dict(counters[group]) for group in CACHE_COUNTERS}
    started = time.perf_counter()
    step()
    synchronize(device)
    seconds = time.perf_counter() - started
    moved = {f"{group}.{name}": counters[group][name] - before[group].get(name, 0)
             for group, names in CACHE_COUNTERS.items() for name in names}
    return seconds, {name: count for name, count in moved.items() if count}


@contextlib.contextmanager
def finite_checks(enabled):
    """With ``enabled=False``, the adversarial step's ``check_finite`` does nothing while the block
    runs: what the step would cost without its host synchronisations (the measurement only; never in
    training)."""
    import uda.adversarial as adversarial

    original = adversarial.check_finite
    if not enabled:
        adversarial.check_finite = lambda losses: None
    try:
        yield
    finally:
        adversarial.check_finite = original


def _train_settings(bench, context_path, discriminator, config):
    p = bench.profile
    return {"context_path": context_path, "discriminator": discriminator, "batch_size": p.train_batch,
            "source_size": size_text(p.train_source), "target_size": size_text(p.train_target),
            "amp": config.amp, "grad_scalers": 2 if config.amp == "fp16" else 0, "channels_last": config.channels_last,
            "discriminator_channels_last": config.discriminator_channels_last,
            "cudnn_benchmark": config.cudnn_benchmark, "optimizers": config.optimizer,
            "compile": config.compile or "off", "finite_checks": config.finite_checks,
            "skip_unread_aux": config.skip_unread_aux, "classifier_first": config.classifier_first,
            "matmul_resize": config.matmul_resize, "fused_loss": config.fused_loss, "depthwise": config.depthwise,
            "cuda_graph": config.cuda_graph,
            "step": "uda.adversarial.adversarial_step",
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
                                                precision, source, labels, target, lambda_adv=DEFAULT_LAMBDA_ADV))
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
    from engine.data import BatchStream, to_device

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
                         lambda_adv=DEFAULT_LAMBDA_ADV)

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
        # "levers": each lever in turn (the model's cumulative); "pair": naive, the fast paths without the
        # model's levers, and ours with them.
        configs = levers if scope == "levers" else (
            naive, fast_paths_train_config(bench), scripts, *([TRAIN_OPT_INS_CUDA] if bench.cuda else []))
        for config in configs:
            jobs.append(Job("training", train_key(context_path, discriminator, config.key),
                            f"{context_path}+{discriminator.upper()} | {config.label}",
                            bind(measure_training, bench, context_path, discriminator, config),
                            settings=_train_settings(bench, context_path, discriminator, config), cost_s=5))
    jobs.append(Job("training", "loss_curves", f"loss curves R18+DSC, {p.curve_iters} iterations, fixed batch",
                    bind(loss_curves, bench), settings={"variants": "fp32 strict / naive AMP / ours"}, cost_s=10))
    jobs.append(Job("training", "e2e", "R18+DSC ours, fed by the real loaders (PNG files, workers)",
                    bind(measure_e2e, bench, recorder),
                    settings={"loader": "engine.data.BatchStream x2", "transforms": "resize + flip + normalise"},
                    cost_s=20))
    if args.no_compile or args.compile_train == "off":
        recorder.note("training", "torch.compile entries not run (--no-compile / --compile-train off)")
        return jobs
    pairs = p.train_compile if args.compile_train == "auto" else tuple(
        (cp, d, 5 + i) for i, (cp, d, _) in enumerate(p.train_pairs))
    label = "ours + --compile on (engine.compilation.compile_network: dynamic=False, cache cold then warm)"
    for context_path, discriminator, priority in pairs:
        config = dataclasses.replace(scripts, key="ours_compile", label=label, compile="scripts")
        jobs.append(Job("training", train_key(context_path, discriminator, config.key),
                        f"{context_path}+{discriminator.upper()} | {config.label}",
                        bind(measure_training, bench, context_path, discriminator, config),
                        settings=_train_settings(bench, context_path, discriminator, config),
                        cost_s=TRAIN_COMPILE_COST_S[context_path], phase=1, priority=priority))
    return jobs
