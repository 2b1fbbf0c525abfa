"""Section ``trace``: where one adversarial and one MPL step spend their time (``torch.profiler``, the
top kernels and operators by self time on the device, each microsecond counted once)."""
import time

from .common import Job, bind, cudnn_flags, synchronize
from .config import scripts_train_config
from .mpl import mpl_step_callable, train_default_settings


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


def _is_device_event(event):
    """A kernel, memcpy or memset that ran on the device (not the host operator that launched it)."""
    return getattr(getattr(event, "device_type", None), "name", "CPU") != "CPU"


def trace_tables(averages, cuda, steps):
    """Where the profiled steps' time went, counting each microsecond once.

    On CUDA the profiler lists a device kernel twice: as its own event, and inside the self device
    time of the host operator that launched it (``aten::_log_softmax`` 1.202 ms beside its
    ``softmax_warp_forward`` 1.202 ms). Summing both overstates the busy time (an MPL step summed to
    397.9 ms busy in a 363.4-ms step). So the busy time and the kernel table sum device events only,
    and the operator table, which attributes the same time to operators, has shares of that busy
    time. On the CPU an operator's self time excludes its children: one table, no double count.
    Returns (busy microseconds, [(table name, rows)]) with rows (name, count, us), largest first."""
    timed = [(event.key, event.count, _event_time_us(event, cuda), _is_device_event(event)) for event in averages]
    by_time = sorted(timed, key=lambda row: -row[2])
    if not cuda:
        rows = [row[:3] for row in by_time]
        return sum(row[2] for row in rows), [("operator", rows)]
    kernels = [row[:3] for row in by_time if row[3]]
    operators = [row[:3] for row in by_time if not row[3] and row[2] > 0]
    return sum(row[2] for row in kernels), [("kernel", kernels), ("operator", operators)]


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
    total_us, tables = trace_tables(profiler.key_averages(), bench.cuda, steps)
    top = [{"name": name[:120], "kind": kind, "calls_per_step": count / steps, "ms_per_step": us / steps / 1e3,
            "share": us / total_us if total_us else None}
           for kind, rows in tables for name, count, us in rows[:TRACE_ROWS]]
    return {"steps": steps, "wall_ms_per_step_profiled": 1e3 * wall_s / steps,
            "device_busy_ms_per_step": total_us / steps / 1e3 if bench.cuda else None,
            "top": top, "timer": "self device time" if bench.cuda else "self CPU time",
            "note": "profiling adds overhead: compare shares, not the wall time, with the timed entries; "
                    "kernel rows and operator rows are two views of the same busy time"}


def trace_jobs(bench, recorder):
    steps = 3 if bench.cuda else 1
    return [Job("trace", kind, f"torch.profiler: {name}, {steps} steps", bind(trace_step, bench, kind, steps),
                settings=train_default_settings(bench), cost_s=15)
            for kind, name in (("adversarial", "adversarial step R18+DSC (ours)"), ("pham", "MPL step, pham feedback"))
            if kind in bench.profile.mpl_variants]
