"""Tables and pictures of the report, from run results (used by experiments.py)."""
import math
import statistics

import numpy as np

from dataset.labels import SHORT_NAMES, colorize


def mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(mean, std, show_std):
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if show_std else f"{100 * mean:.1f}"


def table1_markdown(rows, baseline=None, iterations=None):
    """Report's Table I: per-class IoU (report's column order), mIoU, pixel accuracy, Δ vs baseline.

    ``rows``: list of (method label, list of score dicts, one per seed). With several seeds every
    cell is mean ± standard deviation, and Δ is paired: the mean ± std over seeds of (row − baseline
    of the same seed). ``iterations`` ({label: n}) adds the training iterations behind each row.
    """
    show_std = any(len(scores) > 1 for _, scores in rows)
    baseline_mious = [s["miou"] for label, scores in rows if label == baseline for s in scores] if baseline else []
    header = ["method", *SHORT_NAMES, "mIoU", "acc"]
    if baseline:
        header.append("ΔmIoU vs " + baseline)
    if iterations:
        header.append("iterations")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scores in rows:
        cells = [label]
        for index in range(len(SHORT_NAMES)):
            cells.append(_cell(*mean_std([s["iou"][index] for s in scores]), show_std))
        mious = [s["miou"] for s in scores]
        cells += [_cell(*mean_std(mious), show_std), _cell(*mean_std([s["pixel_accuracy"] for s in scores]), show_std)]
        if baseline:
            cells.append(_delta_cell(label == baseline, mious, baseline_mious, show_std))
        if iterations:
            cells.append(str(iterations.get(label, "")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _delta_cell(is_baseline, mious, baseline_mious, show_std):
    if is_baseline or not baseline_mious:
        return "—"
    if len(mious) == len(baseline_mious):  # seed i against seed i
        mean, std = mean_std([a - b for a, b in zip(mious, baseline_mious)])
    else:
        mean, std = mean_std(mious)[0] - mean_std(baseline_mious)[0], None
    text = f"{100 * mean:+.1f}"
    return f"{text} ± {100 * std:.1f}" if show_std and std is not None else text


def table2_markdown(rows):
    """Report's Table II: parameters and GFLOPs (2 x thop MACs) of each network."""
    lines = ["| network | input | parameters | GFLOPs |", "|---|---|---:|---:|"]
    for row in rows:
        channels, height, width = row.input_shape[-3:]
        lines.append(f"| {row.model} | {channels}x{height}x{width} | {row.params:,} | {row.gflops:.4g} |")
    return "\n".join(lines)


def plot_miou_curves(curves, path, title="target-val mIoU during training"):
    """``curves``: {method: [(iteration, miou), ...]} -> PNG line plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, points in curves.items():
        if points:
            iterations, values = zip(*points)
            axis.plot(iterations, [100 * v for v in values], marker="o", markersize=3, label=method)
    axis.set_xlabel("iteration")
    axis.set_ylabel("mIoU (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_qualitative(images, labels, predictions, path):
    """Grid: one row per image; columns image, ground truth, then each method's prediction.

    ``images``: list of HxWx3 uint8; ``labels``: list of HxW trainIds; ``predictions``:
    {method: list of HxW trainIds}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["image", "ground truth", *predictions]
    rows = len(images)
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 1.3 * rows + 0.4), dpi=120, squeeze=False)
    for row in range(rows):
        panels = [images[row], colorize(labels[row]), *(colorize(p[row]) for p in predictions.values())]
        for column, panel in enumerate(panels):
            axis = axes[row][column]
            axis.imshow(np.asarray(panel))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(columns[column], fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
