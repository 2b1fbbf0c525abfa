"""Tables and pictures of the report, from run results (used by experiments.py)."""
import math
import statistics

import numpy as np

from dataset.labels import CLASS_NAMES, PALETTE, SHORT_NAMES, colorize


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
    deltas = paired_deltas(mious, baseline_mious)  # seed i against seed i
    if deltas is not None:
        mean, std = mean_std(deltas)
    else:
        mean, std = mean_std(mious)[0] - mean_std(baseline_mious)[0], None
    text = f"{100 * mean:+.1f}"
    return f"{text} ± {100 * std:.1f}" if show_std and std is not None else text


def paired_deltas(mious, reference_mious):
    """Per-seed mIoU differences (row − reference of the same seed), or None when the seeds differ."""
    if len(mious) != len(reference_mious) or not mious:
        return None
    return [a - b for a, b in zip(mious, reference_mious)]


def paired_deltas_markdown(rows, references):
    """Each row against each reference, paired by seed: mean ± std of the differences in mIoU points,
    every seed's difference, and how many seeds are above the reference.

    ``rows``: list of (label, list of score dicts, one per seed); ``references``: (column title,
    label among the rows) pairs (a reference's own cell is "—"). With one seed a cell is that
    seed's difference.
    """
    mious = {label: [s["miou"] for s in scores] for label, scores in rows}
    lines = ["| method | " + " | ".join(f"Δ vs {title}" for title, _ in references) + " |",
             "|" + "---|" * (len(references) + 1)]
    for label, _ in rows:
        cells = [label]
        for _, reference in references:
            deltas = None if label == reference else paired_deltas(mious[label], mious.get(reference, []))
            cells.append("—" if deltas is None else _paired_cell(deltas))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_cell(deltas):
    if len(deltas) == 1:
        return f"{100 * deltas[0]:+.1f}"
    mean, std = mean_std(deltas)
    each = ", ".join(f"{100 * delta:+.1f}" for delta in deltas)
    above = sum(delta > 0 for delta in deltas)
    return f"{100 * mean:+.1f} ± {100 * std:.1f} ({each}; {above}/{len(deltas)} above)"


def table2_markdown(rows):
    """Report's Table II: parameters and GFLOPs (2 x thop MACs) of each network."""
    lines = ["| network | input | parameters | GFLOPs |", "|---|---|---:|---:|"]
    for row in rows:
        channels, height, width = row.input_shape[-3:]
        lines.append(f"| {row.model} | {channels}x{height}x{width} | {row.params:,} | {row.gflops:.4g} |")
    return "\n".join(lines)


def curve_bands(curves_per_seed):
    """[{method: [(iteration, miou), ...]} per seed] -> {method: [(iteration, mean, min, max), ...]} over the
    seeds that have a point at that iteration (every seed runs the same schedule)."""
    bands = {}
    for method in dict.fromkeys(method for curves in curves_per_seed for method in curves):
        by_iteration = {}
        for curves in curves_per_seed:
            for iteration, value in curves.get(method, []):
                by_iteration.setdefault(iteration, []).append(value)
        bands[method] = [(iteration, statistics.fmean(values), min(values), max(values))
                         for iteration, values in sorted(by_iteration.items())]
    return bands


MARKERS = "osD^v<>ph*"  # one per method, so a method's single point does not hide under another's


def curve_colours(plt):
    """20 distinct colours: matplotlib's tab20, its dark shades first (`--methods all` draws 15
    rows, more than the default cycle's 10 colours)."""
    colours = plt.get_cmap("tab20").colors
    return colours[0::2] + colours[1::2]


def plot_miou_curves(curves_per_seed, path, title="target-val mIoU during training"):
    """``curves_per_seed``: [{method: [(iteration, miou), ...]} per seed] -> PNG: the mean over the seeds,
    a band from the lowest to the highest seed, and a title that says how many seeds there are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    seeds = len(curves_per_seed)
    colours = curve_colours(plt)
    figure, axis = plt.subplots(figsize=(9, 5), dpi=120)
    for index, (method, points) in enumerate(curve_bands(curves_per_seed).items()):
        if not points:
            continue
        iterations, means, lows, highs = zip(*points)
        single = len(points) == 1
        line, = axis.plot(iterations, [100 * v for v in means], marker=MARKERS[index % len(MARKERS)],
                          markersize=7 if single else 3, fillstyle="none" if single else "full", label=method,
                          color=colours[index % len(colours)])
        if seeds > 1:
            axis.fill_between(iterations, [100 * v for v in lows], [100 * v for v in highs], alpha=0.15,
                              color=line.get_color(), linewidth=0)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
    axis.set_xlabel("iteration")
    axis.set_ylabel("mIoU (%)")
    spread = f"mean of {seeds} seeds, band: lowest to highest seed" if seeds > 1 else "one seed (seed 0), no spread"
    axis.set_title(f"{title}\n{spread}", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the plot: 15 rows fit
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return figure


def class_legend_entries():
    """(name, RGB 0..1) of every train id, then the ignore colour (black) the predictions never use."""
    entries = [(name, tuple(channel / 255 for channel in PALETTE[train_id])) for train_id, name in enumerate(CLASS_NAMES)]
    return entries + [("ignore / unlabelled", (0.0, 0.0, 0.0))]


TITLE_POINTS = 12  # column titles, readable at the figure's 2000-3000 px width
LEGEND_INCHES = 1.0  # room below the grid for the class-colour legend


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
    height = 1.3 * rows + 0.4 + LEGEND_INCHES
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), height), dpi=120, squeeze=False)
    for row in range(rows):
        panels = [images[row], colorize(labels[row]), *(colorize(p[row]) for p in predictions.values())]
        for column, panel in enumerate(panels):
            axis = axes[row][column]
            axis.imshow(np.asarray(panel))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(columns[column], fontsize=TITLE_POINTS)
    from matplotlib.patches import Patch

    entries = class_legend_entries()
    figure.legend(handles=[Patch(facecolor=colour, edgecolor="grey", label=name) for name, colour in entries],
                  loc="lower center", ncol=10, fontsize=TITLE_POINTS - 2, frameon=False,
                  title="colours (black: ignore, pixels without a class in the ground truth)",
                  title_fontsize=TITLE_POINTS - 1)
    figure.tight_layout(rect=(0, LEGEND_INCHES / height, 1, 1))
    figure.savefig(path)
    plt.close(figure)
    return figure
