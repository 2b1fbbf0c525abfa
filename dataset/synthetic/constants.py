"""The benchmark's public constants (folders, sizes, default counts, file names) and its label ids."""
from dataset.labels import LABELS

# ----------------------------------------------------------------------------------------------
# Public constants
# ----------------------------------------------------------------------------------------------
GENERATOR_VERSION = 2  # bump whenever the pictures change, so cached benchmarks are regenerated
SOURCE_SUBDIR = "GTA5"
TARGET_SUBDIR = "Cityscapes"
SOURCE_SIZE = (288, 512)  # (height, width): about GTA5's 1914x1052 aspect
TARGET_SIZE = (256, 512)  # Cityscapes' 2:1
DEFAULT_SEED = 0
DEFAULT_NUM_SOURCE = 500
DEFAULT_NUM_TARGET_TRAIN = 300
DEFAULT_NUM_TARGET_VAL = 100
ENV_DIR = "UDA_SYNTHETIC_DIR"
MARKER_NAME = ".complete.json"      # written last: its presence means the folder is whole
OWNER_NAME = ".synthetic.json"      # written first and kept: the folder is ours even without a marker
LOCK_NAME = ".generate.lock"
SOURCE_VAL_FRACTION = 0.1  # GTA5 val.txt = the last 10 % of the images
TRAIN_CITIES = ("aachen", "bochum", "bremen")
VAL_CITIES = ("frankfurt", "lindau", "munster")
CITYSCAPES_FRAME = 19  # gtFine frames are the 20th of each snippet: <city>_<seq>_000019
PNG_COMPRESS_LEVEL = 1  # speed over size: the files are regenerated, not shipped

# ----------------------------------------------------------------------------------------------
# Label ids (Cityscapes ids, as written into the label PNGs)
# ----------------------------------------------------------------------------------------------
_ID = {label.name: label.id for label in LABELS}
ROAD, SIDEWALK, BUILDING, WALL, FENCE = (_ID[n] for n in ("road", "sidewalk", "building", "wall", "fence"))
POLE, LIGHT, SIGN, VEGETATION, TERRAIN = (_ID[n] for n in ("pole", "traffic light", "traffic sign", "vegetation",
                                                           "terrain"))
SKY, PERSON, RIDER, CAR, TRUCK, BUS = (_ID[n] for n in ("sky", "person", "rider", "car", "truck", "bus"))
TRAIN, MOTORCYCLE, BICYCLE = (_ID[n] for n in ("train", "motorcycle", "bicycle"))
EGO_VEHICLE = _ID["ego vehicle"]  # the target camera's own bonnet; ignored (trainId 255) like in Cityscapes
