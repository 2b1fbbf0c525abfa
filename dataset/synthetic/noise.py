"""Randomness helpers shared by the scene grammar and the renderer."""
import numpy as np
from PIL import Image


def _log_uniform(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _smooth_noise(rng, shape, cell):
    """Zero-mean noise with features about ``cell`` pixels wide (bicubic upsampling of a coarse grid)."""
    height, width = shape
    grid_h, grid_w = height // cell + 3, width // cell + 3
    grid = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
    big = Image.fromarray(grid).resize((grid_w * cell, grid_h * cell), Image.Resampling.BICUBIC)
    return np.asarray(big)[cell:cell + height, cell:cell + width]


def _hash01(i, j):
    """Deterministic pseudo-random value in [0, 1) per integer cell (i, j): varies tiles and windows."""
    return np.modf(np.abs(np.sin(i * 12.9898 + j * 78.233) * 43758.5453))[0]


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)
