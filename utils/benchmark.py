"""Inference-speed measurement shared by ``eval.py --benchmark`` and ``bench/``.

On a GPU, time with CUDA events after warm-up and report the median over many runs; on the CPU,
``time.perf_counter``. Throughput is images per second at a given batch size and resolution.
"""
import statistics
import time

import torch


def _timer(device):
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
    else:
        def timed(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return timed


def time_callable(fn, device, warmup=10, runs=50):
    """Median seconds of ``fn()`` over ``runs`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timed = _timer(device)
    samples = [timed(fn) for _ in range(runs)]
    return statistics.median(samples), samples


@torch.no_grad()
def inference_throughput(model, device, batch_size, height, width, precision, channels_last=False,
                         warmup=10, runs=50, num_channels=3):
    """Images/s of ``model`` (in eval mode) on random input; returns a result dict."""
    model.eval()
    images = torch.randn(batch_size, num_channels, height, width, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def forward():
        with precision.autocast():
            model(images)

    median, samples = time_callable(forward, device, warmup=warmup, runs=runs)
    return {
        "batch_size": batch_size, "height": height, "width": width, "precision": precision.mode,
        "channels_last": channels_last, "median_s": median, "images_per_s": batch_size / median,
        "runs": runs, "warmup": warmup, "device": device_name(device),
    }


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
