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

Modules: ``constants`` (folders, sizes, label ids), ``styles`` (the two domains), ``geometry`` and
``canvas`` (camera, pixel regions, the label and surface maps), the scene grammar (``scene``
combining ``painter`` with ``background``, ``placement``, ``vehicles``, ``roadside`` and
``people``), rendering (``textures``, ``render``), ``sampling`` (seeds, the rare-event schedule,
``render_sample``), ``writer`` (files, caching) and ``cli``. Every public name is importable from
``dataset.synthetic`` itself.
"""
from dataset.synthetic.background import FAR_DEPTH
from dataset.synthetic.canvas import MAT, MATERIALS, Canvas
from dataset.synthetic.cli import get_args_parser, main
from dataset.synthetic.constants import (BICYCLE, BUILDING, BUS, CAR, CITYSCAPES_FRAME, DEFAULT_NUM_SOURCE,
                                         DEFAULT_NUM_TARGET_TRAIN, DEFAULT_NUM_TARGET_VAL, DEFAULT_SEED,
                                         EGO_VEHICLE, ENV_DIR, FENCE, GENERATOR_VERSION, LIGHT, LOCK_NAME,
                                         MARKER_NAME, MOTORCYCLE, OWNER_NAME, PERSON, PNG_COMPRESS_LEVEL, POLE,
                                         RIDER, ROAD, SIDEWALK, SIGN, SKY, SOURCE_SIZE, SOURCE_SUBDIR,
                                         SOURCE_VAL_FRACTION, TARGET_SIZE, TARGET_SUBDIR, TERRAIN, TRAIN,
                                         TRAIN_CITIES, TRUCK, VAL_CITIES, VEGETATION, WALL)
from dataset.synthetic.geometry import (MIN_PX, Camera, Frame, Region, ellipse_region, polygon_region, rect_region,
                                        ring_region, stroke_region)
from dataset.synthetic.render import camera_model, render
from dataset.synthetic.sampling import EVENT_NAMES, RARE_EVENTS, rare_schedule, render_sample
from dataset.synthetic.scene import CURB_WIDTH, Scene, Side
from dataset.synthetic.styles import SOURCE_STYLE, STYLES, TARGET_STYLE, DomainStyle, image_palette
from dataset.synthetic.textures import RenderContext
from dataset.synthetic.writer import (Job, cityscapes_names, default_root, ensure_synthetic_benchmark,
                                      generate_benchmark, source_name)

# The names the single module dataset/synthetic.py had: callers keep importing them from here.
__all__ = ["FAR_DEPTH", "MAT", "MATERIALS", "Canvas", "get_args_parser", "main", "BICYCLE", "BUILDING", "BUS", "CAR",
           "CITYSCAPES_FRAME", "DEFAULT_NUM_SOURCE", "DEFAULT_NUM_TARGET_TRAIN", "DEFAULT_NUM_TARGET_VAL",
           "DEFAULT_SEED", "EGO_VEHICLE", "ENV_DIR", "FENCE", "GENERATOR_VERSION", "LIGHT", "LOCK_NAME", "MARKER_NAME",
           "MOTORCYCLE", "OWNER_NAME", "PERSON", "PNG_COMPRESS_LEVEL", "POLE", "RIDER", "ROAD", "SIDEWALK", "SIGN",
           "SKY", "SOURCE_SIZE", "SOURCE_SUBDIR", "SOURCE_VAL_FRACTION", "TARGET_SIZE", "TARGET_SUBDIR", "TERRAIN",
           "TRAIN", "TRAIN_CITIES", "TRUCK", "VAL_CITIES", "VEGETATION", "WALL", "MIN_PX", "Camera", "Frame", "Region",
           "ellipse_region", "polygon_region", "rect_region", "ring_region", "stroke_region", "camera_model", "render",
           "EVENT_NAMES", "RARE_EVENTS", "rare_schedule", "render_sample", "CURB_WIDTH", "Scene", "Side",
           "SOURCE_STYLE", "STYLES", "TARGET_STYLE", "DomainStyle", "image_palette", "RenderContext", "Job",
           "cityscapes_names", "default_root", "ensure_synthetic_benchmark", "generate_benchmark", "source_name"]
