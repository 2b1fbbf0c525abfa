"""The recorder: time budget, per-entry time limit, one failed entry recorded without ending the run,
and the JSON + Markdown rewritten after every entry."""
import os
import platform
import time
import traceback
from pathlib import Path

import torch

from utils.benchmark import device_name
from utils.logger import git_commit, plain_args, write_json, write_text

from .common import json_safe, load_average, release_memory, time_limit
from .config import SCHEMA
from .markdown import markdown
from .summary import summary_rows


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
