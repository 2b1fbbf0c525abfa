"""Writing the benchmark: file names and jobs, workers, the ownership stamp, the lock and the completion
marker; ``generate_benchmark`` and ``ensure_synthetic_benchmark``."""
import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset.labels import ID_TO_TRAINID, LUT_SIZE, NUM_CLASSES, TRAIN_LABELS
from dataset.synthetic.constants import (CITYSCAPES_FRAME, DEFAULT_NUM_SOURCE, DEFAULT_NUM_TARGET_TRAIN,
                                         DEFAULT_NUM_TARGET_VAL, DEFAULT_SEED, ENV_DIR, GENERATOR_VERSION,
                                         LOCK_NAME, MARKER_NAME, OWNER_NAME, PNG_COMPRESS_LEVEL, SOURCE_SIZE,
                                         SOURCE_SUBDIR, SOURCE_VAL_FRACTION, TARGET_SIZE, TARGET_SUBDIR,
                                         TRAIN_CITIES, VAL_CITIES)
from dataset.synthetic.sampling import EVENT_NAMES, rare_schedule, render_sample
from utils.files import atomic_write_bytes


def source_name(index):
    return f"{index + 1:05d}.png"


def cityscapes_names(split, count):
    """``<city>/<city>_<seq>_000019`` for ``count`` images spread over the split's cities in blocks."""
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    names, seq = [], {}
    for index in range(count):
        city = cities[index * len(cities) // count]
        number = seq.get(city, 0)
        seq[city] = number + 1
        names.append(f"{city}/{city}_{number:06d}_{CITYSCAPES_FRAME:06d}")
    return names


Job = namedtuple("Job", ["group", "domain", "split", "index", "seed", "flags", "image_path", "label_path"])


def _jobs(out, seed, num_source, num_target_train, num_target_val):
    jobs = []
    gta, cs = out / SOURCE_SUBDIR, out / TARGET_SUBDIR
    for index, flags in enumerate(rare_schedule(seed, "source", "all", num_source)):
        name = source_name(index)
        jobs.append(Job("source", "source", "all", index, seed, tuple(flags),
                        str(gta / "images" / name), str(gta / "labels" / name)))
    for split, count in (("train", num_target_train), ("val", num_target_val)):
        schedule = rare_schedule(seed, "target", split, count)
        for index, name in enumerate(cityscapes_names(split, count)):
            jobs.append(Job(f"target_{split}", "target", split, index, seed, tuple(schedule[index]),
                            str(cs / "leftImg8bit" / split / f"{name}_leftImg8bit.png"),
                            str(cs / "gtFine" / split / f"{name}_gtFine_labelIds.png")))
    return jobs


def _atomic_write_bytes(path, data):
    """Readers never see half a file. No fsync: durability after a power cut is the completion marker's
    job, not each image's."""
    atomic_write_bytes(path, data, durable=False)


def _png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _run_job(job):
    """Worker: render one sample, write its image and label PNGs; return its label-id histogram."""
    image, label = render_sample(job.domain, job.seed, job.split, job.index, dict(zip(EVENT_NAMES, job.flags)))
    _atomic_write_bytes(job.image_path, _png_bytes(image))
    _atomic_write_bytes(job.label_path, _png_bytes(label))
    return job.group, np.bincount(label.ravel(), minlength=LUT_SIZE)


def _default_workers():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _params(seed, num_source, num_target_train, num_target_val):
    """What a finished benchmark must match to be reused."""
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "num_source": int(num_source),
            "num_target_train": int(num_target_train), "num_target_val": int(num_target_val),
            "source_size": list(SOURCE_SIZE), "target_size": list(TARGET_SIZE)}


