"""The toy world's backgrounds: one distinct procedural texture per background name, uint8 (S, S, 3).

The names are the keys of :data:`layerdiff.data.toy.BACKGROUNDS`, in the same order; every texture is
drawn from the given numpy generator only, so a background depends only on its name, size and seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from layerdiff.errors import LayerDiffError


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    return y / s, x / s  # 0..1, y down


def _lerp(a, b, t: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + (b - a) * t[..., None]


def _blob_alpha(rng, s, y, x, centres_n: int, sigma: tuple[float, float], cy, cx) -> np.ndarray:
    alpha = np.zeros((s, s), np.float32)
    for _ in range(centres_n):
        by, bx = cy + rng.normal(0, 0.04), cx + rng.normal(0, 0.08)
        sg = rng.uniform(*sigma)
        alpha += np.exp(-((y - by) ** 2 + ((x - bx) * 0.7) ** 2) / (2 * sg * sg))
    return np.clip(alpha * 1.6, 0, 1)


def _bg_blue_sky(rng, s):
    y, x = _grid(s)
    img = _lerp((40, 100, 205), (155, 205, 245), y)
    for _ in range(rng.integers(2, 5)):  # clouds: white puffs of Gaussian blobs
        a = _blob_alpha(rng, s, y, x, int(rng.integers(3, 6)), (0.035, 0.07), rng.uniform(0.1, 0.8), rng.uniform(0, 1))
        img = img * (1 - a[..., None]) + np.float32(250) * a[..., None]
    return img


def _bg_green_meadow(rng, s):
    y, _ = _grid(s)
    img = _lerp((95, 170, 60), (60, 135, 40), y) + rng.normal(0, 6, (s, s, 1)).astype(np.float32)
    n = s * s // 6  # grass blades: short vertical strokes of varied greens
    by, bx = rng.integers(0, s, n), rng.integers(0, s, n)
    length = rng.integers(max(2, s // 40), max(4, s // 14), n)
    shade = _lerp((35, 105, 25), (135, 200, 80), rng.random(n).astype(np.float32))
    for d in range(int(length.max())):
        keep = d < length
        img[np.clip(by[keep] - d, 0, s - 1), bx[keep]] = shade[keep]
    return img


def _bg_sandy_beach(rng, s):
    y, x = _grid(s)
    line = rng.uniform(0.28, 0.42) + rng.uniform(0.015, 0.035) * np.sin(2 * np.pi * (x * rng.uniform(1.5, 3) + rng.random()))
    sea = _lerp((25, 95, 160), (60, 160, 190), np.clip(y / 0.45, 0, 1))
    sand = np.asarray((228, 203, 150), np.float32) + rng.normal(0, 9, (s, s, 1)).astype(np.float32)
    sand -= 25 * (rng.random((s, s, 1)) < 0.03)  # darker grains
    img = np.where((y < line)[..., None], sea, sand)
    foam = np.abs(y - line) < max(1.0, s / 80) / s
    img[foam] = (245, 248, 250)
    return img


def _bg_brick_wall(rng, s):
    y, x = _grid(s)
    bh = rng.uniform(1 / 10, 1 / 7)
    bw = bh * rng.uniform(1.8, 2.4)
    mortar = max(1.0, s / 64) / s
    row = np.floor(y / bh).astype(np.int64)
    xs = x + (row % 2) * bw / 2 + rng.random() * bw
    col = np.floor(xs / bw).astype(np.int64)
    jitter = rng.normal(0, 14, (row.max() + 1, col.max() + 1, 1)).astype(np.float32)
    img = np.asarray((165, 65, 45), np.float32) + jitter[row, col] + rng.normal(0, 5, (s, s, 1)).astype(np.float32)
    is_mortar = (np.mod(y, bh) < mortar) | (np.mod(xs, bw) < mortar)
    img[is_mortar] = (195, 188, 175)
    return img


def _bg_wooden_floor(rng, s):
    y, x = _grid(s)
    ph = rng.uniform(1 / 6, 1 / 4.5)
    plank = np.floor(y / ph).astype(np.int64)
    n = int(plank.max()) + 1
    base = np.asarray((170, 118, 62), np.float32) + rng.normal(0, 12, (n, 1)).astype(np.float32)  # (n, 3)
    phase, freq = rng.random(n) * 6.28, rng.uniform(18, 30, n)
    grain = np.sin(2 * np.pi * (y * freq[plank] + 0.25 * np.sin(x * 6 + phase[plank])))
    img = base[plank] + (12 * grain)[..., None]
    seam = np.mod(y, ph) < max(1.0, s / 80) / s
    ends = np.abs(np.mod(x + rng.random(n)[plank], 0.75)) < max(1.0, s / 110) / s
    img[seam | ends] = (85, 55, 30)
    return img


def _bg_snowy_field(rng, s):
    y, x = _grid(s)
    horizon = rng.uniform(0.25, 0.4) + 0.03 * np.sin(2 * np.pi * (x * 1.3 + rng.random()))
    sky = _lerp((185, 198, 215), (215, 222, 232), np.clip(y / 0.4, 0, 1))
    drift = 6 * np.sin(2 * np.pi * (x * rng.uniform(1, 2.5) + y * 3 + rng.random()))
    snow = np.asarray((236, 240, 246), np.float32) + drift[..., None] - (y * 14)[..., None]
    img = np.where((y < horizon)[..., None], sky, snow)
    n = s * s // 60  # falling flakes, 1-2 px
    fy, fx = rng.integers(0, s - 1, n), rng.integers(0, s - 1, n)
    img[fy, fx] = 255
    big = rng.random(n) < 0.3
    img[fy[big] + 1, fx[big]] = 255
    img[fy[big], fx[big] + 1] = 255
    return img


def _bg_night_sky(rng, s):
    y, x = _grid(s)
    img = _lerp((6, 10, 38), (24, 34, 78), y)
    n = s * s // 90
    sy, sx = rng.integers(0, s, n), rng.integers(0, s, n)
    img[sy, sx] = _lerp((160, 160, 170), (255, 250, 225), rng.random(n).astype(np.float32))
    if rng.random() < 0.5:  # a moon
        r, my, mx = rng.uniform(0.05, 0.08), rng.uniform(0.1, 0.3), rng.uniform(0.15, 0.85)
        img[(y - my) ** 2 + (x - mx) ** 2 < r * r] = (235, 232, 205)
    return img


def _bg_checkered_floor(rng, s):
    y, x = _grid(s)
    cell = 1.0 / rng.integers(6, 11)
    odd = (np.floor(y / cell + rng.random()) + np.floor(x / cell + rng.random())) % 2 == 1
    img = np.where(odd[..., None], np.float32(232), np.float32(28)) * np.ones(3, np.float32)
    return img + rng.normal(0, 3, (s, s, 1)).astype(np.float32)


_BACKGROUND_RENDERERS: dict[str, Callable] = {
    "blue sky": _bg_blue_sky,
    "green meadow": _bg_green_meadow,
    "sandy beach": _bg_sandy_beach,
    "brick wall": _bg_brick_wall,
    "wooden floor": _bg_wooden_floor,
    "snowy field": _bg_snowy_field,
    "night sky": _bg_night_sky,
    "checkered floor": _bg_checkered_floor,
}


def render_background(name: str, size: int, rng: np.random.Generator | int = 0) -> np.ndarray:
    """Background texture ``name`` as uint8 (size, size, 3)."""
    if name not in _BACKGROUND_RENDERERS:
        raise LayerDiffError(f"toy background {name!r} is unknown: use one of {', '.join(_BACKGROUND_RENDERERS)}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    img = _BACKGROUND_RENDERERS[name](rng, size)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
