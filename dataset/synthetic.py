"""The built-in, offline synthetic domain-shift benchmark: GTA5-like source, Cityscapes-like target.

Both domains are procedural street scenes drawn from one scene grammar (a straight road to a
vanishing point, sidewalks, facades, trees, walls and fences, poles with lights and signs,
vehicles, people and riders), so the label semantics are identical. What differs is what differs
between a game and a car-mounted camera:

* appearance: class colours around a domain mean (saturated and clean in the source; greyer,
  tinted and lower-contrast in the target), texture contrast, hard sunny shadows vs overcast;
* the camera: sensor noise, optical blur, vignetting and JPEG compression in the target only;
  a lower camera with a longer focal length and the ego-vehicle hood (id 1, ignored) at the
  bottom, a narrower horizon and vanishing-point distribution;
* layout statistics: lane count and width, sidewalk widths, building heights, object counts
  and the depth (hence size) distribution of objects.

A label map is drawn first (crisp boolean masks on coordinate grids, nearer things painted over
farther ones) together with an instance map saying which surface covers each pixel and where on
it (surface coordinates in metres); the image is then rendered from those maps with per-surface
colours and procedural textures (windows on facades, tiles on sidewalks, lane markings, leafy
noise, lattices on fences, wheels and glass on vehicles). Labels are written as Cityscapes ids.

Output (``generate_benchmark``), deterministic for a seed whatever the number of workers:
``DIR/GTA5/{images,labels}/00001.png`` + ``train.txt``/``val.txt`` (real GTA5 layout) and
``DIR/Cityscapes/{leftImg8bit,gtFine}/<split>/<city>/...`` (official Cityscapes layout), then
``DIR/.complete.json`` last. Run ``python -m dataset.synthetic --help``.
"""
import argparse
import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from dataset.labels import ID_TO_TRAINID, LABELS, LUT_SIZE, NUM_CLASSES, TRAIN_LABELS

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

# Shadows show on these only: a shadow quad must not darken an object that stands in it or behind it.
_GROUND_LUT = np.zeros(LUT_SIZE, bool)
_GROUND_LUT[[ROAD, SIDEWALK, TERRAIN]] = True

# ----------------------------------------------------------------------------------------------
# Materials: how a surface is textured by the renderer
# ----------------------------------------------------------------------------------------------
MATERIALS = ("flat", "sky", "asphalt", "tiles", "facade", "far", "leaves", "grass", "blocks", "fence", "metal",
             "body", "glass", "hood")
MAT = {name: index for index, name in enumerate(MATERIALS)}
# Amplitude of per-pixel grain (fraction of the colour) per material, before the domain's texture contrast.
_GRAIN = np.array([0.03, 0.0, 0.06, 0.05, 0.04, 0.02, 0.06, 0.08, 0.05, 0.03, 0.03, 0.015, 0.02, 0.01], np.float32)
assert len(_GRAIN) == len(MATERIALS)

# ----------------------------------------------------------------------------------------------
# Domains
# ----------------------------------------------------------------------------------------------
# Colour means (0..255). Lists are alternatives drawn per surface (facades, cars, clothes ...).
_SOURCE_PALETTE = {
    "sky_top": (60, 120, 220), "sky_horizon": (165, 205, 245), "cloud": (250, 250, 255),
    "road": (78, 78, 90), "marking": (245, 245, 240), "marking_yellow": (245, 200, 40),
    "sidewalk": (190, 172, 152), "curb": (218, 212, 204), "terrain": (150, 178, 78), "dry_grass": (185, 168, 95),
    "building": [(205, 170, 120), (178, 100, 75), (225, 212, 175), (110, 150, 150), (220, 220, 214), (150, 150, 162),
                 (190, 130, 140)],
    "glass": (45, 70, 105), "vegetation": (70, 140, 45), "bark": (100, 72, 45),
    "wall": [(210, 192, 160), (180, 175, 170), (200, 150, 110)],
    "fence": [(150, 105, 65), (60, 140, 85), (90, 90, 100)],
    "pole": (85, 100, 92), "housing": (35, 38, 30), "sign_back": (150, 155, 160),
    "sign": [(225, 30, 30), (25, 80, 215), (250, 210, 20), (245, 245, 245), (30, 160, 60)],
    "car": [(240, 240, 240), (25, 25, 30), (165, 170, 178), (190, 20, 20), (20, 60, 170), (30, 110, 50),
            (240, 180, 20), (120, 40, 140)],
    "truck": [(240, 240, 240), (200, 40, 30), (30, 70, 160), (245, 200, 30)],
    "bus": [(245, 195, 30), (210, 40, 40), (40, 120, 210)],
    "train": [(215, 30, 35), (240, 240, 240), (40, 100, 200)],
    "two_wheeler": [(200, 30, 30), (20, 20, 25), (30, 90, 200), (240, 200, 30), (230, 230, 230)],
    "tire": (22, 22, 24), "rear_light": (230, 20, 20), "front_light": (250, 250, 220), "plate": (240, 240, 235),
    "skin": [(240, 195, 160), (205, 150, 110), (140, 95, 65), (95, 62, 42)],
    "hair": [(35, 22, 15), (100, 65, 30), (215, 180, 100), (70, 70, 70)],
    "cloth": [(220, 30, 40), (30, 60, 200), (250, 210, 30), (30, 160, 70), (240, 240, 240), (30, 30, 35),
              (240, 120, 20), (150, 40, 160)],
    "lamp_red": (255, 40, 30), "lamp_amber": (255, 175, 0), "lamp_green": (40, 255, 130), "lamp_off": (60, 60, 55),
    "hood": (30, 32, 36),
}
_TARGET_PALETTE = {  # each class's hue differs from the game's; greyer and less saturated overall
    "sky_top": (105, 145, 208), "sky_horizon": (190, 212, 234), "cloud": (243, 243, 246),
    "road": (98, 95, 104), "marking": (225, 225, 219), "marking_yellow": (222, 192, 80),
    "sidewalk": (171, 159, 151), "curb": (195, 191, 186), "terrain": (131, 152, 78), "dry_grass": (162, 149, 95),
    "building": [(178, 151, 117), (155, 103, 82), (198, 186, 160), (111, 132, 135), (203, 199, 189), (127, 122, 125),
                 (176, 138, 128)],
    "glass": (50, 66, 86), "vegetation": (74, 121, 48), "bark": (90, 72, 52),
    "wall": [(174, 162, 141), (150, 146, 143), (175, 144, 115)],
    "fence": [(134, 112, 88), (74, 120, 86), (110, 100, 95)],
    "pole": (94, 102, 100), "housing": (40, 43, 38), "sign_back": (140, 144, 147),
    "sign": [(208, 38, 38), (32, 80, 188), (232, 200, 40), (235, 235, 234), (40, 140, 65)],
    "car": [(232, 232, 230), (28, 28, 31), (158, 161, 167), (95, 98, 104), (150, 40, 40), (35, 60, 125),
            (205, 190, 160), (50, 85, 60)],
    "truck": [(234, 234, 232), (180, 50, 40), (45, 75, 140), (228, 200, 100)],
    "bus": [(230, 215, 150), (225, 190, 60), (195, 65, 50)],
    "train": [(225, 200, 70), (232, 232, 228), (195, 55, 50)],
    "two_wheeler": [(30, 30, 32), (160, 40, 40), (45, 70, 140), (170, 170, 170), (220, 220, 215)],
    "tire": (25, 25, 27), "rear_light": (200, 30, 28), "front_light": (238, 238, 212), "plate": (228, 228, 222),
    "skin": [(225, 185, 155), (192, 145, 110), (135, 95, 68), (92, 64, 46)],
    "hair": [(38, 26, 20), (95, 68, 38), (192, 165, 105), (75, 75, 75)],
    "cloth": [(130, 35, 42), (45, 62, 145), (185, 165, 78), (100, 162, 110), (190, 145, 145), (50, 58, 50),
              (220, 160, 110), (125, 60, 110)],
    "lamp_red": (245, 60, 45), "lamp_amber": (245, 178, 30), "lamp_green": (70, 242, 150), "lamp_off": (60, 61, 58),
    "hood": (34, 36, 40),
}


@dataclass(frozen=True)
class DomainStyle:
    """Everything that differs between the two domains; the scene grammar itself is shared."""

    name: str
    size: tuple                # (height, width)
    palette: dict
    # camera
    horizon: tuple             # horizon row as a fraction of the height (uniform range)
    vp_x: tuple                # vanishing point column as a fraction of the width
    focal: tuple               # focal length as a fraction of the width
    cam_height: tuple          # metres above the road
    hood: tuple                # ego-vehicle bonnet height as a fraction of the height; (0, 0) = none
    # layout
    lanes: tuple               # lane counts to choose from
    lane_width: tuple          # metres
    sidewalk_width: tuple
    building_height: tuple
    building_prob: float       # chance that a stretch of facade is a building (else trees or open)
    object_depth: tuple        # metres, log-uniform: where objects stand (sets their size)
    cars_moving: float         # Poisson means
    cars_parked: float         # per side
    persons: float
    # appearance
    colour_jitter: float       # per-image, per-class log-colour jitter (per channel)
    brightness_jitter: float   # per-image, per-class log-brightness jitter
    instance_jitter: float     # extra per-surface jitter
    texture_contrast: float
    sunny_prob: float
    shadow: tuple              # shade factor of shadows (lower = darker)
    haze: float                # how much far buildings fade into the horizon colour
    saturation: tuple
    contrast: tuple
    gamma: tuple
    brightness: tuple
    colour_cast: tuple         # mean per-channel gain
    cast_jitter: float
    vignette: tuple
    blur_radius: tuple         # Gaussian blur sigma in pixels (at most ~1); (0, 0) = sharp
    noise_sigma: tuple         # sensor noise, 0..255 units
    jpeg_quality: tuple        # (0, 0) = no compression


