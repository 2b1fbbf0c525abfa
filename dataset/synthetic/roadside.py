"""Roadside objects: poles carrying signs, traffic lights or lamps, and trees."""
import numpy as np

from dataset.synthetic.constants import LIGHT, POLE, SIGN, VEGETATION
from dataset.synthetic.geometry import Region, _window
from dataset.synthetic.noise import _smooth_noise
from dataset.synthetic.painter import Painter


class RoadsideDrawers(Painter):
    """Scene methods that draw one pole (with what it carries) or one tree each."""

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
