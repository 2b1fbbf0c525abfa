"""Where objects stand: traffic, parked cars, street furniture, trees, people and two-wheelers."""
import numpy as np

from dataset.synthetic.noise import _log_uniform
from dataset.synthetic.painter import Painter


class ObjectPlacement(Painter):
    """Scene methods that queue objects as (depth, draw) pairs; ``Scene.compose`` draws them far to near."""

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
