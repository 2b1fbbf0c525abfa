"""The scene grammar: one street scene's layout, then its layers and objects painted far to near."""
from dataclasses import dataclass

from dataset.synthetic.background import BackgroundLayers
from dataset.synthetic.constants import SIDEWALK, TERRAIN
from dataset.synthetic.people import PeopleDrawers
from dataset.synthetic.placement import ObjectPlacement
from dataset.synthetic.roadside import RoadsideDrawers
from dataset.synthetic.vehicles import VehicleDrawers

CURB_WIDTH = 0.15


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


class Scene(BackgroundLayers, ObjectPlacement, VehicleDrawers, RoadsideDrawers, PeopleDrawers):
    """Draws one street scene into a Canvas: background layers first, then objects far to near.

    Its parts are mixins of ``Painter`` (the scene's state and drawing primitives), one per drawing
    stage or object family: background layers, object placement, vehicles, roadside objects, people."""

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
