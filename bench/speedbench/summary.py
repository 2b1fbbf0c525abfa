"""The summary table: figure | anchor | naive | ours | ratio ours/naive | goal | met?

One function per figure group, in the table's order; each reads the entries its section recorded
and adds nothing when they are missing (a section left out, or a run cut short)."""
from .common import size_text
from .config import (AGREEMENT_GOAL, E2E_GOAL, FLOPS_ANCHORS, HALF, INFERENCE_ANCHORS, INFERENCE_GOALS, LUT_GOAL,
                     MEMORY_ANCHORS_GIB, MPL_GOAL, PSEUDO_ANCHOR_MS_PER_IMAGE, PSEUDO_GOAL, TRAIN_ANCHORS_MS,
                     TRAIN_GOALS_MS)
from .markdown import fmt


def _entries(result, section):
    return result["sections"].get(section, {}).get("entries", [])


def _get(result, section, key):
    for entry in _entries(result, section):
        if entry["key"] == key:
            return entry
    return {}


def _best(entries, metric, higher=True, exclude=("naive",)):
    candidates = [e for e in entries if e.get(metric) is not None and e["key"].rsplit("/", 1)[-1] not in exclude]
    if not candidates:
        return {}
    return (max if higher else min)(candidates, key=lambda e: e[metric])


def _config_name(entry):
    """The configuration part of an entry's name ("shape | configuration"), or None."""
    return entry.get("name", "").split(" | ")[-1] or None


def bench_is_fp32_only(result):
    return result["device_type"] != "cuda"


class SummaryRows:
    """The rows being built, and the rule that speed goals are judged on the gpu profile on a GPU only."""

    def __init__(self, result, profile):
        self.result, self.profile = result, profile
        self.gpu = profile.name == "gpu" and result["device_type"] == "cuda"
        self.rows = []

    def add(self, figure, anchor, naive, ours, goal_text, met, ours_config=None, ratio=None, note=None):
        if ratio is None and naive not in (None, 0) and ours is not None:
            ratio = ours / naive
        self.rows.append({"figure": figure, "anchor": anchor, "naive": naive, "ours": ours, "ours_config": ours_config,
                          "ratio": ratio, "goal": goal_text, "met": met, "note": note})

    def speed_goal(self, value, goal, higher=True):
        if goal is None or value is None:
            return None
        if not self.gpu:
            return "n/a (not the gpu profile on a GPU)"
        return value >= goal if higher else value <= goal


def _inference_rows(rows, result, profile):
    for context_path, size_hw, batch in profile.inference:
        prefix = f"{context_path}/{size_text(size_hw)}/b{batch}/"
        entries = [e for e in _entries(result, "inference") if e["key"].startswith(prefix)]
        naive = next((e for e in entries if e["key"] == prefix + "naive"), {})
        best = _best(entries, "images_per_s")
        key = (context_path, tuple(size_hw), batch)
        anchors = INFERENCE_ANCHORS.get(key) if profile.name == "gpu" else None
        goal = INFERENCE_GOALS.get(key) if profile.name == "gpu" else None
        rows.add(f"inference {context_path} {size_text(size_hw)} batch {batch} (img/s)",
                 "; ".join(f"{v} ({k})" for k, v in anchors.items()) if anchors else None,
                 naive.get("images_per_s"), best.get("images_per_s"), f">= {goal}" if goal else None,
                 rows.speed_goal(best.get("images_per_s"), goal), _config_name(best))


def _agreement_row(rows, result, profile):
    """Agreement of the fastest path of the first shape."""
    context_path, size_hw, batch = profile.inference[0]
    prefix = f"{context_path}/{size_text(size_hw)}/b{batch}/"
    entries = [e for e in _entries(result, "inference") if e["key"].startswith(prefix)]
    best = _best(entries, "images_per_s")
    naive = next((e for e in entries if e["key"] == prefix + "naive"), {})
    if best:
        value = best.get("agreement")
        rows.add(f"pixel agreement with strict fp32 eager, fastest path, {context_path} {size_text(size_hw)} b{batch}",
                 None, naive.get("agreement"), value, f">= {AGREEMENT_GOAL:.1%}",
                 None if value is None else value >= AGREEMENT_GOAL, best.get("name", "").split(" | ")[-1],
                 note=f"weights: {result.get('weights', {}).get(context_path, {}).get('source')}")


def _training_rows(rows, result, profile):
    for context_path, discriminator, _ in profile.train_pairs:
        prefix = f"{context_path}+{discriminator}/"
        entries = [e for e in _entries(result, "training") if e["key"].startswith(prefix)]
        naive = next((e for e in entries if e["key"] == prefix + "naive"), {})
        # Not a configuration the scripts can run: an estimate of what removing the syncs would give.
        best = _best(entries, "median_ms", higher=False, exclude=("naive", "ours_no_sync"))
        key = (context_path, discriminator)
        sized = profile.name == "gpu"
        goal = TRAIN_GOALS_MS.get(key) if sized else None
        rows.add(f"adversarial iteration {context_path}+{discriminator.upper()}, batch {profile.train_batch}, "
                 f"{size_text(profile.train_source)} + {size_text(profile.train_target)} (ms)",
                 TRAIN_ANCHORS_MS.get(key) if sized else None, naive.get("median_ms"), best.get("median_ms"),
                 f"<= {goal:g}" if goal else None, rows.speed_goal(best.get("median_ms"), goal, higher=False),
                 _config_name(best))
        if best.get("peak_memory_gib") is not None or naive.get("peak_memory_gib") is not None:
            rows.add(f"peak GPU memory {context_path}+{discriminator.upper()} (GiB)",
                     MEMORY_ANCHORS_GIB.get(key) if sized else None, naive.get("peak_memory_gib"),
                     best.get("peak_memory_gib"), None, None, _config_name(best))