SOURCE_STYLE = DomainStyle(
    name="source", size=SOURCE_SIZE, palette=_SOURCE_PALETTE,
    horizon=(0.33, 0.50), vp_x=(0.36, 0.64), focal=(0.85, 1.05), cam_height=(1.6, 2.4), hood=(0.0, 0.0),
    lanes=(2, 3, 4), lane_width=(3.3, 3.8), sidewalk_width=(2.5, 5.0), building_height=(8.0, 32.0),
    building_prob=0.6, object_depth=(7.0, 90.0), cars_moving=2.5, cars_parked=1.5, persons=4.0,
    colour_jitter=0.12, brightness_jitter=0.18, instance_jitter=0.06, texture_contrast=1.0,
    sunny_prob=0.75, shadow=(0.45, 0.6), haze=0.2,
    saturation=(0.75, 1.25), contrast=(1.0, 1.2), gamma=(0.9, 1.05), brightness=(0.95, 1.15),
    colour_cast=(1.0, 1.0, 1.0), cast_jitter=0.03, vignette=(0.0, 0.0), blur_radius=(0.0, 0.0),
    noise_sigma=(0.0, 0.8), jpeg_quality=(0, 0),
)
TARGET_STYLE = DomainStyle(
    name="target", size=TARGET_SIZE, palette=_TARGET_PALETTE,
    horizon=(0.40, 0.47), vp_x=(0.45, 0.55), focal=(1.0, 1.15), cam_height=(1.15, 1.4), hood=(0.08, 0.12),
    lanes=(2, 3), lane_width=(3.0, 3.4), sidewalk_width=(2.0, 4.5), building_height=(10.0, 24.0),
    building_prob=0.7, object_depth=(6.0, 70.0), cars_moving=1.5, cars_parked=2.0, persons=3.5,
    colour_jitter=0.12, brightness_jitter=0.18, instance_jitter=0.06, texture_contrast=0.75,
    sunny_prob=0.3, shadow=(0.72, 0.85), haze=0.4,
    saturation=(0.75, 1.0), contrast=(0.85, 1.0), gamma=(1.0, 1.2), brightness=(0.85, 1.1),
    colour_cast=(0.97, 1.0, 0.93), cast_jitter=0.04, vignette=(0.15, 0.3), blur_radius=(0.5, 0.9),
    noise_sigma=(1.5, 3.5), jpeg_quality=(60, 85),
)
STYLES = {"source": SOURCE_STYLE, "target": TARGET_STYLE}

# Rare things are scheduled per split instead of drawn independently per image: each appears in
# exactly max(1, round(rate * N)) images of a split, so even a small val split contains every class.
RARE_EVENTS = {"truck": 0.3, "bus": 0.2, "train": 0.1, "rider_bicycle": 0.3, "rider_motorcycle": 0.18,
               "parked_bicycle": 0.25, "parked_motorcycle": 0.1, "wall": 0.4, "fence": 0.45}
EVENT_NAMES = tuple(RARE_EVENTS)
_DOMAIN_CODE = {"source": 0, "target": 1}
_SPLIT_CODE = {"all": 0, "train": 1, "val": 2}
_SCHEDULE_KEY = 1_000_003  # spawn-key slot of the per-split schedule, distinct from any image index

