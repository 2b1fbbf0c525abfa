"""The street's fixed layers: far skyline, ground (road, curbs, sidewalks, markings), facades, walls and
fences, and the target camera's bonnet."""
import numpy as np

from dataset.synthetic.constants import (BUILDING, EGO_VEHICLE, FENCE, ROAD, SIDEWALK, TERRAIN, VEGETATION,
                                         WALL)
from dataset.synthetic.geometry import rect_region
from dataset.synthetic.noise import _log_uniform
from dataset.synthetic.painter import Painter

FAR_DEPTH = (150.0, 300.0)  # where the facades end and the far skyline takes over


class BackgroundLayers(Painter):
    """Scene methods that paint the layers behind every object (needs the layout: ``left``, ``right``,
    ``road_left``, ``road_right``, ``lanes``, ``lane_width``)."""

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
