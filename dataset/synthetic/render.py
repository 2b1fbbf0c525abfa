"""Rendering: label map + surfaces -> RGB, then the domain's colour grading and camera artefacts."""
import io

import numpy as np
from PIL import Image, ImageFilter

from dataset.labels import LUT_SIZE
from dataset.synthetic.canvas import MAT, MATERIALS
from dataset.synthetic.constants import ROAD, SIDEWALK, TERRAIN
from dataset.synthetic.noise import _smooth_noise
from dataset.synthetic.textures import _GRAIN, _TEXTURES, RenderContext

# Shadows show on these only: a shadow quad must not darken an object that stands in it or behind it.
_GROUND_LUT = np.zeros(LUT_SIZE, bool)
_GROUND_LUT[[ROAD, SIDEWALK, TERRAIN]] = True


def _pixels_by_material(material_map):
    """Flat pixel indices of each material, from one stable (radix) sort instead of one scan per material."""
    flat = material_map.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(len(MATERIALS) + 1))
    return {name: order[bounds[m]:bounds[m + 1]] for name, m in MAT.items()}


def render(canvas, cam, rng, style, palette):
    """Surfaces -> linear RGB in [0, 1], (H, W, 3) float32, before the domain's camera model."""
    shape = canvas.shape
    colours = np.asarray(canvas.colours, np.float32) / 255.0
    materials = np.asarray(canvas.materials, np.uint8)
    inst = canvas.inst.ravel()
    ctx = RenderContext(cam, style, palette, shape[1], inst, canvas.u.ravel(), canvas.v.ravel(),
                        np.asarray(canvas.params, np.float32), mid=_smooth_noise(rng, shape, 8).ravel(),
                        low=_smooth_noise(rng, shape, 48).ravel(), leaf=_smooth_noise(rng, shape, 3).ravel())
    grain = (_GRAIN[materials] * style.texture_contrast)[inst] * rng.standard_normal(inst.size, dtype=np.float32)
    shadow = np.where(_GROUND_LUT[canvas.label.ravel()], canvas.shadow.ravel(), np.float32(1.0))
    img = colours[inst]
    groups = _pixels_by_material(materials[inst])
    for name, texture in _TEXTURES:
        if groups[name].size:
            texture(img, groups[name], ctx)
    img *= ((1 + grain) * shadow)[:, None]
    return img.reshape(shape + (3,))


def _gaussian_3x3(sigma):
    """A Gaussian blur of ``sigma`` <= ~1 px as one 3x3 kernel: close to GaussianBlur there, at half the cost."""
    side = np.exp(-0.5 / sigma ** 2)
    taps = np.outer([side, 1.0, side], [side, 1.0, side])
    return ImageFilter.Kernel((3, 3), taps.ravel().tolist(), scale=float(taps.sum()))


def camera_model(img, rng, style):
    """Domain-specific colour grading and camera artefacts: float RGB [0, 1] -> uint8 RGB."""
    height, width = img.shape[:2]
    luma = img @ np.array([0.299, 0.587, 0.114], np.float32)
    saturation = np.float32(rng.uniform(*style.saturation))
    img = luma[..., None] + saturation * (img - luma[..., None])
    cast = np.asarray(style.colour_cast) * np.exp(rng.normal(0.0, style.cast_jitter, 3))
    gain = cast * rng.uniform(*style.brightness)
    contrast = rng.uniform(*style.contrast)
    img = img * (gain * contrast).astype(np.float32) + np.float32(0.5 - 0.5 * contrast)
    if style.vignette[1] > 0:  # lens fall-off, before the camera's tone curve
        ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height * 2 - 1
        xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width * 2 - 1
        img *= (1 - np.float32(rng.uniform(*style.vignette)) * (xs ** 2 + ys ** 2) / 2)[..., None]
    # Tone curve by lookup table on 1024 levels: a power per pixel costs more than the rest together.
    levels = 1023
    curve = np.round(255 * np.linspace(0, 1, levels + 1) ** (1.0 / rng.uniform(*style.gamma))).astype(np.uint8)
    img = curve[np.clip(img * levels + 0.5, 0, levels).astype(np.int16)]
    if style.blur_radius[1] > 0:  # optics: blur before the sensor adds its noise
        img = np.asarray(Image.fromarray(img).filter(_gaussian_3x3(rng.uniform(*style.blur_radius))))
    sigma = rng.uniform(*style.noise_sigma)
    if sigma > 0:  # luminance noise per pixel, blotchier chroma noise at half resolution
        noise = rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(sigma)
        chroma = rng.standard_normal(((height + 1) // 2, (width + 1) // 2, 3), dtype=np.float32)
        noise = noise + np.float32(0.5 * sigma) * chroma.repeat(2, 0).repeat(2, 1)[:height, :width]
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
    if style.jpeg_quality[1] > 0:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=int(rng.integers(*style.jpeg_quality)))
        img = np.asarray(Image.open(buffer).convert("RGB"))
    return img
