"""MPL.py's flags, their checks against each other, and the --thresholds file it reads.

The method (labeler, feedback rules, step) is ``uda.meta_pseudo_labels`` and ``uda.mpl_feedback``;
this is the wiring that turns a command line into its settings, refusing contradictions before any
data or network is touched.
"""
import json
from pathlib import Path

import torch

from cli.options import non_negative_float, non_negative_int, positive_float, unit_interval
from dataset.labels import CLASS_NAMES, NUM_CLASSES, SHORT_NAMES
from engine.optim import OPTIMIZERS
from uda.meta_pseudo_labels import DEFAULT_REFRESH, DEFAULT_UDA_WEIGHT
from uda.mpl_feedback import (COURSE_ALPHA_LAST_EPOCH, COURSE_ALPHA_SCALE, COURSE_TEACHER_ADVERSARIAL_WEIGHT,
                              COURSE_TEACHER_LR, COURSE_TEACHER_OPTIMIZER, DEFAULT_BASELINE_DECAY, FEEDBACKS)
from utils.errors import OptionError

UDA_RAMP_FRACTION = 0.1        # default UDA ramp: the first tenth of the run
# pham: the teacher is fine-tuned from a trained checkpoint; restarting it at the student's
# from-scratch learning rate would undo part of its training. course: the course's teacher
# optimizer and rate (COURSE_TEACHER_OPTIMIZER, COURSE_TEACHER_LR).
TEACHER_LR_DIVISOR = 10


def add_mpl_args(parser):
    group = parser.add_argument_group("meta pseudo labels")
    group.add_argument("--teacher-checkpoint", required=True,
                       help="teacher initialisation: any BiSeNet checkpoint load_bisenet reads (e.g. the DSC run's best.pth)")
    group.add_argument("--teacher-network", default="model",
                       help="which network of a multi-network teacher checkpoint (an MPL run's 'teacher', say)")
    group.add_argument("--student-checkpoint", dest="init_from", default=None,
                       help="student initialisation, the same as --init-from (default: a fresh BiSeNet per "
                            "--context-path/--pretrained)")
    group.add_argument("--feedback", choices=FEEDBACKS, default="pham",
                       help="pham (the MPL paper): the student first steps on the pseudo labels alone; h = its labeled "
                            "(source) loss before - after that step, minus a moving baseline, weighs the teacher's "
                            "pseudo-label CE (main head; teacher adversarial weight --lambda-adv); then the student "
                            "takes its source + adversarial step. course (the course's MPL.py): one source + pseudo-label "
                            "+ adversarial student step; weight alpha x H, H = student_lr x L_pseudo x L_source, "
                            f"alpha = exp(epoch/{COURSE_ALPHA_SCALE}) - 1 for epochs 1..{COURSE_ALPHA_LAST_EPOCH}, 1 "
                            "after, and alpha x H = 1 in epoch 0; three heads in the teacher's pseudo-label CE, "
                            f"teacher adversarial weight {COURSE_TEACHER_ADVERSARIAL_WEIGHT:g} (uda/mpl_feedback.py)")
    group.add_argument("--teacher-optimizer", choices=OPTIMIZERS, default=None,
                       help=f"teacher optimizer (default: --optimizer for pham, {COURSE_TEACHER_OPTIMIZER} for course)")
    group.add_argument("--teacher-learning-rate", type=positive_float, default=None,
                       help=f"teacher initial learning rate, poly decay (default: pham --learning-rate / "
                            f"{TEACHER_LR_DIVISOR}, the teacher being fine-tuned; course {COURSE_TEACHER_LR:g}, the course's)")
    group.add_argument("--refresh", type=non_negative_int, default=None,
                       help=f"refresh the per-class thresholds every N iterations from the histogram of the teacher's "
                            f"predictions since the last refresh; 0 = fixed --thresholds (default: {DEFAULT_REFRESH}, "
                            f"or 0 with --thresholds)")
    group.add_argument("--thresholds", metavar="PATH", default=None,
                       help="fixed per-class thresholds from a createpseudolabels.py thresholds.json")
    group.add_argument("--uda-weight", type=non_negative_float, default=DEFAULT_UDA_WEIGHT,
                       help="weight of the teacher's consistency term on an augmented target view")
    group.add_argument("--uda-ramp-iters", type=non_negative_int, default=None,
                       help="linear ramp of the UDA weight from 0, in iterations (default: a tenth of the run; 0: none)")
    group.add_argument("--baseline-decay", type=unit_interval, default=DEFAULT_BASELINE_DECAY,
                       help="pham: decay of the moving-average baseline of h (1: no baseline)")
    return group


