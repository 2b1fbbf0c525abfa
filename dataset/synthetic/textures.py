"""Procedural textures per material, applied by the renderer to the pixels each material covers."""
from dataclasses import dataclass

import numpy as np

from dataset.synthetic.canvas import MATERIALS
from dataset.synthetic.geometry import Camera
from dataset.synthetic.noise import _hash01, _smoothstep
from dataset.synthetic.styles import DomainStyle

# Amplitude of per-pixel grain (fraction of the colour) per material, before the domain's texture contrast.
_GRAIN = np.array([0.03, 0.0, 0.06, 0.05, 0.04, 0.02, 0.06, 0.08, 0.05, 0.03, 0.03, 0.015, 0.02, 0.01], np.float32)
assert len(_GRAIN) == len(MATERIALS)


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
