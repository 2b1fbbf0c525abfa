"""File names shared by the writer and the reader of pseudo labels and result files.

A sample's ``name`` is its path relative to the split folder without the Cityscapes suffix and
extension, e.g. ``aachen/aachen_000000_000019`` (official layout) or ``00042`` (flat layout).
"""
from pathlib import Path

PSEUDO_LABEL_SUFFIX = "_pseudo_trainIds.png"
PSEUDO_COLOR_DIR = "color"
THRESHOLDS_FILE = "thresholds.json"


def pseudo_label_path(pseudo_dir, name):
    """Where the trainId pseudo label of sample ``name`` lives inside ``pseudo_dir``."""
    return Path(pseudo_dir) / f"{name}{PSEUDO_LABEL_SUFFIX}"


def pseudo_color_path(pseudo_dir, name):
    """Where the colourised copy of that pseudo label lives (a sub-folder the loader never reads)."""
    return Path(pseudo_dir) / PSEUDO_COLOR_DIR / f"{name}_color.png"


def cityscapes_result_name(name):
    """Official result-file name ``<city>_<seq>_<frame>_leftImg8bit.png`` for sample ``name``."""
    return f"{Path(name).name}_leftImg8bit.png"
