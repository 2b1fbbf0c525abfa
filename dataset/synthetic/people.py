"""People: pedestrians, and bicycles or motorcycles, parked or ridden."""
from dataset.synthetic.constants import BICYCLE, MOTORCYCLE, PERSON, RIDER
from dataset.synthetic.geometry import MIN_PX, ring_region
from dataset.synthetic.painter import Painter


class PeopleDrawers(Painter):
    """Scene methods that draw one person or one two-wheeler (with its rider) each."""

    def _person(self, x, z, walking, label=PERSON):
        """Legs, torso, arms, head and hair: frontal standing, or side-on mid-stride."""
        rng = self.rng
        fr = self.frame(x, z)
        h = rng.uniform(1.55, 1.95)
        skin, hair = self.surface("flat", "skin"), self.surface("flat", "hair")
        shirt, trousers = self.surface("flat", "cloth"), self.surface("flat", "cloth", gain=0.7)
        self.ground_shadow(x - 0.3, x + 0.3, z, z + 0.4)
        hip, shoulder = 0.5 * h, 0.81 * h
        if walking:
            direction, stride = int(rng.choice((-1, 1))), rng.uniform(0.15, 0.35)
            for sign in (-1, 1):
                self.stroke(fr, (0.0, hip), (direction * sign * stride, 0.05), 0.15, label, trousers)
            self.poly(fr, [(-0.13, hip - 0.03), (0.13, hip - 0.03), (0.14, shoulder), (-0.13, shoulder)], label, shirt)
            self.stroke(fr, (0.0, shoulder - 0.04), (-direction * 0.18, hip - 0.05), 0.09, label, shirt)
        else:
            for sign in (-1, 1):
                self.rect(fr, sign * 0.03, 0.0, sign * 0.17, hip, label, trousers)
            self.poly(fr, [(-0.17, hip - 0.03), (0.17, hip - 0.03), (0.22, shoulder), (-0.22, shoulder)], label, shirt)
            for sign in (-1, 1):
                self.stroke(fr, (sign * 0.22, shoulder - 0.04), (sign * 0.27, hip - 0.04), 0.09, label, shirt)
        self._head(fr, 0.0, 0.93 * h, h / 1.75, skin, hair, label)

    def _head(self, fr, u, v, scale, skin, hair, label):
        self.rect(fr, u - 0.05, v - 0.2 * scale, u + 0.05, v - 0.08 * scale, label, skin)  # neck
        self.ellipse(fr, u, v, 0.095 * scale, 0.12 * scale, label, skin)
        self.ellipse(fr, u, v + 0.05 * scale, 0.1 * scale, 0.08 * scale, label, hair)

    def _two_wheeler(self, kind, x, z, profile, direction, ridden):
        """A bicycle (rings and a thin frame) or a motorcycle (solid wheels, body), optionally ridden.

        ``profile`` foreshortens the side view (1 = side-on, small = seen from behind)."""
        fr = self.frame(x, z)
        k = profile * direction
        label = BICYCLE if kind == "bicycle" else MOTORCYCLE
        frame_inst = self.surface("metal" if kind == "bicycle" else "body", "two_wheeler", param=0.8)
        tire = self.surface("flat", "tire")
        self.ground_shadow(x - 0.8 * profile, x + 0.8 * profile, z, z + 0.5)
        if kind == "bicycle":
            r, hub = 0.34, 0.52
            for sign in (-1, 1):
                self.canvas.paint(self._wheel_ring(fr, sign * hub * k, r, profile), label, tire, frame=fr)
            seat, bracket, head = (-0.12 * k, 0.85), (0.0, 0.32), (0.38 * k, 0.92)
            for a, b in ((((-hub * k), r), seat), (seat, bracket), (bracket, (-hub * k, r)), (seat, head),
                         (bracket, head), (head, (hub * k, r)), (head, (0.33 * k, 1.02))):
                self.stroke(fr, a, b, 0.045, label, frame_inst)
            hips, bar = (-0.12 * k, 0.95), (0.36 * k, 1.0)
        else:
            r, hub = 0.32, 0.7
            rim = self.surface("metal", "pole", param=0.0)
            for sign in (-1, 1):
                self.ellipse(fr, sign * hub * k, r, r * max(profile, 0.15), r, label, tire)
                self.ellipse(fr, sign * hub * k, r, 0.5 * r * max(profile, 0.15), 0.5 * r, label, rim)
            self.poly(fr, [(-0.8 * k, 0.62), (-0.2 * k, 0.92), (0.35 * k, 0.98), (0.62 * k, 0.78), (0.15 * k, 0.3),
                           (-0.35 * k, 0.38)], label, frame_inst)
            self.stroke(fr, (0.55 * k, 0.8), (0.45 * k, 1.12), 0.06, label, frame_inst)
            hips, bar = (-0.2 * k, 0.95), (0.45 * k, 1.1)
        if ridden:
            self._rider(fr, k, hips, bar, kind == "motorcycle")

    def _wheel_ring(self, fr, u, r, profile):
        cx, cy = fr.pt(u, r)
        rx, ry = r * fr.s * max(profile, 0.15), r * fr.s
        return ring_region(self.canvas.shape, cx, cy, rx, ry, max(0.07 * fr.s, MIN_PX))

    def _rider(self, fr, k, hips, bar, helmet):
        """A rider leaning to the handlebar, one leg down to the pedal or footrest."""
        skin, hair = self.surface("flat", "skin"), self.surface("flat", "hair" if not helmet else "two_wheeler")
        jacket, trousers = self.surface("flat", "cloth"), self.surface("flat", "cloth", gain=0.7)
        hu, hv = hips
        shoulder = (hu + 0.25 * k, hv + 0.55)
        knee = (hu + 0.3 * k, hv - 0.3)
        foot = (hu + 0.12 * k, 0.3)
        self.stroke(fr, hips, knee, 0.15, RIDER, trousers)
        self.stroke(fr, knee, foot, 0.13, RIDER, trousers)
        width = 0.36 - 0.14 * abs(k)  # shoulders are wider seen from behind than side-on
        self.stroke(fr, hips, shoulder, width, RIDER, jacket)
        self.stroke(fr, shoulder, bar, 0.09, RIDER, jacket)
        scale = 1.15 if helmet else 1.0
        self._head(fr, shoulder[0] + 0.06 * k, shoulder[1] + 0.2, scale, skin, hair, RIDER)
