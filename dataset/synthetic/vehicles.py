"""Vehicles: cars, trucks, buses and trams, as boxes with a side face and a front or rear face."""
import numpy as np

from dataset.synthetic.constants import BUS, CAR, TRAIN, TRUCK
from dataset.synthetic.painter import Painter

# Vehicle sizes in metres: (width, height, length) ranges.
_VEHICLE_DIMS = {
    "car": ((1.7, 1.95), (1.4, 1.6), (3.9, 4.8)),
    "truck": ((2.3, 2.55), (3.0, 3.8), (6.0, 9.0)),
    "bus": ((2.5, 2.55), (3.0, 3.3), (11.0, 13.0)),
    "train": ((2.6, 2.7), (3.4, 3.8), (25.0, 40.0)),
}
_VEHICLE_LABEL = {"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}


class VehicleDrawers(Painter):
    """Scene methods that draw one vehicle each."""

    def _vehicle(self, kind, x, z, towards):
        """A box-shaped vehicle: the side facing the camera (if any) and then its rear or front face."""
        rng = self.rng
        (w0, w1), (h0, h1), (l0, l1) = _VEHICLE_DIMS[kind]
        width, height, length = rng.uniform(w0, w1), rng.uniform(h0, h1), rng.uniform(l0, l1)
        label = _VEHICLE_LABEL[kind]
        parts = {
            "body": self.surface("body", kind, param=height),
            "glass": self.surface("glass", "glass"),
            "tire": self.surface("flat", "tire"),
            "hub": self.surface("metal", "pole", param=0.0),
            "light": self.surface("flat", "front_light" if towards else "rear_light"),
            "plate": self.surface("flat", "plate"),
            "dark": self.surface("flat", "housing"),
        }
        self.ground_shadow(x - width / 2 - 0.1, x + width / 2 + 0.1, z, z + length)
        side_x = x - np.sign(x) * width / 2
        if abs(side_x) > 0.3 and np.sign(side_x) == np.sign(x):
            _SIDE_DRAWERS[kind](self, side_x, z, length, height, parts, label, towards)
        _FACE_DRAWERS[kind](self, self.frame(x, z), width, height, parts, label, towards)

    def _car_side(self, x, z, length, height, parts, label, towards):
        belt = 0.55 * height
        self.side_poly(x, [(z, 0.2), (z + length, 0.2), (z + length, belt), (z, belt)], label, parts["body"])
        cabin = [(0.12, belt), (0.3, height), (0.72, height), (0.9, belt)]
        if towards:  # the windscreen end is nearer
            cabin = [(1 - a, b) for a, b in cabin]
        self.side_poly(x, [(z + a * length, b) for a, b in cabin], label, parts["body"])
        glass = [(a * 0.9 + 0.05, b + (0.05 if b == belt else -0.06)) for a, b in cabin]
        self.side_poly(x, [(z + a * length, b) for a, b in glass], label, parts["glass"])
        for zw in (z + 0.8, z + length - 0.8):
            self.side_wheel(x, zw, 0.32, parts["tire"], parts["hub"], label)

    def _car_face(self, fr, width, height, parts, label, towards):
        half, belt = width / 2, 0.55 * height
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.42), 0.0, sign * (half - 0.14), 0.34, label, parts["tire"])
        self.poly(fr, [(-half, 0.22), (half, 0.22), (half, belt - 0.05), (half - 0.08, belt), (-half + 0.08, belt),
                       (-half, belt - 0.05)], label, parts["body"])
        self.poly(fr, [(-0.46 * width, belt), (0.46 * width, belt), (0.36 * width, height), (-0.36 * width, height)],
                  label, parts["body"])
        top = height - (0.06 if towards else 0.1)
        self.poly(fr, [(-0.41 * width, belt + 0.05), (0.41 * width, belt + 0.05), (0.33 * width, top),
                       (-0.33 * width, top)], label, parts["glass"])
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.04), belt - 0.22, sign * (half - 0.32), belt - 0.07, label, parts["light"])
        if towards:
            self.rect(fr, -0.35, belt - 0.28, 0.35, belt - 0.1, label, parts["dark"])
        self.rect(fr, -0.26, 0.3, 0.26, 0.42, label, parts["plate"])

    def _bus_side(self, x, z, length, height, parts, label, towards):
        self.side_poly(x, [(z, 0.3), (z + length, 0.3), (z + length, height), (z, height)], label, parts["body"])
        pane = 1.4
        for k in range(int((length - 1.0) / pane)):
            z0 = z + 0.5 + k * pane
            self.side_poly(x, [(z0, 1.35), (z0 + pane - 0.15, 1.35), (z0 + pane - 0.15, height - 0.35),
                               (z0, height - 0.35)], label, parts["glass"])
        door = z + (length - 2.5 if towards else 2.0)
        self.side_poly(x, [(door, 0.35), (door + 1.1, 0.35), (door + 1.1, height - 0.4), (door, height - 0.4)],
                       label, parts["dark"])
        for zw in (z + 2.5, z + length - 3.0):
            self.side_wheel(x, zw, 0.5, parts["tire"], parts["hub"], label)

    def _bus_face(self, fr, width, height, parts, label, towards):
        half = width / 2
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.5), 0.0, sign * (half - 0.15), 0.45, label, parts["tire"])
        self.rect(fr, -half, 0.3, half, height, label, parts["body"])
        low = 1.1 if towards else height - 1.1
        self.rect(fr, -0.44 * width, low, 0.44 * width, height - 0.3, label, parts["glass"])
        if towards:
            self.rect(fr, -0.35 * width, height - 0.28, 0.35 * width, height - 0.08, label, parts["dark"])
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.08), 0.55, sign * (half - 0.35), 0.8, label, parts["light"])
        self.rect(fr, -0.26, 0.35, 0.26, 0.48, label, parts["plate"])

    def _truck_side(self, x, z, length, height, parts, label, towards):
        cab = 2.2
        box0, box1 = (z + cab + 0.1, z + length) if towards else (z, z + length - cab - 0.1)
        cab0, cab1 = (z, z + cab) if towards else (z + length - cab, z + length)
        self.side_poly(x, [(z, 0.5), (z + length, 0.5), (z + length, 0.95), (z, 0.95)], label, parts["dark"])
        self.side_poly(x, [(box0, 0.9), (box1, 0.9), (box1, height), (box0, height)], label, parts["body"])
        self.side_poly(x, [(cab0, 0.5), (cab1, 0.5), (cab1, 2.8), (cab0, 2.8)], label, parts["body"])
        w0, w1 = (cab0 + 0.2, cab0 + 1.3) if towards else (cab1 - 1.3, cab1 - 0.2)
        self.side_poly(x, [(w0, 1.7), (w1, 1.7), (w1, 2.55), (w0, 2.55)], label, parts["glass"])
        for zw in (z + 1.2, z + length / 2, z + length - 1.2):
            self.side_wheel(x, zw, 0.5, parts["tire"], parts["hub"], label)

    def _truck_face(self, fr, width, height, parts, label, towards):
        half = width / 2
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.5), 0.0, sign * (half - 0.12), 0.5, label, parts["tire"])
        self.rect(fr, -half, 0.45, half, 0.95, label, parts["dark"])
        self.rect(fr, -half, 0.9, half, height, label, parts["body"])
        if towards:
            self.rect(fr, -half, 0.6, half, 2.8, label, parts["body"])
            self.rect(fr, -0.44 * width, 1.65, 0.44 * width, 2.6, label, parts["glass"])
            self.rect(fr, -0.5, 0.75, 0.5, 1.3, label, parts["dark"])
        else:
            self.stroke(fr, (0.0, 1.0), (0.0, height - 0.1), 0.05, label, parts["dark"])
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.05), 0.7 if towards else 0.55, sign * (half - 0.35),
                      0.95 if towards else 0.8, label, parts["light"])

    def _train_side(self, x, z, length, height, parts, label, towards):
        self._train_body_side(lambda pts, inst: self.side_poly(x, pts, label, inst), z, z + length, height, parts)

    def _train_body_side(self, poly, z0, z1, height, parts):
        """A tram's long side in plane coordinates (along, up): skirt, body, windows band and doors."""
        poly([(z0, 0.4), (z1, 0.4), (z1, height), (z0, height)], parts["body"])
        poly([(z0, 0.3), (z1, 0.3), (z1, 0.8), (z0, 0.8)], parts["dark"])
        pane, along = 1.8, z0 + 0.6
        while along + pane < z1 - 0.4:
            if int((along - z0) / pane) % 4 == 2:  # a door instead of every fourth window
                poly([(along, 0.85), (along + pane - 0.3, 0.85), (along + pane - 0.3, height - 0.5),
                      (along, height - 0.5)], parts["dark"])
            else:
                poly([(along, 1.45), (along + pane - 0.25, 1.45), (along + pane - 0.25, height - 0.7),
                      (along, height - 0.7)], parts["glass"])
            along += pane

    def _train_face(self, fr, width, height, parts, label, towards):
        half = width / 2
        self.rect(fr, -half, 0.3, half, 0.8, label, parts["dark"])
        self.poly(fr, [(-half, 0.4), (half, 0.4), (half, height - 0.3), (half - 0.3, height), (-half + 0.3, height),
                       (-half, height - 0.3)], label, parts["body"])
        self.rect(fr, -0.42 * width, 1.6, 0.42 * width, height - 0.45, label, parts["glass"])
        for sign in (-1, 1):
            self.rect(fr, sign * (half - 0.15), 0.9, sign * (half - 0.45), 1.1, label, parts["light"])
        self.stroke(fr, (-0.4, height), (0.2, height + 0.6), 0.06, label, parts["dark"])  # pantograph
        self.stroke(fr, (0.2, height + 0.6), (-0.5, height + 0.75), 0.06, label, parts["dark"])

    def _crossing_train(self, z):
        """A tram crossing the street far ahead: its long side faces the camera."""
        rng = self.rng
        length, height = rng.uniform(25.0, 40.0), rng.uniform(3.4, 3.8)
        x0 = rng.uniform(-length + 3.0, -3.0)
        # Only the cross street between the two building lines is open; beyond them facades hide it.
        x0, x1 = max(x0, -self.left.building), min(x0 + length, self.right.building)
        length = x1 - x0
        fr = self.frame(0.0, z)
        parts = {"body": self.surface("body", "train", param=height), "glass": self.surface("glass", "glass"),
                 "dark": self.surface("flat", "housing")}
        self.ground_shadow(x0, x0 + length, z, z + 2.6)
        self._train_body_side(lambda pts, inst: self.poly(fr, pts, TRAIN, inst), x0, x0 + length, height, parts)
        for k in range(int(length // 10)):
            u = x0 + 5 + 10 * k
            self.stroke(fr, (u, height), (u + 0.6, height + 0.6), 0.06, TRAIN, parts["dark"])


_SIDE_DRAWERS = {"car": VehicleDrawers._car_side, "bus": VehicleDrawers._bus_side,
                 "truck": VehicleDrawers._truck_side, "train": VehicleDrawers._train_side}
_FACE_DRAWERS = {"car": VehicleDrawers._car_face, "bus": VehicleDrawers._bus_face,
                 "truck": VehicleDrawers._truck_face, "train": VehicleDrawers._train_face}