def _read_marker(out):
    try:
        return json.loads((Path(out) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _marker_matches(out, params):
    marker = _read_marker(out)
    return marker is not None and all(marker.get(key) == value for key, value in params.items())


@contextlib.contextmanager
def _exclusive(out):
    """Serialise generation into one folder across processes (e.g. every rank of a DDP job)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _claim(out, params):
    """Make ``out`` ours and empty of old output, refusing to touch data this generator did not write."""
    subdirs = [out / name for name in (SOURCE_SUBDIR, TARGET_SUBDIR) if (out / name).exists()]
    ours = (out / MARKER_NAME).exists() or (out / OWNER_NAME).exists()
    if subdirs and not ours:
        raise FileExistsError(f"{out} already holds {', '.join(p.name for p in subdirs)} that the synthetic "
                              f"generator did not write (neither {OWNER_NAME} nor {MARKER_NAME}); refusing to "
                              f"overwrite it: choose another folder")
    # The ownership stamp goes first, so a crash from here on leaves a folder we still recognise.
    _atomic_write_bytes(out / OWNER_NAME, json.dumps(dict(params, generator="dataset.synthetic"), indent=2).encode())
    (out / MARKER_NAME).unlink(missing_ok=True)
    for path in subdirs:  # old images of a larger benchmark would otherwise be picked up by folder scans
        shutil.rmtree(path)


def _class_fractions(counts):
    train_counts = np.bincount(ID_TO_TRAINID, weights=counts, minlength=LUT_SIZE)[:NUM_CLASSES]
    total = max(counts.sum(), 1)
    return {label.name: round(float(train_counts[label.train_id] / total), 6) for label in TRAIN_LABELS}


def _write_source_lists(out, num_source):
    names = [source_name(index) for index in range(num_source)]
    num_val = int(round(SOURCE_VAL_FRACTION * num_source)) if num_source >= 2 else 0
    num_val = max(num_val, 1) if num_source >= 2 else 0
    gta = out / SOURCE_SUBDIR
    for split, subset in (("train", names[:num_source - num_val]), ("val", names[num_source - num_val:])):
        _atomic_write_bytes(gta / f"{split}.txt", "".join(f"{name}\n" for name in subset).encode())


def _generate(out, seed, num_source, num_target_train, num_target_val, workers, progress):
    params = _params(seed, num_source, num_target_train, num_target_val)
    _claim(out, params)
    jobs = _jobs(out, seed, num_source, num_target_train, num_target_val)
    counts = {group: np.zeros(LUT_SIZE, np.int64) for group in ("source", "target_train", "target_val")}
    workers = _default_workers() if workers is None else max(1, int(workers))
    bar = tqdm(total=len(jobs), desc="[synthetic] rendering", unit="img", disable=not progress)
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(multiprocessing.get_context().Pool(min(workers, len(jobs))))
            results = pool.imap_unordered(_run_job, jobs, chunksize=4)
        else:
            results = map(_run_job, jobs)
        for group, histogram in results:
            counts[group] += histogram
            bar.update()
    bar.close()
    (out / SOURCE_SUBDIR).mkdir(parents=True, exist_ok=True)
    _write_source_lists(out, num_source)
    marker = dict(params, class_fractions={group: _class_fractions(c) for group, c in counts.items()})
    _atomic_write_bytes(out / MARKER_NAME, json.dumps(marker, indent=2).encode())
    return out


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def generate_benchmark(out_dir, seed=DEFAULT_SEED, num_source=DEFAULT_NUM_SOURCE,
                       num_target_train=DEFAULT_NUM_TARGET_TRAIN, num_target_val=DEFAULT_NUM_TARGET_VAL,
                       workers=None, progress=True):
    """(Re)generate the benchmark into ``out_dir`` and return it as a Path.

    Byte-identical for the same seed and counts whatever ``workers`` is (None: one per CPU)."""
    for name, value in (("num_source", num_source), ("num_target_train", num_target_train),
                        ("num_target_val", num_target_val)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    out = Path(out_dir)
    with _exclusive(out):
        return _generate(out, seed, num_source, num_target_train, num_target_val, workers, progress)


def default_root():
    """``$UDA_SYNTHETIC_DIR`` if set, else ``<repo>/data/synthetic``."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "synthetic"


def ensure_synthetic_benchmark(root=None, *, seed=DEFAULT_SEED, num_source=DEFAULT_NUM_SOURCE,
                               num_target_train=DEFAULT_NUM_TARGET_TRAIN, num_target_val=DEFAULT_NUM_TARGET_VAL,
                               workers=None, progress=True):
    """Return ``root`` (default: ``default_root()``), generating the benchmark first if it is missing,
    incomplete or was made with other parameters (or another generator version). A complete one
    is reused untouched. Safe to call from several processes at once."""
    root = Path(root) if root is not None else default_root()
    params = _params(seed, num_source, num_target_train, num_target_val)
    if _marker_matches(root, params):
        return root
    with _exclusive(root):
        if _marker_matches(root, params):  # another process finished it while we waited for the lock
            return root
        if _read_marker(root) is not None:
            reason = "parameters changed"
        elif (root / OWNER_NAME).exists():
            reason = "incomplete"
        else:
            reason = "first use"
        print(f"[synthetic] generating the built-in benchmark in {root} ({reason}) ...", flush=True)
        _generate(root, seed, num_source, num_target_train, num_target_val, workers, progress)
    return root
