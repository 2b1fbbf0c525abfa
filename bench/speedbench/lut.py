"""Section ``lut``: the 256-entry lookup-table remap id -> trainId against a per-class loop on the
same label maps (and the loaders' path, and PIL's ``Image.point``), outputs checked identical."""
import statistics
import time

import numpy as np
from PIL import Image

from dataset.labels import ID_TO_TRAINID, IGNORE_INDEX, LABELS

from .common import Job, size_text


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
