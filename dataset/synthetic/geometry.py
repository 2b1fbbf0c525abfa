"""Camera geometry and pixel regions: a level pinhole camera, facing planes, and masks on coordinate grids."""
from collections import namedtuple
from dataclasses import dataclass

import numpy as np

MIN_PX = 1.0  # thin things (poles, frames, lines) stay at least a pixel wide, as in real annotations


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