def _loss_curve_row(rows, result, profile):
    curves = _get(result, "training", "loss_curves")
    if curves.get("mean_rel_diff") is None:
        return
    naive_dev, noise = curves.get("naive_mean_rel_diff"), curves.get("noise_mean_rel_diff")
    figure = (f"loss curve R18+DSC, {curves.get('iterations')} it.: mean rel. deviation of the seg loss from "
              f"strict fp32")
    if bench_is_fp32_only(result):
        rows.add(figure, None, None, curves["mean_rel_diff"], "within noise",
                 "n/a (ours is fp32 here: this deviation is the noise floor)", "ours (scripts' default)")
    else:
        limit = max(2 * max(naive_dev or 0.0, noise or 0.0), 1e-3)
        rows.add(figure, None, naive_dev, curves["mean_rel_diff"],
                 f"<= {limit:.3g} (2x the larger of the naive AMP's deviation and fp32 channels_last's "
                 f"{fmt(noise, 3)}, at least 0.001)",
                 curves["mean_rel_diff"] <= limit, "ours (scripts' default)")


def _e2e_row(rows, result, profile):
    e2e = _get(result, "training", "e2e")
    if e2e.get("median_ms") is not None:
        ratio = e2e.get("ratio_to_synthetic")
        rows.add("R18+DSC iteration fed by the real loaders vs synthetic input (ms)", None,
                 e2e.get("synthetic_median_ms"), e2e["median_ms"], f"ratio <= {E2E_GOAL}",
                 rows.speed_goal(ratio, E2E_GOAL, higher=False),
                 f"{e2e.get('workers_per_stream')} workers x 2 streams", ratio=ratio)


def _pseudolabel_rows(rows, result, profile):
    naive = _get(result, "pseudolabels", "naive")
    passes = [e for e in _entries(result, "pseudolabels") if e["key"].startswith("pass1") and e["key"] != "pass1_fullres"]
    best = _best(passes, "images_per_s", exclude=())
    if naive or best:
        sized = profile.name == "gpu"
        rows.add(f"pseudo-label threshold pass, R18 {size_text(profile.pl_size)} (img/s)",
                 round(1e3 / PSEUDO_ANCHOR_MS_PER_IMAGE, 1) if sized else None, naive.get("images_per_s"),
                 best.get("images_per_s"), f">= {PSEUDO_GOAL:g}" if sized else None,
                 rows.speed_goal(best.get("images_per_s"), PSEUDO_GOAL if sized else None), best.get("name"))
    stat_naive, stat_ours = _get(result, "pseudolabels", "stat_naive"), _get(result, "pseudolabels", "stat_per_image")
    if stat_naive.get("images_per_s") and stat_ours.get("images_per_s"):
        rows.add("per-image medians only: per-class np.median loop vs per_image_thresholds (img/s)", None,
                 stat_naive["images_per_s"], stat_ours["images_per_s"], None, None, "per_image_thresholds")


def _mpl_row(rows, result, profile):
    mpl = _get(result, "mpl", "pham")
    if mpl.get("ratio_to_adversarial") is not None:
        ratio = mpl["ratio_to_adversarial"]
        rows.add("MPL iteration / adversarial iteration (ms)", None,
                 _get(result, "mpl", "adversarial").get("median_ms"), mpl["median_ms"], f"ratio <= {MPL_GOAL}",
                 rows.speed_goal(ratio, MPL_GOAL, higher=False), "pham feedback", ratio=ratio)


def _loader_rows(rows, result, profile):
    for domain, label in (("gta5", f"GTA5 {size_text(profile.gta5_file)} -> {size_text(profile.gta5_size)}"),
                          ("cityscapes", f"Cityscapes {size_text(profile.cityscapes_file)} -> "
                                         f"{size_text(profile.cityscapes_size)}")):
        single, workers = _get(result, "loader", f"{domain}/1"), _get(result, "loader", f"{domain}/workers")
        if single or workers:
            rows.add(f"loader {label} (img/s)", None, single.get("images_per_s"), workers.get("images_per_s"), None,
                     None, f"{workers.get('workers')} workers" if workers.get("workers") else None,
                     note="naive = one process; ours = BatchStream with workers")


def _lut_row(rows, result, profile):
    lut = _get(result, "lut", "remap")
    if lut.get("speedup") is not None:
        rows.add(f"label remap, {lut.get('map_size')} maps (Mpixel/s)", None, lut.get("loop_mpixels_per_s"),
                 lut.get("lut_mpixels_per_s"), f"ratio >= {LUT_GOAL:g}",
                 lut["speedup"] >= LUT_GOAL and lut["identical_output"], "ID_TO_TRAINID[ids]", ratio=lut["speedup"])


def _flops_rows(rows, result, profile):
    for entry in _entries(result, "flops"):
        if entry.get("gflops") is not None:
            rows.add(f"GFLOPs {entry['key']} at {entry['settings'].get('size')}",
                     FLOPS_ANCHORS.get(entry["key"]) if profile.flops_size == HALF else None, None, entry["gflops"],
                     None, None, "flop_counter",
                     note=f"thop: {entry['gflops_thop']:.4g}" if entry.get("gflops_thop") else None)


SUMMARY_PARTS = (_inference_rows, _agreement_row, _training_rows, _loss_curve_row, _e2e_row, _pseudolabel_rows,
                 _mpl_row, _loader_rows, _lut_row, _flops_rows)


def summary_rows(result, profile):
    rows = SummaryRows(result, profile)
    for part in SUMMARY_PARTS:
        part(rows, result, profile)
    return rows.rows
