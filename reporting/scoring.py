"""Scoring the main job's runs: every method of every seed on target val, the domain gap's source
side, the curves, the qualitative predictions and the results.json summary.

The datasets and loaders come from the caller (experiments.py builds them from its flags), so this
module reads only checkpoints, run histories and images.
"""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.normalization import get_normalization
from engine.evaluate import eval_mode, evaluate, predict_logits
from engine.metrics import scores_from_json, scores_to_json
from engine.precision import Precision
from model import load_bisenet
from reporting.pipeline import (BASELINE, METHODS, PAIRED_REFERENCES, REPORT_ADAPTATION_ROWS, STAGE_BY_KEY,
                                start_iteration)
from reporting.report import mean_std, paired_deltas, table2_markdown

QUALITATIVE_IMAGES = 4
COMPLEXITY_SIZE = (512, 1024)  # the report's Table II resolution (height, width)


def history(run_dir):
    metrics = Path(run_dir) / "metrics.json"
    return json.loads(metrics.read_text())["history"] if metrics.is_file() else []


def record_scores(record, network):
    """A validation record's scores of ``network`` ("model": the run's first, e.g. MPL's student)."""
    names = list(record["scores"])
    return record["scores"][network if network in names else names[0]]


def final_scores(run_dir, network, iterations):
    """The run's own validation of its final weights, or None when it has none at ``iterations``."""
    records = history(run_dir)
    if not records or records[-1]["iteration"] != iterations:
        return None
    return scores_from_json(record_scores(records[-1], network))


def _resize_to(image, shape):
    if image.shape[:2] == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))


@torch.no_grad()
def score_methods(seed_dirs, settings, val, loader, source_loader, device):
    """Every available method of every seed on target val (``loader`` over ``val``), the source-only
    models on source val (``source_loader``), and seed 0's predictions of a few images.

    Returns (scores {label: [per seed]}, (images, labels, predictions), gap {"source_only_source_val": [...]})."""
    precision = Precision(device, "auto")
    picked = list(range(min(QUALITATIVE_IMAGES, len(val))))
    scores, predictions, gap = {}, {}, {}
    for label, stage, network in METHODS:
        for seed_dir in seed_dirs:
            checkpoint = Path(seed_dir) / stage / "last.pth"
            if not checkpoint.is_file():
                continue
            # The run validated its last.pth at its final iteration with the same evaluate() on the
            # same data; scoring it again would only repeat that work.
            final = final_scores(Path(seed_dir) / stage, network, settings.stage_iterations(stage))
            if final is not None and seed_dir != seed_dirs[0] and stage != "source_only":
                scores.setdefault(label, []).append(final)
                continue  # nothing else needs this model: its weights are not even read
            model = load_bisenet(checkpoint, key=network).to(device)
            if final is None:
                final = evaluate(model, loader, device, precision=precision, progress=False)
            scores.setdefault(label, []).append(final)
            if seed_dir == seed_dirs[0]:
                with eval_mode(model):
                    predictions[label] = [
                        predict_logits(model, val[i]["image"][None].to(device), val[i]["label"].shape, precision)
                        .argmax(1)[0].cpu().numpy() for i in picked]
            if stage == "source_only":
                gap.setdefault("source_only_source_val", []).append(
                    evaluate(model, source_loader, device, precision=precision, progress=False))
    normalization = get_normalization("imagenet", "cityscapes")
    images = [_resize_to(normalization.denormalize(val[i]["image"]), val[i]["label"].shape) for i in picked]
    labels = [val[i]["label"].numpy() for i in picked]
    return scores, (images, labels, predictions), gap


def curves(seed_dir, settings):
    """{method: [(iteration, mIoU), ...]}; a fine-tuned stage's curve starts where its parent's ends."""
    result = {}
    for label, stage, network in METHODS:
        records = history(Path(seed_dir) / stage)
        if not records:
            continue
        offset = start_iteration(settings, stage)
        points = [(offset + record["iteration"], record_scores(record, network)["miou"]) for record in records]
        parent = STAGE_BY_KEY[stage].parent
        parent_label = next((label for label, key, net in METHODS if key == parent and net == "model"), None)
        if result.get(parent_label):  # a branch starts at the model it fine-tunes
            points.insert(0, result[parent_label][-1])
        result[label] = points
    return result


def best_report_row(scores):
    """The report's adaptation row with the highest mean mIoU among those scored, or None."""
    scored = [label for label in REPORT_ADAPTATION_ROWS if label in scores]
    return max(scored, key=lambda label: mean_std([s["miou"] for s in scores[label]])[0], default=None)


def paired_references(scores):
    """(column title, row label) of the paired comparisons that these scores allow."""
    references = [(label, label) for label in PAIRED_REFERENCES if label in scores]
    best = best_report_row(scores)
    if best is not None:
        references.append((f"best report row ({best})", best))
    return references


def paired_summary(scores, references):
    """{row: {reference: per-seed mIoU differences}} for results.json."""
    mious = {label: [s["miou"] for s in values] for label, values in scores.items()}
    return {label: {reference: paired_deltas(mious[label], mious[reference])
                    for _, reference in references if reference != label}
            for label in scores}


def results_summary(scores, gap):
    """The per-method and domain-gap part of results.json."""
    return {
        "methods": {label: {"per_seed": [scores_to_json(s) for s in values],
                            "miou_mean": mean_std([s["miou"] for s in values])[0],
                            "miou_std": mean_std([s["miou"] for s in values])[1],
                            "pixel_accuracy_mean": mean_std([s["pixel_accuracy"] for s in values])[0]}
                    for label, values in scores.items()},
        "domain_gap": {"source_only_source_val_miou": [s["miou"] for s in gap.get("source_only_source_val", [])],
                       "source_only_target_val_miou": [s["miou"] for s in scores.get(BASELINE, [])]},
    }


def complexity_markdown():
    """Table II (parameters and GFLOPs at the report's resolution), or a note when thop is missing."""
    from model.flops import complexity_table

    try:
        return table2_markdown(complexity_table(*COMPLEXITY_SIZE))
    except ImportError:  # thop is optional at run time
        return "(thop is not installed: pip install thop for the complexity table)"
