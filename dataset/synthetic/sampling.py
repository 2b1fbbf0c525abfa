"""One sample from its seed: the per-split schedule of rare events, per-image seeds, ``render_sample``."""
import numpy as np

from dataset.synthetic.constants import DEFAULT_SEED
from dataset.synthetic.render import camera_model, render
from dataset.synthetic.scene import Scene
from dataset.synthetic.styles import STYLES

# Rare things are scheduled per split instead of drawn independently per image: each appears in
# exactly max(1, round(rate * N)) images of a split, so even a small val split contains every class.
RARE_EVENTS = {"truck": 0.3, "bus": 0.2, "train": 0.1, "rider_bicycle": 0.3, "rider_motorcycle": 0.18,
               "parked_bicycle": 0.25, "parked_motorcycle": 0.1, "wall": 0.4, "fence": 0.45}
EVENT_NAMES = tuple(RARE_EVENTS)
_DOMAIN_CODE = {"source": 0, "target": 1}
_SPLIT_CODE = {"all": 0, "train": 1, "val": 2}
_SCHEDULE_KEY = 1_000_003  # spawn-key slot of the per-split schedule, distinct from any image index


def render_sample(domain, seed=DEFAULT_SEED, split="all", index=0, flags=None):
    """One (image uint8 HxWx3, Cityscapes-id label uint8 HxW) pair, as the generator writes it.

    ``flags`` (rare events to include, e.g. {"train": True}) defaults to none; the generator
    passes the split's schedule."""
    style = STYLES[domain]
    rng = np.random.default_rng(_image_seed(seed, domain, split, index))
    scene = Scene(rng, style, flags or {})
    canvas = scene.compose()
    image = camera_model(render(canvas, scene.cam, rng, style, scene.palette), rng, style)
    return image, canvas.label


def _image_seed(seed, domain, split, index):
    return np.random.SeedSequence(seed, spawn_key=(_DOMAIN_CODE[domain], _SPLIT_CODE[split], index))


def rare_schedule(seed, domain, split, count):
    """(count, len(EVENT_NAMES)) bool: which images of a split contain each rare event."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DOMAIN_CODE[domain], _SPLIT_CODE[split],
                                                                        _SCHEDULE_KEY)))
    flags = np.zeros((count, len(EVENT_NAMES)), bool)
    if count == 0:
        return flags
    for column, rate in enumerate(RARE_EVENTS.values()):
        chosen = rng.choice(count, size=max(1, int(round(rate * count))), replace=False)
        flags[chosen, column] = True
    return flags
