"""A generated image-classification dataset whose class evidence has a known pixel mask.

Each image holds exactly one *class object* on a cluttered background; the label
is decided by that object alone and the returned mask marks its pixels.

Classes: class ``c`` is shape ``SHAPES[c % 6]`` painted in colour
``CLASS_COLOURS[c % 5]``. Six and five are coprime, so classes 0..29 are 30
distinct (shape, colour) pairs and neighbouring classes differ in both shape and
colour: a model must see the object's shape *and* colour to be right.

Clutter that does not carry the class:
- background: a random mix of low-frequency noise, stripes and a checkerboard,
  in two low-saturation colours, plus pixel noise;
- distractors: 2..6 shapes of any kind, painted only in low-saturation colours
  (greys and muted tints). Class colours are fully saturated, so no distractor or
  background pixel can be mistaken for class evidence.

The class object is drawn last (nothing occludes it), at a random position and
scale (radius 12..30 % of the shorter side), with a random rotation. Everything
is vectorised numpy on the object's bounding box: fast on CPU at any size.
``generate(n, size, seed)`` is deterministic: sample ``i`` depends only on
``(seed, i)``, and labels cycle through the classes so any prefix is balanced.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
CLASS_COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 220, 30),
    "magenta": (220, 40, 220),
}
MAX_CLASSES = len(SHAPES) * len(CLASS_COLOURS)

# Distractor and background colours stay within this distance of grey (class colours are >140 away).
_MUTED_SPREAD = 30


def class_names(num_classes: int = 10) -> list[str]:
    """Names like ``red_circle`` for classes 0..num_classes-1."""
    _check_num_classes(num_classes)
    colour_names = list(CLASS_COLOURS)
    return [f"{colour_names[c % len(colour_names)]}_{SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")


def _size_pair(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 8 or w < 8:
        raise ValueError(f"image size must be at least 8x8, got {h}x{w}")
    return int(h), int(w)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside ``shape`` of radius r, in rotated coordinates (u, v) around its centre."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if shape == "cross":
        arm = 0.3 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "triangle":
        # Equilateral triangle with circumradius r: inside all three edge half-planes.
        inside = np.ones(u.shape, dtype=bool)
        for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(angle) + v * np.sin(angle) >= -0.5 * r
        return inside
    raise ValueError(f"unknown shape {shape!r}")


def _paint_shape(image, rng, shape, colour, radius) -> np.ndarray:
    """Paint one shape at a random place (fully inside the image); return its full-size mask."""
    h, w = image.shape[:2]
    cy = rng.uniform(radius, h - radius)
    cx = rng.uniform(radius, w - radius)
    theta = rng.uniform(0, 2 * np.pi)
    top, bottom = max(0, int(cy - radius) - 1), min(h, int(cy + radius) + 2)
    left, right = max(0, int(cx - radius) - 1), min(w, int(cx + radius) + 2)
    yy, xx = np.mgrid[top:bottom, left:right]
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    local = _shape_mask(shape, u, v, radius)
    # A little per-pixel colour noise so objects are not perfectly flat.
    noise = rng.integers(-12, 13, size=(int(local.sum()), 3))
    patch = image[top:bottom, left:right]
    patch[local] = np.clip(np.asarray(colour) + noise, 0, 255)
    mask = np.zeros((h, w), dtype=bool)
    mask[top:bottom, left:right] = local
    return mask


def _muted_colour(rng) -> np.ndarray:
    grey = rng.uniform(50, 205)
    return np.clip(grey + rng.uniform(-_MUTED_SPREAD, _MUTED_SPREAD, size=3), 0, 255)


def _background(rng, h: int, w: int) -> np.ndarray:
    """A textured, low-saturation background (float32 H, W, 3)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Low-frequency noise: a coarse random grid, bilinearly upsampled.
    gh, gw = rng.integers(3, 7, size=2)
    grid = rng.random((gh + 1, gw + 1)).astype(np.float32)
    gy, gx = yy / h * gh, xx / w * gw
    y0, x0 = gy.astype(int), gx.astype(int)
    fy, fx = gy - y0, gx - x0
    noise = (
        grid[y0, x0] * (1 - fy) * (1 - fx)
        + grid[y0 + 1, x0] * fy * (1 - fx)
        + grid[y0, x0 + 1] * (1 - fy) * fx
        + grid[y0 + 1, x0 + 1] * fy * fx
    )
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.08, 0.3) * min(h, w)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    cell = max(2, int(rng.uniform(0.06, 0.2) * min(h, w)))
    checker = ((yy // cell + xx // cell) % 2).astype(np.float32)
    weights = rng.dirichlet(np.ones(3)).astype(np.float32)
    pattern = weights[0] * noise + weights[1] * stripes + weights[2] * checker
    a, b = _muted_colour(rng), _muted_colour(rng)
    image = a + (b - a) * pattern[:, :, None]
    return image + rng.normal(0, 6, size=image.shape)


def make_sample(rng: np.random.Generator, size, num_classes: int = 10, label: int | None = None):
    """One sample: (uint8 image (H, W, 3), bool mask (H, W) of the class object, int label).

    ``size`` is an int or (H, W); ``label`` is drawn from ``rng`` when not given.
    """
    _check_num_classes(num_classes)
    h, w = _size_pair(size)
    if label is None:
        label = int(rng.integers(num_classes))
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} out of range for {num_classes} classes")
    image = np.clip(_background(rng, h, w), 0, 255).astype(np.uint8)
    short = min(h, w)
    for _ in range(int(rng.integers(2, 7))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        _paint_shape(image, rng, shape, _muted_colour(rng), rng.uniform(0.06, 0.2) * short)
    colour = list(CLASS_COLOURS.values())[label % len(CLASS_COLOURS)]
    # At least 3 px so the object stays recognisable on tiny images.
    radius = max(rng.uniform(0.12, 0.3) * short, min(3.0, short / 2))
    mask = _paint_shape(image, rng, SHAPES[label % len(SHAPES)], colour, radius)
    return image, mask, label


def generate(n: int, size, seed: int = 0, num_classes: int = 10) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield n samples (image, mask, label); sample i depends only on (seed, i); labels cycle 0..C-1."""
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        yield make_sample(rng, size, num_classes, label=i % num_classes)
