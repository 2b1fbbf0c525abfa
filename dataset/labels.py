"""The one label table of the project.

Everything class-related derives from ``LABELS``: the Cityscapes-id -> trainId lookup table,
the trainId -> Cityscapes-id table used for official result files, the colour palette and the
report's column order. GTA5 label PNGs use the same ids as Cityscapes, so one table serves both.
"""
from collections import namedtuple

import numpy as np

NUM_CLASSES = 19
IGNORE_INDEX = 255
LUT_SIZE = 256  # labels are stored as uint8 PNGs

Label = namedtuple("Label", ["name", "id", "train_id", "color"])

# Official Cityscapes table (cityscapesscripts/helpers/labels.py). train_id 255 = not evaluated.
LABELS = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
)

TRAIN_LABELS = tuple(sorted((l for l in LABELS if l.train_id != IGNORE_INDEX), key=lambda l: l.train_id))
assert [l.train_id for l in TRAIN_LABELS] == list(range(NUM_CLASSES))

# Column order of the report's tables: the trainId order (road ... bicycle).
CLASS_NAMES = tuple(l.name for l in TRAIN_LABELS)
SHORT_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)


def _build_tables():
    id_to_train = np.full(LUT_SIZE, IGNORE_INDEX, dtype=np.uint8)
    train_to_id = np.zeros(LUT_SIZE, dtype=np.uint8)  # 255 (ignore) -> 0 "unlabeled"
    palette = np.zeros((LUT_SIZE, 3), dtype=np.uint8)  # 255 (ignore) -> black
    for label in LABELS:
        id_to_train[label.id] = label.train_id
    for label in TRAIN_LABELS:
        train_to_id[label.train_id] = label.id
        palette[label.train_id] = label.color
    for table in (id_to_train, train_to_id, palette):
        table.flags.writeable = False
    return id_to_train, train_to_id, palette


ID_TO_TRAINID, TRAINID_TO_ID, PALETTE = _build_tables()


def ids_to_train_ids(ids):
    """Map Cityscapes/GTA5 label ids (uint8 array) to trainIds by lookup table; unknown -> 255."""
    return ID_TO_TRAINID[np.asarray(ids, dtype=np.uint8)]


def train_ids_to_ids(train_ids):
    """Map trainIds back to Cityscapes label ids (what the official evaluation expects)."""
    return TRAINID_TO_ID[np.asarray(train_ids, dtype=np.uint8)]


def colorize(train_ids):
    """trainId map (H, W) -> RGB uint8 image (H, W, 3) in the Cityscapes palette; 255 is black."""
    return PALETTE[np.asarray(train_ids, dtype=np.uint8)]


def flat_palette():
    """The palette as the flat 768-entry list that PIL's ``Image.putpalette`` takes."""
    return PALETTE.reshape(-1).tolist()
