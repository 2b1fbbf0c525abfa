"""The two domains' styles: colour palettes, camera, layout statistics and appearance; per-image palettes."""
from dataclasses import dataclass

import numpy as np

from dataset.synthetic.constants import SOURCE_SIZE, TARGET_SIZE

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


def image_palette(rng, style):
    """Per-image class colours: the domain's mean times a random per-class colour and brightness gain."""
    palette = {}
    for key, value in style.palette.items():
        choices = np.asarray(value if isinstance(value, list) else [value], np.float64)
        gain = np.exp(rng.normal(0.0, style.colour_jitter, (len(choices), 3))
                      + rng.normal(0.0, style.brightness_jitter, (len(choices), 1)))
        palette[key] = np.clip(choices * gain, 0, 255)
    return palette