def resolve_mpl_args(args):
    """Check the MPL flags against each other (before any data or network is touched)."""
    if args.refresh is None:
        args.refresh = 0 if args.thresholds else DEFAULT_REFRESH
    if args.thresholds and args.refresh:
        raise OptionError("--thresholds gives fixed thresholds; drop it or use --refresh 0 "
                         f"(got --refresh {args.refresh})")
    if not args.thresholds and not args.refresh:
        raise OptionError("--refresh 0 means fixed thresholds: give them with --thresholds PATH (a thresholds.json)")
    course = args.feedback == "course"
    if args.teacher_optimizer is None:
        args.teacher_optimizer = COURSE_TEACHER_OPTIMIZER if course else args.optimizer
    if args.teacher_learning_rate is None:
        args.teacher_learning_rate = COURSE_TEACHER_LR if course else args.learning_rate / TEACHER_LR_DIVISOR
    return args


def resolve_mpl_schedule(args):
    """The UDA ramp in iterations, once the run length is known (written back into ``args``)."""
    if args.uda_ramp_iters is None:
        args.uda_ramp_iters = max(1, round(UDA_RAMP_FRACTION * args.max_iters))


def read_thresholds(path, num_classes=NUM_CLASSES):
    """Per-class thresholds (float64 [num_classes]) from a thresholds.json.

    Reads createpseudolabels.py's file (``"thresholds": [t0, ...]``, or its ``"classes"`` entries
    ``{name: {"train_id": c, "threshold": t, ...}}``) and simpler hand-written ones: a list of
    numbers, a list of ``{"threshold": t[, "train_id": c]}``, or a dict from class names (full or
    short) or train ids to numbers or such dicts. A per-image run has no fixed thresholds: refused.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OptionError(f"--thresholds {path}: cannot read it as JSON ({error})") from None
    if isinstance(data, dict) and data.get("mode") == "per-image":
        raise OptionError(f"--thresholds {path} comes from a per-image createpseudolabels.py run: it holds no "
                         f"dataset-wide thresholds; make one without --per-image, or use --refresh N")
    entries = data
    if isinstance(data, dict):
        entries = next((data[key] for key in ("thresholds", "classes") if data.get(key) is not None), data)

    def value_of(entry):
        value = entry.get("threshold") if isinstance(entry, dict) else entry
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise OptionError(f"--thresholds {path}: {entry!r} is not a threshold in [0, 1]")
        return float(value)

    def train_id_of(entry, default):
        train_id = entry.get("train_id", default) if isinstance(entry, dict) else default
        if not isinstance(train_id, int) or not 0 <= train_id < num_classes:
            raise OptionError(f"--thresholds {path}: {entry!r} names no train id in [0, {num_classes})")
        return train_id

    values = [None] * num_classes
    if isinstance(entries, list):
        if len(entries) != num_classes:
            raise OptionError(f"--thresholds {path}: {len(entries)} thresholds for {num_classes} classes")
        for index, entry in enumerate(entries):
            values[train_id_of(entry, index)] = value_of(entry)
    elif isinstance(entries, dict):
        names = {str(index): index for index in range(num_classes)}
        if num_classes == NUM_CLASSES:
            names.update({name: index for index, name in enumerate(CLASS_NAMES)})
            names.update({name: index for index, name in enumerate(SHORT_NAMES)})
        for key, entry in entries.items():
            if key in names or isinstance(entry, dict) and "train_id" in entry:
                values[train_id_of(entry, names.get(key))] = value_of(entry)
    missing = [index for index, value in enumerate(values) if value is None]
    if missing:
        raise OptionError(f"--thresholds {path}: no threshold for class(es) {missing} (expected {num_classes} classes)")
    return torch.tensor(values, dtype=torch.float64)
