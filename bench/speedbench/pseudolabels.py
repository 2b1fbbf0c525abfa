"""Section ``pseudolabels``: images/s of the dataset-wide threshold pass against the course's routine
(fp32, one image at a time, per-class ``np.median`` loop), and of the statistic alone."""
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from dataset.labels import NUM_CLASSES
from utils.benchmark import time_callable
from engine.precision import Precision
from uda.pseudolabel_stats import MAX_THRESHOLD, ConfidenceHistogram, per_image_thresholds

from .common import Job, bind, cudnn_flags, reset_compiler, size_text
from .config import COMPILE_COST_S, R18
from .inference import best_eager_amp


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
        from uda.pseudolabels import predict_probabilities

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
            bind(statistic_ours, True), settings=settings),
        Job("pseudolabels", "stat_histogram", "statistic only: ConfidenceHistogram.update on the device",
            bind(statistic_ours, False), settings=settings),
        Job("pseudolabels", "pass1", "pass 1 as uda.pseudolabels runs it (deterministic cuDNN)",
            bind(pass_one, False, True), settings={**settings, "amp": amp, "cudnn": "deterministic"}),
        Job("pseudolabels", "pass1_benchmark", "pass 1 with cudnn.benchmark",
            bind(pass_one, True, False), settings={**settings, "amp": amp, "cudnn": "benchmark"}),
        Job("pseudolabels", "pass1_fullres", "pass 1, softmax at 2x the inference size (labels at full resolution)",
            bind(pass_one, True, False, 2), settings={**settings, "amp": amp, "output": "2x"}),
    ]
    if bench.cuda and not bench.args.no_compile:
        jobs.append(Job("pseudolabels", "pass1_compiled", "pass 1 with torch.compile reduce-overhead",
                        bind(pass_one, True, False, 1, "reduce-overhead"),
                        settings={**settings, "amp": amp, "compile": "reduce-overhead"},
                        cost_s=COMPILE_COST_S[R18], phase=1, priority=8))
    return jobs