# Vehicle sizes in metres: (width, height, length) ranges.
_VEHICLE_DIMS = {
    "car": ((1.7, 1.95), (1.4, 1.6), (3.9, 4.8)),
    "truck": ((2.3, 2.55), (3.0, 3.8), (6.0, 9.0)),
    "bus": ((2.5, 2.55), (3.0, 3.3), (11.0, 13.0)),
    "train": ((2.6, 2.7), (3.4, 3.8), (25.0, 40.0)),
}
_VEHICLE_LABEL = {"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}
MIN_PX = 1.0  # thin things (poles, frames, lines) stay at least a pixel wide, as in real annotations
CURB_WIDTH = 0.15
FAR_DEPTH = (150.0, 300.0)  # where the facades end and the far skyline takes over

# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """A level pinhole camera above a flat road: x right, y up, z forward, all in metres."""

    height_px: int
    width_px: int
    horizon: float     # image row of the horizon
    vp_x: float        # image column of the vanishing point
    focal: float       # pixels
    cam_height: float  # metres

    def col(self, x, z):
        return self.vp_x + self.focal * x / z

    def row(self, y, z):
        return self.horizon + self.focal * (self.cam_height - y) / z


class Frame(namedtuple("Frame", ["cx", "gy", "s"])):
    """A plane facing the camera at one depth: local (u right, v up) metres -> pixels."""

    def pt(self, u, v):
        return self.cx + u * self.s, self.gy - v * self.s

    def pts(self, uv):
        uv = np.asarray(uv, np.float64)
        return np.column_stack([self.cx + uv[:, 0] * self.s, self.gy - uv[:, 1] * self.s])


Region = namedtuple("Region", ["slices", "mask", "ys", "xs"])  # ys/xs: pixel-centre coordinates (h,1)/(1,w)


def _window(shape, x0, y0, x1, y1):
    """Pixel-centre grid of the clipped bounding box, or None if it is empty."""
    height, width = shape
    c0, c1 = max(0, int(np.floor(x0))), min(width, int(np.ceil(x1)))
    r0, r1 = max(0, int(np.floor(y0))), min(height, int(np.ceil(y1)))
    if c0 >= c1 or r0 >= r1:
        return None
    ys = (np.arange(r0, r1, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(c0, c1, dtype=np.float32) + 0.5)[None, :]
    return (slice(r0, r1), slice(c0, c1)), ys, xs


def rect_region(shape, x0, y0, x1, y1):
    win = _window(shape, x0, y0, x1, y1)
    if win is None:
        return None
    sl, ys, xs = win
    return Region(sl, (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1), ys, xs)


def ellipse_region(shape, cx, cy, rx, ry):
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    win = _window(shape, cx - rx, cy - ry, cx + rx, cy + ry)
    if win is None:
        return None
    sl, ys, xs = win
    return Region(sl, ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0, ys, xs)


def ring_region(shape, cx, cy, rx, ry, thickness):
    outer = ellipse_region(shape, cx, cy, rx, ry)
    if outer is None:
        return None
    irx, iry = rx - thickness, ry - thickness
    if irx <= 0.5 or iry <= 0.5:
        return outer
    inner = ((outer.xs - cx) / irx) ** 2 + ((outer.ys - cy) / iry) ** 2 < 1.0
    return outer._replace(mask=outer.mask & ~inner)


def polygon_region(shape, points):
    """Convex polygon fill by half-plane tests (points: (n, 2) x, y in order, either orientation)."""
    points = [(float(x), float(y)) for x, y in points]
    px, py = [p[0] for p in points], [p[1] for p in points]
    win = _window(shape, min(px), min(py), max(px), max(py))
    if win is None:
        return None
    sl, ys, xs = win
    edges = list(zip(points, points[1:] + points[:1]))
    orient = 1.0 if sum(ax * by - bx * ay for (ax, ay), (bx, by) in edges) >= 0 else -1.0
    mask = None
    for (ax, ay), (bx, by) in edges:  # a handful of edges, each a whole-window test
        inside = (orient * (bx - ax)) * (ys - ay) >= (orient * (by - ay)) * (xs - ax)
        mask = inside if mask is None else mask & inside
    return Region(sl, mask, ys, xs)


def stroke_region(shape, p0, p1, width):
    """A straight stroke of ``width`` pixels (at least MIN_PX) from p0 to p1."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    length = np.hypot(dx, dy)
    half = max(width, MIN_PX) / 2
    if length < 1e-6:
        return ellipse_region(shape, x0, y0, half, half)
    nx, ny = -dy / length * half, dx / length * half
    return polygon_region(shape, [(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)])


def _thin(x0, x1):
    """Widen [x0, x1) around its centre to at least MIN_PX."""
    if x1 - x0 >= MIN_PX:
        return x0, x1
    centre = (x0 + x1) / 2
    return centre - MIN_PX / 2, centre + MIN_PX / 2


# ----------------------------------------------------------------------------------------------
# Canvas: label map + surfaces
# ----------------------------------------------------------------------------------------------
class Canvas:
    """The label map and, per pixel, the surface covering it and where on it (u, v metres)."""

    def __init__(self, shape):
        self.shape = shape
        self.label = np.full(shape, SKY, np.uint8)
        self.inst = np.zeros(shape, np.int32)
        self.u = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        # Shadows are collected here and applied at render time to pixels that end up showing the
        # ground, so a shadow never darkens an object and painting needs no per-pixel bookkeeping.
        self.shadow = np.ones(shape, np.float32)
        self.materials, self.colours, self.params = [], [], []

    def surface(self, material, rgb, param=0.0):
        self.materials.append(MAT[material])
        self.colours.append(rgb)
        self.params.append(param)
        return len(self.materials) - 1

    def paint(self, region, label, inst, u=0.0, v=0.0, frame=None):
        """Paint a region (nearer than everything painted so far). ``frame`` gives local u, v metres."""
        if region is None:
            return
        sl, mask = region.slices, region.mask
        targets = [(self.label, label), (self.inst, inst)]
        if np.ndim(inst) or self.materials[inst] != MAT["flat"]:  # flat surfaces need no surface coordinates
            if frame is not None:
                u = (region.xs - frame.cx) / frame.s
                v = (frame.gy - region.ys) / frame.s
            targets += [(self.u, u), (self.v, v)]
        for target, value in targets:
            view = target[sl]
            view[mask] = np.broadcast_to(value, mask.shape)[mask] if np.ndim(value) else value

    def cast_shadow(self, region, factor):
        if region is not None:
            self.shadow[region.slices][region.mask] *= factor


# ----------------------------------------------------------------------------------------------
# Randomness helpers
# ----------------------------------------------------------------------------------------------
def _log_uniform(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _smooth_noise(rng, shape, cell):
    """Zero-mean noise with features about ``cell`` pixels wide (bicubic upsampling of a coarse grid)."""
    height, width = shape
    grid_h, grid_w = height // cell + 3, width // cell + 3
    grid = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
    big = Image.fromarray(grid).resize((grid_w * cell, grid_h * cell), Image.Resampling.BICUBIC)
    return np.asarray(big)[cell:cell + height, cell:cell + width]


def _hash01(i, j):
    """Deterministic pseudo-random value in [0, 1) per integer cell (i, j): varies tiles and windows."""
    return np.modf(np.abs(np.sin(i * 12.9898 + j * 78.233) * 43758.5453))[0]


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def image_palette(rng, style):
    """Per-image class colours: the domain's mean times a random per-class colour and brightness gain."""
    palette = {}
    for key, value in style.palette.items():
        choices = np.asarray(value if isinstance(value, list) else [value], np.float64)
        gain = np.exp(rng.normal(0.0, style.colour_jitter, (len(choices), 3))
                      + rng.normal(0.0, style.brightness_jitter, (len(choices), 1)))
        palette[key] = np.clip(choices * gain, 0, 255)
    return palette


# ----------------------------------------------------------------------------------------------
# Scene composition: one street scene's label map and surfaces
# ----------------------------------------------------------------------------------------------
@dataclass
class Side:
    """One side of the street, as unsigned distances (metres) from the camera; sign -1 left, +1 right."""

    sign: int
    road: float
    curb: float
    strip: float      # end of the optional terrain strip between curb and sidewalk
    sidewalk: float
    building: float   # the facade line
    outer_label: int  # what covers the ground between sidewalk and facade (and behind it)


class Scene:
    """Draws one street scene into a Canvas: background layers first, then objects far to near."""

    def __init__(self, rng, style, flags):
        self.rng, self.style, self.flags = rng, style, flags
        self.cam = _sample_camera(rng, style)
        self.canvas = Canvas(style.size)
        self.palette = image_palette(rng, style)
        self.sunny = rng.random() < style.sunny_prob
        # Sun: hard cast shadows; overcast: only faint contact shadows under objects.
        self.shadow = rng.uniform(*style.shadow) if self.sunny else 1.0 - 0.4 * (1.0 - rng.uniform(*style.shadow))
        self.sun_side = int(rng.choice((-1, 1)))
        self.objects = []  # (depth, draw callable), drawn far to near
        sky = self.canvas.surface("sky", self.palette["sky_top"][0])
        assert sky == 0  # the canvas starts as sky everywhere, i.e. surface 0

    # -- colours and surfaces ------------------------------------------------------------------
    def colour(self, key):
        choices = self.palette[key]
        rgb = choices[self.rng.integers(len(choices))]
        return np.clip(rgb * np.exp(self.rng.normal(0.0, self.style.instance_jitter, 3)), 0, 255)

    def surface(self, material, key, param=None, gain=1.0):
        param = self.rng.random() if param is None else param
        return self.canvas.surface(material, np.clip(self.colour(key) * gain, 0, 255), param)

    # -- drawing in a facing plane ----------------------------------------------------------------
    def frame(self, x, z):
        cam = self.cam
        return Frame(cam.col(x, z), cam.row(0.0, z), cam.focal / z)

    def rect(self, fr, u0, v0, u1, v1, label, inst):
        (u0, u1), (v0, v1) = sorted((u0, u1)), sorted((v0, v1))  # mirrored parts come with swapped corners
        x0, x1 = _thin(fr.cx + u0 * fr.s, fr.cx + u1 * fr.s)
        y0, y1 = fr.gy - v1 * fr.s, fr.gy - v0 * fr.s
        self.canvas.paint(rect_region(self.canvas.shape, x0, y0, x1, y1), label, inst, frame=fr)

    def ellipse(self, fr, u, v, ru, rv, label, inst):
        cx, cy = fr.pt(u, v)
        self.canvas.paint(ellipse_region(self.canvas.shape, cx, cy, ru * fr.s, rv * fr.s), label, inst, frame=fr)

    def poly(self, fr, uv, label, inst):
        self.canvas.paint(polygon_region(self.canvas.shape, fr.pts(uv)), label, inst, frame=fr)

    def stroke(self, fr, a, b, width, label, inst):
        self.canvas.paint(stroke_region(self.canvas.shape, fr.pt(*a), fr.pt(*b), width * fr.s), label, inst,
                          frame=fr)

    # -- drawing in a plane along the road (x = const) -----------------------------------------------
    def side_poly(self, x_plane, zv, label, inst):
        """Convex polygon given as (depth, height) corners in the vertical plane x = x_plane."""
        cam = self.cam
        zv = np.asarray(zv, np.float64)
        points = np.column_stack([cam.col(x_plane, zv[:, 0]), cam.row(zv[:, 1], zv[:, 0])])
        region = polygon_region(self.canvas.shape, points)
        if region is None:
            return
        depth = cam.focal * x_plane / np.where(np.abs(region.xs - cam.vp_x) < 1e-3, 1e-3, region.xs - cam.vp_x)
        height = cam.cam_height - (region.ys - cam.horizon) * depth / cam.focal
        self.canvas.paint(region, label, inst, u=depth, v=height)

    def side_wheel(self, x_plane, z, radius, inst_tire, inst_hub, label):
        """A wheel in a plane along the road: a circle foreshortened into an ellipse."""
        cam = self.cam
        cx, cy = cam.col(x_plane, z), cam.row(radius, z)
        ry = radius * cam.focal / z
        rx = radius * cam.focal * abs(x_plane) / z ** 2
        self.canvas.paint(ellipse_region(self.canvas.shape, cx, cy, rx, ry), label, inst_tire, v=radius)
        self.canvas.paint(ellipse_region(self.canvas.shape, cx, cy, rx * 0.5, ry * 0.5), label, inst_hub, v=radius)

    def ground_shadow(self, x0, x1, z0, z1):
        """Shadow of an object's footprint [x0, x1] x [z0, z1] on the road plane."""
        if self.shadow >= 1.0:
            return
        cam = self.cam
        offset = 0.5 * self.sun_side * (1.0 if self.sunny else 0.3)
        corners = [(x0, z0), (x1, z0), (x1 + offset, z1), (x0 + offset, z1)]
        points = [(cam.col(x, z), cam.row(0.0, z)) for x, z in corners]
        self.canvas.cast_shadow(polygon_region(self.canvas.shape, points), self.shadow)

    # -- the whole scene ------------------------------------------------------------------------------
    def compose(self):
        self.left, self.right = self._layout()
        self._skyline()
        self._ground()
        for side in (self.left, self.right):
            self._facade(side)
        self._walls_and_fences()
        self._place_objects()
        for _, draw in sorted(self.objects, key=lambda item: -item[0]):
            draw()
        if self.style.hood[1] > 0:
            self._hood()
        return self.canvas

    def _layout(self):
        rng, st = self.rng, self.style
        lanes = int(rng.choice(st.lanes))
        self.lane_width = rng.uniform(*st.lane_width)
        cam_lane = int(rng.integers(lanes))
        left = (cam_lane + 0.5) * self.lane_width + rng.normal(0.0, 0.15 * self.lane_width)
        self.road_left, self.road_right = -left, lanes * self.lane_width - left
        self.lanes = lanes
        return self._side(-1, left), self._side(1, self.road_right)

    def _side(self, sign, road_edge):
        rng, st = self.rng, self.style
        curb = road_edge + CURB_WIDTH
        strip = curb + (rng.uniform(0.8, 2.2) if rng.random() < 0.3 else 0.0)
        sidewalk = strip + rng.uniform(*st.sidewalk_width)
        building = sidewalk + (rng.uniform(0.5, 8.0) if rng.random() < 0.5 else 0.0)
        outer = TERRAIN if rng.random() < 0.5 else SIDEWALK
        return Side(sign, road_edge, curb, strip, sidewalk, building, outer)

    # -- background layers -------------------------------------------------------------------------
    def _skyline(self):
        """Far buildings and tree lines just above the horizon, where the street's facades end."""
        rng, cv, cam = self.rng, self.canvas, self.cam
        height, width = cv.shape
        widths, heights, labels, insts = [], [], [], []
        while sum(widths) < width:
            widths.append(int(rng.integers(6, 40)))
            is_tree = rng.random() < 0.3
            heights.append(rng.uniform(2, 0.09 * height) * (0.6 if is_tree else 1.0))
            labels.append(VEGETATION if is_tree else BUILDING)
            key = "vegetation" if is_tree else "building"
            insts.append(cv.surface("far", np.clip(self.colour(key), 0, 255), float(is_tree)))
        widths = np.asarray(widths)
        top = cam.horizon - np.repeat(heights, widths)[:width]
        jagged = np.repeat(np.asarray(labels) == VEGETATION, widths)[:width]
        top = top - jagged * np.abs(rng.normal(0.0, 1.5, width))  # ragged tree tops
        region = rect_region(cv.shape, 0, top.min(), width, cam.horizon + 1)
        if region is None:
            return
        mask = region.ys >= top[None, :]
        mask &= region.mask
        cols = np.arange(width)
        cv.paint(region._replace(mask=mask), np.repeat(labels, widths)[:width][None, :],
                 np.repeat(insts, widths)[:width][None, :], u=cols[None, :].astype(np.float32),
                 v=region.ys)

    def _ground(self):
        """Road, curbs, terrain strips and sidewalks, classified by lateral position on the road plane."""
        cv, cam = self.canvas, self.cam
        height, width = cv.shape
        r0 = int(np.ceil(cam.horizon))
        region = rect_region(cv.shape, 0, r0, width, height)
        if region is None:
            return
        depth = cam.focal * cam.cam_height / (region.ys - cam.horizon)  # (h, 1)
        lateral = (region.xs - cam.vp_x) * depth / cam.focal           # (h, w)
        left, right = self.left, self.right
        bounds = np.array([-left.sidewalk, -left.strip, -left.curb, -left.road,
                           right.road, right.curb, right.strip, right.sidewalk])
        asphalt = self.surface("asphalt", "road")
        curb = self.surface("flat", "curb")
        tiles = [self.surface("tiles", "sidewalk"), self.surface("tiles", "sidewalk")]
        grass = self.surface("grass", "terrain")
        outer = [tiles[i] if side.outer_label == SIDEWALK else grass for i, side in enumerate((left, right))]
        labels = np.array([left.outer_label, SIDEWALK, TERRAIN, SIDEWALK, ROAD, SIDEWALK, TERRAIN, SIDEWALK,
                           right.outer_label], np.uint8)
        insts = np.array([outer[0], tiles[0], grass, curb, asphalt, curb, grass, tiles[1], outer[1]])
        band = np.searchsorted(bounds, lateral)
        cv.paint(region, labels[band], insts[band], u=lateral, v=np.broadcast_to(depth, lateral.shape))
        self._markings(region, lateral, depth)
        self._building_shadow(region, lateral)

    def _markings(self, region, lateral, depth):
        """Lane lines (dashed between lanes, solid at the edges) and sometimes a zebra crossing."""
        rng, cv = self.rng, self.canvas
        on_road = (lateral > self.road_left) & (lateral < self.road_right)
        half = rng.uniform(0.06, 0.09)
        paint = np.zeros(lateral.shape, bool)
        for k in range(1, self.lanes):  # a handful of lines: each is one whole-region test
            x = self.road_left + k * self.lane_width
            dashed = np.mod(depth + rng.uniform(0, 9), 9.0) < 3.0
            paint |= (np.abs(lateral - x) < half) & dashed
        for x in (self.road_left + 0.3, self.road_right - 0.3):
            paint |= np.abs(lateral - x) < half
        if rng.random() < 0.25:
            z0 = _log_uniform(rng, 8.0, 40.0)
            paint |= (depth > z0) & (depth < z0 + 3.5) & (np.mod(lateral, 1.0) < 0.5)
        key = "marking_yellow" if (self.style.name == "source" and rng.random() < 0.4) else "marking"
        marking = self.surface("flat", key)
        cv.paint(region._replace(mask=region.mask & on_road & paint), ROAD, marking,
                 u=lateral, v=np.broadcast_to(depth, lateral.shape))

    def _building_shadow(self, region, lateral):
        """On sunny images the buildings of one side shade part of the street."""
        if not self.sunny:
            return
        side = self.right if self.sun_side > 0 else self.left
        edge = side.road - self.rng.uniform(-1.0, 4.0)
        shaded = region.mask & (self.sun_side * lateral > edge)
        self.canvas.cast_shadow(region._replace(mask=shaded), self.shadow)

    def _plane_columns(self, x_plane):
        """Columns that see the vertical plane x = x_plane, and the depth each one sees it at."""
        cam = self.cam
        cols = np.arange(self.canvas.shape[1]) + 0.5
        dx = (cols - cam.vp_x) * np.sign(x_plane)
        valid = np.nonzero(dx > 0.5)[0]
        return valid, cam.focal * abs(x_plane) / dx[valid]

    def _paint_plane(self, x_plane, cols, depth, top_height, labels, insts):
        """Paint a vertical plane along the road between the ground and a per-column top height."""
        cam, cv = self.cam, self.canvas
        keep = top_height > 0
        if not keep.any():
            return
        cols, depth, top_height = cols[keep], depth[keep], top_height[keep]
        labels, insts = np.broadcast_to(labels, keep.shape)[keep], np.broadcast_to(insts, keep.shape)[keep]
        top, bottom = cam.row(top_height, depth), cam.row(0.0, depth)
        region = rect_region(cv.shape, cols.min(), top.min(), cols.max() + 1, bottom.max())
        if region is None:
            return
        col_index = np.searchsorted(cols, np.arange(region.slices[1].start, region.slices[1].stop))
        col_index = np.clip(col_index, 0, len(cols) - 1)
        present = cols[col_index] == np.arange(region.slices[1].start, region.slices[1].stop)
        t, b, d = top[col_index][None, :], bottom[col_index][None, :], depth[col_index][None, :]
        mask = region.mask & present[None, :] & (region.ys >= t) & (region.ys < b)
        v = cam.cam_height - (region.ys - cam.horizon) * d / cam.focal
        cv.paint(region._replace(mask=mask), labels[col_index][None, :], insts[col_index][None, :],
                 u=np.broadcast_to(d, mask.shape), v=v)

    def _facade(self, side):
        """Buildings of varying height, stretches of trees and open gaps along one side."""
        rng, st = self.rng, self.style
        segments, z = [], 1.0
        far = rng.uniform(*FAR_DEPTH)
        lit = 1.0 if (not self.sunny or side.sign != self.sun_side) else self.shadow + 0.15  # facade in shade
        while z < far:
            kind = rng.choice(("building", "trees", "open"),
                              p=(st.building_prob, 0.65 * (1 - st.building_prob), 0.35 * (1 - st.building_prob)))
            length = rng.uniform(10, 40) if kind == "building" else rng.uniform(6, 25)
            if kind == "building":
                segments.append((z, rng.uniform(*st.building_height), BUILDING,
                                 self.surface("facade", "building", gain=lit)))
            elif kind == "trees":
                segments.append((z, rng.uniform(4, 12), VEGETATION, self.surface("leaves", "vegetation", gain=lit)))
            else:
                segments.append((z, 0.0, BUILDING, 0))
            z += length
        starts = np.array([seg[0] for seg in segments])
        cols, depth = self._plane_columns(side.sign * side.building)
        index = np.searchsorted(starts, depth, side="right") - 1
        inside = (index >= 0) & (depth < z)
        cols, depth, index = cols[inside], depth[inside], index[inside]
        heights = np.array([seg[1] for seg in segments])[index]
        labels = np.array([seg[2] for seg in segments], np.uint8)[index]
        insts = np.array([seg[3] for seg in segments])[index]
        trees = labels == VEGETATION
        knots = np.arange(0.0, z + 3.0, 1.5)  # tree-top roughness every 1.5 m of street
        heights = heights + trees * np.interp(depth, knots, rng.uniform(-1.5, 1.5, len(knots)))
        self._paint_plane(side.sign * side.building, cols, depth, heights, labels, insts)

    def _walls_and_fences(self):
        """Low walls and fences along the back of the sidewalk (scheduled, so every split has some)."""
        rng = self.rng
        for name, label, material in (("wall", WALL, "blocks"), ("fence", FENCE, "fence")):
            if not self.flags.get(name):
                continue
            for _ in range(int(rng.integers(1, 3))):
                side = self.left if rng.random() < 0.5 else self.right
                z0 = _log_uniform(rng, 10.0, 45.0)
                length = rng.uniform(10.0, 45.0)
                height = rng.uniform(0.9, 2.4)
                x_plane = side.sign * (side.sidewalk - 0.05)
                cols, depth = self._plane_columns(x_plane)
                inside = (depth > z0) & (depth < z0 + length)
                inst = self.surface(material, name)
                self._paint_plane(x_plane, cols[inside], depth[inside], np.full(inside.sum(), height), label, inst)

    # -- objects --------------------------------------------------------------------------------------
    def _add(self, depth, draw, *args):
        self.objects.append((depth, lambda: draw(*args)))

    def _depth(self, lo=None, hi=None):
        near, far = self.style.object_depth
        return _log_uniform(self.rng, lo or near, hi or far)

    def _lane_centre(self, lane):
        return self.road_left + (lane + 0.5) * self.lane_width

    def _place_objects(self):
        rng, st, flags = self.rng, self.style, self.flags
        self._place_traffic(rng.poisson(st.cars_moving), "car")
        for side in (self.left, self.right):
            self._place_parked(side, rng.poisson(st.cars_parked))
            self._place_street_furniture(side)
            self._place_trees(side)
        for kind in ("truck", "bus"):
            if flags.get(kind):
                self._place_traffic(1, kind, near=12.0)  # big vehicles kept off the bonnet: they are rare
        if flags.get("train"):
            self._place_train()
        self._place_people(rng.poisson(st.persons))
        if flags.get("rider_bicycle"):
            self._place_riders("bicycle")
        if flags.get("rider_motorcycle"):
            self._place_riders("motorcycle")
        for kind in ("bicycle", "motorcycle"):
            if flags.get(f"parked_{kind}"):
                self._place_parked_two_wheelers(kind)

    def _place_traffic(self, count, kind, near=0.0):
        """Vehicles in lanes: right-hand traffic, so lanes left of the camera's come towards it."""
        rng = self.rng
        cam_lane = int(np.floor(-self.road_left / self.lane_width))
        for _ in range(count):
            lane = int(rng.integers(self.lanes))
            towards = lane < cam_lane or (lane == cam_lane and self.lanes > 1 and rng.random() < 0.1)
            z = self._depth(lo=max(self.style.object_depth[0], near, 9.0 if lane == cam_lane else 0.0))
            x = self._lane_centre(lane) + rng.normal(0.0, 0.2)
            self._add(z, self._vehicle, kind, x, z, towards)

    def _place_parked(self, side, count):
        z = self._depth(lo=self.style.object_depth[0], hi=25.0)
        for _ in range(count):
            x = side.sign * (side.road - 1.1)
            self._add(z, self._vehicle, "car", x, z, self.rng.random() < 0.3)
            z += self.rng.uniform(5.0, 14.0)

    def _place_train(self):
        rng = self.rng
        if rng.random() < 0.5:  # a tram crossing far ahead, seen side-on
            z = rng.uniform(30.0, 70.0)
            self._add(z, self._crossing_train, z)
        else:  # a tram in a lane, seen from the front or the back
            lane = int(rng.integers(self.lanes))
            z = self._depth(lo=20.0, hi=60.0)
            self._add(z, self._vehicle, "train", self._lane_centre(lane), z, rng.random() < 0.5)

    def _place_street_furniture(self, side):
        """Poles along the curb, carrying signs, traffic lights or street lamps."""
        rng = self.rng
        z = rng.uniform(5.0, 20.0)
        kinds = ("plain", "sign", "sign", "light", "arm_light", "lamp")
        while z < 90.0:
            x = side.sign * (side.curb + rng.uniform(0.3, 0.7))
            self._add(z, self._pole, x, z, rng.choice(kinds), side.sign)
            z += rng.uniform(10.0, 30.0)

    def _place_trees(self, side):
        rng = self.rng
        if rng.random() > 0.65:
            return
        spot = (side.curb + side.strip) / 2 if side.strip > side.curb else side.sidewalk - 0.7
        z = rng.uniform(5.0, 15.0)
        while z < 80.0:
            self._add(z, self._tree, side.sign * spot + rng.normal(0, 0.2), z)
            z += rng.uniform(7.0, 18.0)

    def _place_people(self, count):
        rng = self.rng
        for _ in range(count):
            side = self.left if rng.random() < 0.5 else self.right
            z = self._depth(hi=60.0)
            x = side.sign * rng.uniform(side.strip + 0.3, max(side.strip + 0.4, side.sidewalk - 0.3))
            self._add(z, self._person, x, z, rng.random() < 0.5)
        if rng.random() < 0.2:  # a group crossing the road
            z = self._depth(lo=10.0, hi=40.0)
            for _ in range(int(rng.integers(1, 4))):
                x = rng.uniform(self.road_left, self.road_right)
                zi = z + rng.uniform(0.0, 2.0)
                self._add(zi, self._person, x, zi, True)

    def _place_riders(self, kind):
        rng = self.rng
        for _ in range(int(rng.integers(1, 3))):
            z = self._depth(lo=8.0, hi=45.0)
            if rng.random() < 0.5:  # riding along the road edge: seen from behind, strongly foreshortened
                side = self.left if rng.random() < 0.3 else self.right
                x, profile = side.sign * (side.road - 0.9), rng.uniform(0.25, 0.5)
            else:  # crossing: seen side-on
                x, profile = rng.uniform(self.road_left, self.road_right), rng.uniform(0.8, 1.0)
            self._add(z, self._two_wheeler, kind, x, z, profile, int(rng.choice((-1, 1))), True)

    def _place_parked_two_wheelers(self, kind):
        rng = self.rng
        side = self.left if rng.random() < 0.5 else self.right
        z = self._depth(hi=35.0)
        for _ in range(int(rng.integers(1, 4))):
            x = side.sign * (side.curb + 0.5)
            self._add(z, self._two_wheeler, kind, x, z, rng.uniform(0.6, 1.0), int(rng.choice((-1, 1))), False)
            z += rng.uniform(0.7, 1.2)

    # -- object drawers ------------------------------------------------------------------------------------
    def _vehicle(self, kind, x, z, towards):
        """A box-shaped vehicle: the side facing the camera (if any) and then its rear or front face."""
        rng = self.rng
        (w0, w1), (h0, h1), (l0, l1) = _VEHICLE_DIMS[kind]
        width, height, length = rng.uniform(w0, w1), rng.uniform(h0, h1), rng.uniform(l0, l1)
        label = _VEHICLE_LABEL[kind]
        parts = {
            "body": self.surface("body", kind, param=height),
            "glass": self.surface("glass", "glass"),
            "tire": self.surface("flat", "tire"),
            "hub": self.surface("metal", "pole", param=0.0),
            "light": self.surface("flat", "front_light" if towards else "rear_light"),
            "plate": self.surface("flat", "plate"),
            "dark": self.surface("flat", "housing"),
        }
        self.ground_shadow(x - width / 2 - 0.1, x + width / 2 + 0.1, z, z + length)
        side_x = x - np.sign(x) * width / 2
        if abs(side_x) > 0.3 and np.sign(side_x) == np.sign(x):
            _SIDE_DRAWERS[kind](self, side_x, z, length, height, parts, label, towards)
        _FACE_DRAWERS[kind](self, self.frame(x, z), width, height, parts, label, towards)

    def _car_side(self, x, z, length, height, parts, label, towards):
        belt = 0.55 * height
        self.side_poly(x, [(z, 0.2), (z + length, 0.2), (z + length, belt), (z, belt)], label, parts["body"])
        cabin = [(0.12, belt), (0.3, height), (0.72, height), (0.9, belt)]
        if towards:  # the windscreen end is nearer
            cabin = [(1 - a, b) for a, b in cabin]
        self.side_poly(x, [(z + a * length, b) for a, b in cabin], label, parts["body"])
        glass = [(a * 0.9 + 0.05, b + (0.05 if b == belt else -0.06)) for a, b in cabin]
        self.side_poly(x, [(z + a * length, b) for a, b in glass], label, parts["glass"])
        for zw in (z + 0.8, z + length - 0.8):
            self.side_wheel(x, zw, 0.32, parts["tire"], parts["hub"], label)

    def _car_face(self, fr, width, height, parts, label, towards):
        half, belt = width / 2, 0.55 * height
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.42), 0.0, sign * (half - 0.14), 0.34, label, parts["tire"])
        self.poly(fr, [(-half, 0.22), (half, 0.22), (half, belt - 0.05), (half - 0.08, belt), (-half + 0.08, belt),
                       (-half, belt - 0.05)], label, parts["body"])
        self.poly(fr, [(-0.46 * width, belt), (0.46 * width, belt), (0.36 * width, height), (-0.36 * width, height)],
                  label, parts["body"])
        top = height - (0.06 if towards else 0.1)
        self.poly(fr, [(-0.41 * width, belt + 0.05), (0.41 * width, belt + 0.05), (0.33 * width, top),
                       (-0.33 * width, top)], label, parts["glass"])
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.04), belt - 0.22, sign * (half - 0.32), belt - 0.07, label, parts["light"])
        if towards:
            self.rect(fr, -0.35, belt - 0.28, 0.35, belt - 0.1, label, parts["dark"])
        self.rect(fr, -0.26, 0.3, 0.26, 0.42, label, parts["plate"])

    def _bus_side(self, x, z, length, height, parts, label, towards):
        self.side_poly(x, [(z, 0.3), (z + length, 0.3), (z + length, height), (z, height)], label, parts["body"])
        pane = 1.4
        for k in range(int((length - 1.0) / pane)):
            z0 = z + 0.5 + k * pane
            self.side_poly(x, [(z0, 1.35), (z0 + pane - 0.15, 1.35), (z0 + pane - 0.15, height - 0.35),
                               (z0, height - 0.35)], label, parts["glass"])
        door = z + (length - 2.5 if towards else 2.0)
        self.side_poly(x, [(door, 0.35), (door + 1.1, 0.35), (door + 1.1, height - 0.4), (door, height - 0.4)],
                       label, parts["dark"])
        for zw in (z + 2.5, z + length - 3.0):
            self.side_wheel(x, zw, 0.5, parts["tire"], parts["hub"], label)

    def _bus_face(self, fr, width, height, parts, label, towards):
        half = width / 2
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.5), 0.0, sign * (half - 0.15), 0.45, label, parts["tire"])
        self.rect(fr, -half, 0.3, half, height, label, parts["body"])
        low = 1.1 if towards else height - 1.1
        self.rect(fr, -0.44 * width, low, 0.44 * width, height - 0.3, label, parts["glass"])
        if towards:
            self.rect(fr, -0.35 * width, height - 0.28, 0.35 * width, height - 0.08, label, parts["dark"])
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.08), 0.55, sign * (half - 0.35), 0.8, label, parts["light"])
        self.rect(fr, -0.26, 0.35, 0.26, 0.48, label, parts["plate"])

    def _truck_side(self, x, z, length, height, parts, label, towards):
        cab = 2.2
        box0, box1 = (z + cab + 0.1, z + length) if towards else (z, z + length - cab - 0.1)
        cab0, cab1 = (z, z + cab) if towards else (z + length - cab, z + length)
        self.side_poly(x, [(z, 0.5), (z + length, 0.5), (z + length, 0.95), (z, 0.95)], label, parts["dark"])
        self.side_poly(x, [(box0, 0.9), (box1, 0.9), (box1, height), (box0, height)], label, parts["body"])
        self.side_poly(x, [(cab0, 0.5), (cab1, 0.5), (cab1, 2.8), (cab0, 2.8)], label, parts["body"])
        w0, w1 = (cab0 + 0.2, cab0 + 1.3) if towards else (cab1 - 1.3, cab1 - 0.2)
        self.side_poly(x, [(w0, 1.7), (w1, 1.7), (w1, 2.55), (w0, 2.55)], label, parts["glass"])
        for zw in (z + 1.2, z + length / 2, z + length - 1.2):
            self.side_wheel(x, zw, 0.5, parts["tire"], parts["hub"], label)

    def _truck_face(self, fr, width, height, parts, label, towards):
        half = width / 2
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.5), 0.0, sign * (half - 0.12), 0.5, label, parts["tire"])
        self.rect(fr, -half, 0.45, half, 0.95, label, parts["dark"])
        self.rect(fr, -half, 0.9, half, height, label, parts["body"])
        if towards:
            self.rect(fr, -half, 0.6, half, 2.8, label, parts["body"])
            self.rect(fr, -0.44 * width, 1.65, 0.44 * width, 2.6, label, parts["glass"])
            self.rect(fr, -0.5, 0.75, 0.5, 1.3, label, parts["dark"])
        else:
            self.stroke(fr, (0.0, 1.0), (0.0, height - 0.1), 0.05, label, parts["dark"])
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.05), 0.7 if towards else 0.55, sign * (half - 0.35),
                      0.95 if towards else 0.8, label, parts["light"])

    def _train_side(self, x, z, length, height, parts, label, towards):
        self._train_body_side(lambda pts, inst: self.side_poly(x, pts, label, inst), z, z + length, height, parts)

    def _train_body_side(self, poly, z0, z1, height, parts):
        """A tram's long side in plane coordinates (along, up): skirt, body, windows band and doors."""
        poly([(z0, 0.4), (z1, 0.4), (z1, height), (z0, height)], parts["body"])
        poly([(z0, 0.3), (z1, 0.3), (z1, 0.8), (z0, 0.8)], parts["dark"])
        pane, along = 1.8, z0 + 0.6
        while along + pane < z1 - 0.4:
            if int((along - z0) / pane) % 4 == 2:  # a door instead of every fourth window
                poly([(along, 0.85), (along + pane - 0.3, 0.85), (along + pane - 0.3, height - 0.5),
                      (along, height - 0.5)], parts["dark"])
            else:
                poly([(along, 1.45), (along + pane - 0.25, 1.45), (along + pane - 0.25, height - 0.7),
                      (along, height - 0.7)], parts["glass"])
            along += pane

    def _train_face(self, fr, width, height, parts, label, towards):
        half = width / 2
        self.rect(fr, -half, 0.3, half, 0.8, label, parts["dark"])
        self.poly(fr, [(-half, 0.4), (half, 0.4), (half, height - 0.3), (half - 0.3, height), (-half + 0.3, height),
                       (-half, height - 0.3)], label, parts["body"])
        self.rect(fr, -0.42 * width, 1.6, 0.42 * width, height - 0.45, label, parts["glass"])
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.15), 0.9, sign * (half - 0.45), 1.1, label, parts["light"])
        self.stroke(fr, (-0.4, height), (0.2, height + 0.6), 0.06, label, parts["dark"])  # pantograph
        self.stroke(fr, (0.2, height + 0.6), (-0.5, height + 0.75), 0.06, label, parts["dark"])

    def _crossing_train(self, z):
        """A tram crossing the street far ahead: its long side faces the camera."""
        rng = self.rng
        length, height = rng.uniform(25.0, 40.0), rng.uniform(3.4, 3.8)
        x0 = rng.uniform(-length + 3.0, -3.0)
        # Only the cross street between the two building lines is open; beyond them facades hide it.
        x0, x1 = max(x0, -self.left.building), min(x0 + length, self.right.building)
        length = x1 - x0
        fr = self.frame(0.0, z)
        parts = {"body": self.surface("body", "train", param=height), "glass": self.surface("glass", "glass"),
                 "dark": self.surface("flat", "housing")}
        self.ground_shadow(x0, x0 + length, z, z + 2.6)
        self._train_body_side(lambda pts, inst: self.poly(fr, pts, TRAIN, inst), x0, x0 + length, height, parts)
        for k in range(int(length // 10)):
            u = x0 + 5 + 10 * k
            self.stroke(fr, (u, height), (u + 0.6, height + 0.6), 0.06, TRAIN, parts["dark"])

    def _pole(self, x, z, kind, sign):
        rng = self.rng
        fr = self.frame(x, z)
        width = rng.uniform(0.12, 0.22)
        height = rng.uniform(3.0, 4.0) if kind in ("plain", "sign", "light") else rng.uniform(5.5, 8.0)
        metal = self.surface("metal", "pole", param=width / 2)
        self.ground_shadow(x - width, x + width, z, z + 0.3)
        self.rect(fr, -width / 2, 0.0, width / 2, height, POLE, metal)
        if kind == "sign":
            level = rng.uniform(1.9, 2.5)
            for _ in range(int(rng.integers(1, 3))):
                level += self._sign(fr, level) + 0.08
        elif kind == "light":
            self._traffic_light(fr, 0.0, height + 0.02)
        elif kind in ("arm_light", "lamp"):
            reach = -sign * rng.uniform(2.0, 5.0)
            self.stroke(fr, (0.0, height - 0.3), (reach, height - 0.1), max(width * 0.6, 0.08), POLE, metal)
            if kind == "arm_light":
                self._traffic_light(fr, reach, height - 0.15)
                if rng.random() < 0.5:
                    self._traffic_light(fr, 0.0, 3.2, sideways=-0.25 * sign)
            else:
                self.rect(fr, reach - 0.35, height - 0.3, reach + 0.35, height - 0.05, POLE, metal)

    def _traffic_light(self, fr, u, top, sideways=0.0):
        """A dark box with three lamps, one lit; or its plain back when it faces away."""
        rng = self.rng
        u = u + sideways
        self.rect(fr, u - 0.17, top - 0.95, u + 0.17, top, LIGHT, self.surface("flat", "housing"))
        if rng.random() < 0.25:
            return
        lit = int(rng.integers(3))
        for k, key in enumerate(("lamp_red", "lamp_amber", "lamp_green")):
            inst = self.surface("flat", key if k == lit else "lamp_off")
            self.ellipse(fr, u, top - 0.17 - 0.3 * k, 0.1, 0.1, LIGHT, inst)

    def _sign(self, fr, level):
        """A sign on the pole at height ``level``; returns its height. Front: coloured shape; back: grey."""
        rng = self.rng
        shape = rng.choice(("disc", "triangle", "rect", "diamond"))
        size = rng.uniform(0.55, 0.8)
        facing = rng.random() < 0.75
        outer = self.surface("flat", "sign" if facing else "sign_back")
        inner = self.surface("flat", "sign") if facing else None
        centre = level + size / 2
        r = size / 2
        if shape == "disc":
            self.ellipse(fr, 0.0, centre, r, r, SIGN, outer)
            if inner is not None:
                self.ellipse(fr, 0.0, centre, 0.7 * r, 0.7 * r, SIGN, inner)
        elif shape == "rect":
            self.rect(fr, -r * 1.1, level, r * 1.1, level + size * 0.75, SIGN, outer)
            if inner is not None:
                self.rect(fr, -r * 0.8, level + 0.08, r * 0.8, level + size * 0.75 - 0.08, SIGN, inner)
        elif shape == "triangle":
            self.poly(fr, [(-r * 1.1, level), (r * 1.1, level), (0.0, level + size)], SIGN, outer)
            if inner is not None:
                self.poly(fr, [(-r * 0.7, level + 0.09), (r * 0.7, level + 0.09), (0.0, level + size - 0.16)], SIGN,
                          inner)
        else:
            self.poly(fr, [(0.0, level), (r, centre), (0.0, level + size), (-r, centre)], SIGN, outer)
            if inner is not None:
                self.poly(fr, [(0.0, level + 0.1), (r - 0.1, centre), (0.0, level + size - 0.1), (-r + 0.1, centre)],
                          SIGN, inner)
        return size

    def _tree(self, x, z):
        """A trunk and a crown of overlapping blobs with a ragged, noisy outline (all vegetation)."""
        rng, cv = self.rng, self.canvas
        fr = self.frame(x, z)
        trunk_w, base = rng.uniform(0.25, 0.45), rng.uniform(1.8, 3.2)
        radius = rng.uniform(1.5, 3.3)
        centre = base + radius * 0.9
        bark = self.surface("flat", "bark")
        leaves = self.surface("leaves", "vegetation")
        self.ground_shadow(x - radius, x + radius, z - radius * 0.5, z + radius)
        self.rect(fr, -trunk_w / 2, 0.0, trunk_w / 2, centre, VEGETATION, bark)
        blobs = rng.normal(0.0, 0.45 * radius, (int(rng.integers(3, 7)), 2)) + (0.0, centre)
        radii = radius * rng.uniform(0.55, 0.9, len(blobs))
        x0, y1 = fr.pt(blobs[:, 0].min() - radii.max() * 1.3, blobs[:, 1].min() - radii.max() * 1.3)
        x1, y0 = fr.pt(blobs[:, 0].max() + radii.max() * 1.3, blobs[:, 1].max() + radii.max() * 1.3)
        win = _window(cv.shape, x0, y0, x1, y1)
        if win is None:
            return
        sl, ys, xs = win
        u, v = (xs - fr.cx) / fr.s, (fr.gy - ys) / fr.s
        dist2 = None
        for (bu, bv), r in zip(blobs, radii):  # a few blobs, each a whole-window operation
            d2 = ((u - bu) / r) ** 2 + ((v - bv) / r) ** 2
            dist2 = d2 if dist2 is None else np.minimum(dist2, d2)
        dist = np.sqrt(dist2)
        cell = max(2, int(0.6 * fr.s))  # ragged outline: leaf clusters of about 0.6 m
        wobble = _smooth_noise(rng, dist.shape, cell)
        self.canvas.paint(Region(sl, dist + 0.25 * wobble < 1.0, ys, xs), VEGETATION, leaves, frame=fr)

    def _person(self, x, z, walking, label=PERSON):
        """Legs, torso, arms, head and hair: frontal standing, or side-on mid-stride."""
        rng = self.rng
        fr = self.frame(x, z)
        h = rng.uniform(1.55, 1.95)
        skin, hair = self.surface("flat", "skin"), self.surface("flat", "hair")
        shirt, trousers = self.surface("flat", "cloth"), self.surface("flat", "cloth", gain=0.7)
        self.ground_shadow(x - 0.3, x + 0.3, z, z + 0.4)
        hip, shoulder = 0.5 * h, 0.81 * h
        if walking:
            direction, stride = int(rng.choice((-1, 1))), rng.uniform(0.15, 0.35)
            for sign in (-1, 1):
                self.stroke(fr, (0.0, hip), (direction * sign * stride, 0.05), 0.15, label, trousers)
            self.poly(fr, [(-0.13, hip - 0.03), (0.13, hip - 0.03), (0.14, shoulder), (-0.13, shoulder)], label, shirt)
            self.stroke(fr, (0.0, shoulder - 0.04), (-direction * 0.18, hip - 0.05), 0.09, label, shirt)
        else:
            for sign in (-1, 1):
                self.rect(fr, sign * 0.03, 0.0, sign * 0.17, hip, label, trousers)
            self.poly(fr, [(-0.17, hip - 0.03), (0.17, hip - 0.03), (0.22, shoulder), (-0.22, shoulder)], label, shirt)
            for sign in (-1, 1):
                self.stroke(fr, (sign * 0.22, shoulder - 0.04), (sign * 0.27, hip - 0.04), 0.09, label, shirt)
        self._head(fr, 0.0, 0.93 * h, h / 1.75, skin, hair, label)

    def _head(self, fr, u, v, scale, skin, hair, label):
        self.rect(fr, u - 0.05, v - 0.2 * scale, u + 0.05, v - 0.08 * scale, label, skin)  # neck
        self.ellipse(fr, u, v, 0.095 * scale, 0.12 * scale, label, skin)
        self.ellipse(fr, u, v + 0.05 * scale, 0.1 * scale, 0.08 * scale, label, hair)

    def _two_wheeler(self, kind, x, z, profile, direction, ridden):
        """A bicycle (rings and a thin frame) or a motorcycle (solid wheels, body), optionally ridden.

        ``profile`` foreshortens the side view (1 = side-on, small = seen from behind)."""
        fr = self.frame(x, z)
        k = profile * direction
        label = BICYCLE if kind == "bicycle" else MOTORCYCLE
        frame_inst = self.surface("metal" if kind == "bicycle" else "body", "two_wheeler", param=0.8)
        tire = self.surface("flat", "tire")
        self.ground_shadow(x - 0.8 * profile, x + 0.8 * profile, z, z + 0.5)
        if kind == "bicycle":
            r, hub = 0.34, 0.52
            for sign in (-1, 1):
                self.canvas.paint(self._wheel_ring(fr, sign * hub * k, r, profile), label, tire, frame=fr)
            seat, bracket, head = (-0.12 * k, 0.85), (0.0, 0.32), (0.38 * k, 0.92)
            for a, b in ((((-hub * k), r), seat), (seat, bracket), (bracket, (-hub * k, r)), (seat, head),
                         (bracket, head), (head, (hub * k, r)), (head, (0.33 * k, 1.02))):
                self.stroke(fr, a, b, 0.045, label, frame_inst)
            hips, bar = (-0.12 * k, 0.95), (0.36 * k, 1.0)
        else:
            r, hub = 0.32, 0.7
            rim = self.surface("metal", "pole", param=0.0)
            for sign in (-1, 1):
                self.ellipse(fr, sign * hub * k, r, r * max(profile, 0.15), r, label, tire)
                self.ellipse(fr, sign * hub * k, r, 0.5 * r * max(profile, 0.15), 0.5 * r, label, rim)
            self.poly(fr, [(-0.8 * k, 0.62), (-0.2 * k, 0.92), (0.35 * k, 0.98), (0.62 * k, 0.78), (0.15 * k, 0.3),
                           (-0.35 * k, 0.38)], label, frame_inst)
            self.stroke(fr, (0.55 * k, 0.8), (0.45 * k, 1.12), 0.06, label, frame_inst)
            hips, bar = (-0.2 * k, 0.95), (0.45 * k, 1.1)
        if ridden:
            self._rider(fr, k, hips, bar, kind == "motorcycle")

    def _wheel_ring(self, fr, u, r, profile):
        cx, cy = fr.pt(u, r)
        rx, ry = r * fr.s * max(profile, 0.15), r * fr.s
        return ring_region(self.canvas.shape, cx, cy, rx, ry, max(0.07 * fr.s, MIN_PX))

    def _rider(self, fr, k, hips, bar, helmet):
        """A rider leaning to the handlebar, one leg down to the pedal or footrest."""
        skin, hair = self.surface("flat", "skin"), self.surface("flat", "hair" if not helmet else "two_wheeler")
        jacket, trousers = self.surface("flat", "cloth"), self.surface("flat", "cloth", gain=0.7)
        hu, hv = hips
        shoulder = (hu + 0.25 * k, hv + 0.55)
        knee = (hu + 0.3 * k, hv - 0.3)
        foot = (hu + 0.12 * k, 0.3)
        self.stroke(fr, hips, knee, 0.15, RIDER, trousers)
        self.stroke(fr, knee, foot, 0.13, RIDER, trousers)
        width = 0.36 - 0.14 * abs(k)  # shoulders are wider seen from behind than side-on
        self.stroke(fr, hips, shoulder, width, RIDER, jacket)
        self.stroke(fr, shoulder, bar, 0.09, RIDER, jacket)
        scale = 1.15 if helmet else 1.0
        self._head(fr, shoulder[0] + 0.06 * k, shoulder[1] + 0.2, scale, skin, hair, RIDER)

    def _hood(self):
        """The target camera's own bonnet at the bottom of the picture (id 1: ignored in evaluation)."""
        cv, rng = self.canvas, self.rng
        height, width = cv.shape
        depth = rng.uniform(*self.style.hood) * height
        centre = width * rng.uniform(0.45, 0.55)
        region = rect_region(cv.shape, 0, height - depth - 1, width, height)
        t = (region.xs - centre) / (width / 2)
        edge = height - depth * (0.55 + 0.45 * (1 - t ** 2))
        cv.paint(region._replace(mask=region.ys >= edge), EGO_VEHICLE, self.surface("hood", "hood"),
                 u=np.broadcast_to(edge, region.mask.shape), v=region.ys)


_SIDE_DRAWERS = {"car": Scene._car_side, "bus": Scene._bus_side, "truck": Scene._truck_side,
                 "train": Scene._train_side}
_FACE_DRAWERS = {"car": Scene._car_face, "bus": Scene._bus_face, "truck": Scene._truck_face,
                 "train": Scene._train_face}


def _sample_camera(rng, style):
    height, width = style.size
    return Camera(height, width, horizon=rng.uniform(*style.horizon) * height, vp_x=rng.uniform(*style.vp_x) * width,
                  focal=rng.uniform(*style.focal) * width, cam_height=rng.uniform(*style.cam_height))


# ----------------------------------------------------------------------------------------------
# Rendering: label map + surfaces -> RGB
# ----------------------------------------------------------------------------------------------
@dataclass
class RenderContext:
    """What textures read. Per-pixel arrays are flattened; textures get flat pixel indices."""

    cam: Camera
    style: DomainStyle
    palette: dict
    width: int
    inst: np.ndarray    # surface index per pixel
    u: np.ndarray       # surface coordinates (metres; see each texture)
    v: np.ndarray
    params: np.ndarray  # per surface
    mid: np.ndarray     # ~8 px blotches
    low: np.ndarray     # ~48 px patches
    leaf: np.ndarray    # ~3 px leaf clusters

    @property
    def contrast(self):
        return self.style.texture_contrast

    def colour(self, key):
        return self.palette[key][0] / 255.0


def _tex_sky(img, idx, ctx):
    """Vertical gradient to a paler horizon, with clouds (crisp in the game, a veil in the camera)."""
    rows = (idx // ctx.width).astype(np.float32) + 0.5
    t = (np.clip(rows / max(ctx.cam.horizon, 1.0), 0, 1) ** 0.8)[:, None]
    sky = img[idx] * (1 - t) + ctx.colour("sky_horizon") * t
    sharpness = 2.5 if ctx.style.name == "source" else 1.0
    cover = _smoothstep((ctx.low[idx] + 0.35 * ctx.mid[idx] - 0.2) * sharpness)[:, None]
    img[idx] = sky * (1 - cover) + ctx.colour("cloud") * cover


def _tex_asphalt(img, idx, ctx):
    img[idx] *= (1 + ctx.contrast * (0.08 * ctx.mid[idx] + 0.08 * ctx.low[idx]))[:, None]


def _tex_tiles(img, idx, ctx):
    """Paving slabs on the road plane (u lateral, v depth): joints fade where slabs shrink to a few pixels."""
    lateral, depth = ctx.u[idx], ctx.v[idx]
    size = 0.3 + 0.3 * ctx.params[ctx.inst[idx]]
    px_across = size * ctx.cam.focal / depth
    px_along = px_across * ctx.cam.cam_height / depth  # rows per slab shrink with depth squared
    ju, jv = np.modf(np.abs(lateral) / size)[0], np.modf(depth / size)[0]
    joints = (ju < 0.08) * _smoothstep((px_across - 3) / 5) + (jv < 0.1) * _smoothstep((px_along - 3) / 5)
    slab = _hash01(np.floor(lateral / size), np.floor(depth / size)) - 0.5
    img[idx] *= (1 - ctx.contrast * (0.22 * np.minimum(joints, 1) - 0.1 * slab * _smoothstep(px_along / 6)))[:, None]


def _tex_facade(img, idx, ctx):
    """Windows on a grid of floors and bays (u depth along the street, v height), shop windows below."""
    along, up = ctx.u[idx], ctx.v[idx]
    p = ctx.params[ctx.inst[idx]]
    bay, floor, ground = 2.4 + 1.8 * p, 3.0 + 0.6 * np.modf(p * 7)[0], 3.6
    wu = np.modf(along / bay + p * 5)[0]
    wv = np.modf((up - ground) / floor)[0]
    upper = (up > ground) & (np.abs(wu - 0.5) < 0.2 + 0.1 * p) & (wv > 0.3) & (wv < 0.78)
    shop = (up > 0.5) & (up < ground - 0.5) & (np.abs(wu - 0.5) < 0.4)
    fade = _smoothstep((floor * ctx.cam.focal / along - 4) / 8)  # far away windows blur into the wall
    weight = ((upper | shop) * fade + (1 - fade) * 0.3)[:, None]
    pane = _hash01(np.floor(along / bay + p * 5), np.floor((up - ground) / floor))
    glass = ctx.colour("glass") * (0.7 + 0.7 * pane)[:, None]
    ledge = (np.abs(wv - 0.9) < 0.04) & (up > ground) & (fade > 0.5)
    wall = img[idx] * (1 + ctx.contrast * (0.08 * ctx.mid[idx] + 0.1 * ledge))[:, None]
    img[idx] = wall * (1 - weight) + glass * weight


def _tex_far(img, idx, ctx):
    """Far skyline: aerial perspective blends it toward the horizon colour."""
    haze = ctx.style.haze
    img[idx] = img[idx] * (1 - haze) + ctx.colour("sky_horizon") * haze


def _tex_leaves(img, idx, ctx):
    """Leaf clusters: bright and dark blobs at two scales."""
    blobs = ctx.leaf[idx] + 0.6 * ctx.mid[idx]
    light = 0.55 + 0.8 / (1 + np.exp(-2.5 * blobs))
    img[idx] *= (1 + ctx.contrast * (light - 1))[:, None]


def _tex_grass(img, idx, ctx):
    dry = (_smoothstep(ctx.low[idx] - 0.2) * 0.5)[:, None]
    grass = img[idx] * (1 - dry) + ctx.colour("dry_grass") * dry
    img[idx] = grass * (1 + ctx.contrast * (0.12 * ctx.mid[idx] + 0.12 * ctx.leaf[idx]))[:, None]


def _tex_blocks(img, idx, ctx):
    """Wall blocks in staggered courses (u depth along, v height), joints fading with distance."""
    along, up = ctx.u[idx], ctx.v[idx]
    p = ctx.params[ctx.inst[idx]]
    course, block = 0.35 + 0.2 * p, 0.8 + 0.6 * p
    ju = np.modf(along / block + 0.5 * (np.floor(up / course) % 2))[0]
    jv = np.modf(up / course)[0]
    fade = _smoothstep((course * ctx.cam.focal / along - 3) / 5)
    joints = ((ju < 0.05) | (jv < 0.1)) * fade
    img[idx] *= (1 - ctx.contrast * (0.25 * joints - 0.08 * ctx.mid[idx]))[:, None]


def _tex_fence(img, idx, ctx):
    """Vertical bars with rails; the gaps show a dark background, a grey blur far away."""
    along, up = ctx.u[idx], ctx.v[idx]
    spacing = 0.15 + 0.15 * ctx.params[ctx.inst[idx]]
    bars = (np.modf(along / spacing)[0] < 0.35) | (np.modf(up / 0.9)[0] < 0.1)
    fade = _smoothstep((spacing * ctx.cam.focal / along * 2 - 2) / 4)
    gap = (~bars) * fade
    img[idx] *= (1 - (0.65 * gap + 0.3 * (1 - fade)) * (0.5 + 0.5 * ctx.contrast))[:, None]


def _tex_metal(img, idx, ctx):
    """Cylinder shading across poles (u lateral metres, param = half width; 0 = no shading)."""
    half = ctx.params[ctx.inst[idx]]
    across = np.clip(ctx.u[idx] / np.maximum(half, 1e-3), -1, 1)
    light = 0.75 + 0.4 * np.sqrt(1 - across ** 2) * (half > 0)
    img[idx] *= (1 + ctx.contrast * (light - 1))[:, None]


def _tex_body(img, idx, ctx):
    """Vehicle paint: the upper body catches the sky (v height, param = vehicle height)."""
    up = ctx.v[idx] / np.maximum(ctx.params[ctx.inst[idx]], 0.5)
    img[idx] *= (0.82 + 0.35 * ctx.contrast * _smoothstep(up * 1.6 - 0.3))[:, None]


def _tex_glass(img, idx, ctx):
    reflect = ((0.15 + 0.25 * _smoothstep(ctx.v[idx] - 1.0)) * ctx.contrast)[:, None]
    img[idx] = img[idx] * (1 - reflect) + ctx.colour("sky_horizon") * reflect


def _tex_hood(img, idx, ctx):
    """The bonnet mirrors the street above its edge (u = edge row), darkly."""
    rows, cols = np.divmod(idx, ctx.width)
    mirror = np.clip((2 * ctx.u[idx] - rows - 1).astype(np.int64), 0, None)
    img[idx] = img[idx] * 0.75 + 0.25 * img[mirror * ctx.width + cols]


# Applied in this order; the hood comes last because it mirrors what is already rendered above it.
_TEXTURES = (("sky", _tex_sky), ("asphalt", _tex_asphalt), ("tiles", _tex_tiles), ("facade", _tex_facade),
             ("far", _tex_far), ("leaves", _tex_leaves), ("grass", _tex_grass), ("blocks", _tex_blocks),
             ("fence", _tex_fence), ("metal", _tex_metal), ("body", _tex_body), ("glass", _tex_glass),
             ("hood", _tex_hood))


def _pixels_by_material(material_map):
    """Flat pixel indices of each material, from one stable (radix) sort instead of one scan per material."""
    flat = material_map.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(len(MATERIALS) + 1))
    return {name: order[bounds[m]:bounds[m + 1]] for name, m in MAT.items()}


def render(canvas, cam, rng, style, palette):
    """Surfaces -> linear RGB in [0, 1], (H, W, 3) float32, before the domain's camera model."""
    shape = canvas.shape
    colours = np.asarray(canvas.colours, np.float32) / 255.0
    materials = np.asarray(canvas.materials, np.uint8)
    inst = canvas.inst.ravel()
    ctx = RenderContext(cam, style, palette, shape[1], inst, canvas.u.ravel(), canvas.v.ravel(),
                        np.asarray(canvas.params, np.float32), mid=_smooth_noise(rng, shape, 8).ravel(),
                        low=_smooth_noise(rng, shape, 48).ravel(), leaf=_smooth_noise(rng, shape, 3).ravel())
    grain = (_GRAIN[materials] * style.texture_contrast)[inst] * rng.standard_normal(inst.size, dtype=np.float32)
    shadow = np.where(_GROUND_LUT[canvas.label.ravel()], canvas.shadow.ravel(), np.float32(1.0))
    img = colours[inst]
    groups = _pixels_by_material(materials[inst])
    for name, texture in _TEXTURES:
        if groups[name].size:
            texture(img, groups[name], ctx)
    img *= ((1 + grain) * shadow)[:, None]
    return img.reshape(shape + (3,))


def _gaussian_3x3(sigma):
    """A Gaussian blur of ``sigma`` <= ~1 px as one 3x3 kernel: close to GaussianBlur there, at half the cost."""
    side = np.exp(-0.5 / sigma ** 2)
    taps = np.outer([side, 1.0, side], [side, 1.0, side])
    return ImageFilter.Kernel((3, 3), taps.ravel().tolist(), scale=float(taps.sum()))


def camera_model(img, rng, style):
    """Domain-specific colour grading and camera artefacts: float RGB [0, 1] -> uint8 RGB."""
    height, width = img.shape[:2]
    luma = img @ np.array([0.299, 0.587, 0.114], np.float32)
    saturation = np.float32(rng.uniform(*style.saturation))
    img = luma[..., None] + saturation * (img - luma[..., None])
    cast = np.asarray(style.colour_cast) * np.exp(rng.normal(0.0, style.cast_jitter, 3))
    gain = cast * rng.uniform(*style.brightness)
    contrast = rng.uniform(*style.contrast)
    img = img * (gain * contrast).astype(np.float32) + np.float32(0.5 - 0.5 * contrast)
    if style.vignette[1] > 0:  # lens fall-off, before the camera's tone curve
        ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height * 2 - 1
        xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width * 2 - 1
        img *= (1 - np.float32(rng.uniform(*style.vignette)) * (xs ** 2 + ys ** 2) / 2)[..., None]
    # Tone curve by lookup table on 1024 levels: a power per pixel costs more than the rest together.
    levels = 1023
    curve = np.round(255 * np.linspace(0, 1, levels + 1) ** (1.0 / rng.uniform(*style.gamma))).astype(np.uint8)
    img = curve[np.clip(img * levels + 0.5, 0, levels).astype(np.int16)]
    if style.blur_radius[1] > 0:  # optics: blur before the sensor adds its noise
        img = np.asarray(Image.fromarray(img).filter(_gaussian_3x3(rng.uniform(*style.blur_radius))))
    sigma = rng.uniform(*style.noise_sigma)
    if sigma > 0:  # luminance noise per pixel, blotchier chroma noise at half resolution
        noise = rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(sigma)
        chroma = rng.standard_normal(((height + 1) // 2, (width + 1) // 2, 3), dtype=np.float32)
        noise = noise + np.float32(0.5 * sigma) * chroma.repeat(2, 0).repeat(2, 1)[:height, :width]
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
    if style.jpeg_quality[1] > 0:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=int(rng.integers(*style.jpeg_quality)))
        img = np.asarray(Image.open(buffer).convert("RGB"))
    return img


def render_sample(domain, seed=DEFAULT_SEED, split="all", index=0, flags=None):
    """One (image uint8 HxWx3, Cityscapes-id label uint8 HxW) pair, as the generator writes it.

    ``flags`` (rare events to include, e.g. {"train": True}) defaults to none; the generator
    passes the split's schedule."""
    style = STYLES[domain]
    rng = np.random.default_rng(_image_seed(seed, domain, split, index))
    scene = Scene(rng, style, flags or {})
    canvas = scene.compose()
    image = camera_model(render(canvas, scene.cam, rng, style, scene.palette), rng, style)
    return image, canvas.label


# ----------------------------------------------------------------------------------------------
# Seeds, schedule and file names
# ----------------------------------------------------------------------------------------------
def _image_seed(seed, domain, split, index):
    return np.random.SeedSequence(seed, spawn_key=(_DOMAIN_CODE[domain], _SPLIT_CODE[split], index))


def rare_schedule(seed, domain, split, count):
    """(count, len(EVENT_NAMES)) bool: which images of a split contain each rare event."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN_CODE[domain], _SPLIT_CODE[split],
                                                                        _SCHEDULE_KEY)))
    flags = np.zeros((count, len(EVENT_NAMES)), bool)
    if count == 0:
        return flags
    for column, rate in enumerate(RARE_EVENTS.values()):
        chosen = rng.choice(count, size=max(1, int(round(rate * count))), replace=False)
        flags[chosen, column] = True
    return flags


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


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _file_mode():
    """What a plain ``open()`` would create: mkstemp's private 0600 would hide the data from other users."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def _atomic_write_bytes(path, data):
    """Write to a temporary file in the same folder, then rename: readers never see half a file.

    No fsync: durability after a power cut is the completion marker's job, not each image's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data" / "synthetic"


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


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Generate the built-in synthetic GTA5-like -> Cityscapes-like benchmark (deterministic for "
                    "a seed, whatever the number of workers).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (receives GTA5/, Cityscapes/ and "
                                                     f"{MARKER_NAME})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the whole benchmark")
    parser.add_argument("--num-source", type=int, default=DEFAULT_NUM_SOURCE,
                        help="GTA5-like images (the last 10%% form val.txt)")
    parser.add_argument("--num-target-train", type=int, default=DEFAULT_NUM_TARGET_TRAIN,
                        help="Cityscapes-like train images (used without labels for adaptation)")
    parser.add_argument("--num-target-val", type=int, default=DEFAULT_NUM_TARGET_VAL,
                        help="Cityscapes-like val images (for evaluation)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = generate_benchmark(args.out, seed=args.seed, num_source=args.num_source,
                             num_target_train=args.num_target_train, num_target_val=args.num_target_val,
                             workers=args.workers, progress=not args.quiet)
    print(f"[synthetic] wrote {out}")


if __name__ == "__main__":
    main()
