"""The canvas a scene is drawn into: label map, surfaces (material, colour, parameter) and shadows."""
import numpy as np

from dataset.synthetic.constants import SKY

# Materials: how a surface is textured by the renderer
MATERIALS = ("flat", "sky", "asphalt", "tiles", "facade", "far", "leaves", "grass", "blocks", "fence", "metal",
             "body", "glass", "hood")
MAT = {name: index for index, name in enumerate(MATERIALS)}


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
