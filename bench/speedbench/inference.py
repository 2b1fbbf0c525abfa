"""Section ``inference``: images/s of BiSeNet in eval mode per shape, the naive baseline against the
levers one by one, each with its argmax agreement with a strict fp32 reference."""
import time

import torch

from utils.benchmark import inference_throughput
from engine.precision import Precision

from .common import Job, bind, cudnn_flags, reset_compiler, size_text, synchronize
from .config import (COMPILE_COST_S, COMPILE_LABELS, CPU_INFER_LEVERS, CUDA_INFER_LEVERS, MAX_AUTOTUNE_COST_S, R18,
                     InferConfig)


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
                            bind(measure_inference, bench, recorder, context_path, size_hw, batch, config,
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
                        bind(measure_inference, bench, recorder, context_path, size_hw, batch, config,
                              p.infer_warmup, p.compiled_runs),
                        settings=_infer_settings(context_path, size_hw, batch, config), cost_s=cost if cuda else 30,
                        phase=1, priority=priority))
    return jobs


def _infer_settings(context_path, size_hw, batch, config):
    return {"context_path": context_path, "size": size_text(size_hw), "batch_size": batch, "amp": config.amp,
            "channels_last": config.channels_last, "cudnn_benchmark": config.cudnn_benchmark,
            "compile": config.compile_mode or "off", "model_mode": "eval", "input": "torch.randn (timing); "
            "structured scenes (agreement)"}
