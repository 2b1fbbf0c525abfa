"""A scene being drawn: its camera, canvas, palette and light, and the drawing primitives every part uses.

The scene's parts (background layers, object placement, vehicles, roadside objects, people) are
mixins of ``Painter``; ``dataset.synthetic.scene.Scene`` combines them."""
import numpy as np

from dataset.synthetic.canvas import Canvas
from dataset.synthetic.geometry import (Camera, Frame, _thin, ellipse_region, polygon_region, rect_region,
                                        stroke_region)
from dataset.synthetic.styles import image_palette


class Painter:
    """The state of one scene being drawn and the primitives that paint into its canvas."""

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


def _sample_camera(rng, style):
    height, width = style.size
    return Camera(height, width, horizon=rng.uniform(*style.horizon) * height, vp_x=rng.uniform(*style.vp_x) * width,
                  focal=rng.uniform(*style.focal) * width, cam_height=rng.uniform(*style.cam_height))
