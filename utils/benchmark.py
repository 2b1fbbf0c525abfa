"""Inference-speed measurement shared by ``eval.py --benchmark`` and ``bench/``.

On a GPU, time with CUDA events after warm-up and report the median over many runs; on the CPU,
``time.perf_counter``. Throughput is images per second at a given batch size and resolution.

Two figures per setting, because on a GPU they differ: **throughput** times blocks of
back-to-back calls (the host queues the next call while the device runs this one, as any
inference loop does) and divides by the block length; **latency** times each call alone, from an
idle device to its last kernel, so it also counts the host's launch and dispatch time (about 0.1 ms
per call for a CUDA-graph replay through ``torch.compile``, 10 % of a 1 ms batch-1 forward).
Images/s is the throughput; the latency is reported beside it.
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


def time_callable(fn, device, warmup=10, runs=50, calls_per_sample=1):
    """Median seconds per ``fn()`` call over ``runs`` samples after ``warmup`` untimed calls.

    Each sample times ``calls_per_sample`` back-to-back calls and divides by that number: 1 gives
    the latency of a call, more give its share of a pipelined stream (the throughput view).
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timed = _timer(device)

    def block():
        for _ in range(calls_per_sample):
            fn()

    samples = [timed(block) / calls_per_sample for _ in range(runs)]
    return statistics.median(samples), samples


def with_process_time(fn, record):
    """``fn`` that also appends the CPU time this process spent in each call to ``record``."""
    def timed():
        start = time.process_time()
        fn()
        record.append(time.process_time() - start)
    return timed


THROUGHPUT_BLOCK = 10  # back-to-back calls per throughput sample


@torch.no_grad()
def inference_throughput(model, device, batch_size, height, width, precision, channels_last=False,
                         warmup=10, runs=50, num_channels=3, block=THROUGHPUT_BLOCK):
    """Images/s of ``model`` (in eval mode) on random input, and the latency of one call.

    ``images_per_s`` comes from ``runs`` samples of ``block`` back-to-back calls each;
    ``latency_ms`` from ``runs`` calls timed alone (see the module's docstring).
    """
    model.eval()
    images = torch.randn(batch_size, num_channels, height, width, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def forward():
        with precision.autocast():
            model(images)

    median, _ = time_callable(forward, device, warmup=warmup, runs=runs, calls_per_sample=block)
    latency, _ = time_callable(forward, device, warmup=0, runs=runs)
    return {
        "batch_size": batch_size, "height": height, "width": width, "precision": precision.mode,
        "channels_last": channels_last, "median_s": median, "images_per_s": batch_size / median,
        "latency_ms": 1e3 * latency, "images_per_s_one_call_at_a_time": batch_size / latency,
        "runs": runs, "block": block, "warmup": warmup, "device": device_name(device),
    }


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_average():
    """The machine's 1, 5 and 15-minute load averages (None where the OS has none): a CPU timing's context."""
    import os

    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):  # no getloadavg on Windows
        return None
