"""The toy world: procedural composable images with exact layers, masks and prompts.

A scene is a textured background and 1-3 flat-coloured shapes that never overlap, listed back to
front. Everything is pure numpy, and sample ``i`` of a dataset depends only on ``(seed, i)``, so
shards can be generated in any order, in parallel or resumed, and always hold the same bytes.

Two steps, usable apart by evaluation code: :func:`sample_prompt_spec` draws *what* is in a scene
(a :class:`ToySpec`, from which the prompts follow), :func:`render_from_spec` draws *where* and
renders it. :func:`render_sample` does both for dataset sample ``(seed, index)``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from layerdiff.data.format import GREY, LayeredSample, list_shards, shard_path, write_shard
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data")

GENERATOR_VERSION = "toy-v1"
SHARD_PREFIX = "toy"
MANIFEST_NAME = "toy_manifest.json"

# name -> prompt phrase; each is rendered with its own texture by _BACKGROUND_RENDERERS below
BACKGROUNDS: dict[str, str] = {
    "blue sky": "a blue sky",
    "green meadow": "a green meadow",
    "sandy beach": "a sandy beach",
    "brick wall": "a brick wall",
    "wooden floor": "a wooden floor",
    "snowy field": "a snowy field",
    "night sky": "a night sky",
    "checkered floor": "a checkered floor",
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
# Object colours: far apart from each other and from the grey fill (128, 128, 128).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 125, 5),
    "yellow": (250, 225, 30),
    "green": (30, 165, 50),
    "blue": (35, 75, 225),
    "purple": (145, 45, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.18, 0.28), "large": (0.35, 0.50)}  # extent / image side
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
DEFAULT_LAYER_PROBS: dict[int, float] = {2: 1.0, 3: 1.0, 4: 1.0}
DEFAULT_POSITION_PROB = 0.4  # chance that an object's position is constrained and named

__all__ = [
    "BACKGROUNDS", "COLOURS", "POSITIONS", "SHAPES", "SIZES", "ToyObject", "ToySpec",
    "generate_toy_dataset", "render_background", "render_from_spec", "render_sample",
    "sample_prompt_spec", "shape_mask",
]


# ---------------------------------------------------------------------------------------------
# prompt specs


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    position: str | None = None  # a key of POSITIONS, or None for anywhere (not named)

    def __post_init__(self):
        for what, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                     ("size", self.size, SIZES)):
            if value not in allowed:
                raise LayerDiffError(f"toy object {what} {value!r} is unknown: use one of {', '.join(allowed)}")
        if self.position is not None and self.position not in POSITIONS:
            raise LayerDiffError(f"toy object position {self.position!r} is unknown: use None or one of {', '.join(POSITIONS)}")

    @property
    def phrase(self) -> str:
        text = f"a {self.size} {self.colour} {self.shape}"
        return f"{text} {POSITIONS[self.position]}" if self.position else text


@dataclass(frozen=True)
class ToySpec:
    """What a toy scene holds: a background and objects, back to front."""

    background: str
    objects: tuple[ToyObject, ...]

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise LayerDiffError(f"toy background {self.background!r} is unknown: use one of {', '.join(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 3:
            raise LayerDiffError(f"a toy scene has {len(self.objects)} objects: use 1 to 3")
        object.__setattr__(self, "objects", tuple(self.objects))

    @property
    def num_layers(self) -> int:
        return 1 + len(self.objects)

    @property
    def layer_prompts(self) -> list[str]:
        return [BACKGROUNDS[self.background], *(o.phrase for o in self.objects)]

    @property
    def global_prompt(self) -> str:
        phrases = [o.phrase for o in self.objects]
        things = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{things} in front of {BACKGROUNDS[self.background]}"

    def to_dict(self) -> dict:
        return {"background": self.background,
                "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position}
                            for o in self.objects]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ToySpec:
        return cls(d["background"], tuple(ToyObject(o["shape"], o["colour"], o["size"], o.get("position"))
                                          for o in d["objects"]))


def _normalise_layer_probs(layer_probs: Mapping[int, float] | None) -> tuple[np.ndarray, np.ndarray]:
    probs = dict(DEFAULT_LAYER_PROBS if layer_probs is None else layer_probs)
    bad = [k for k in probs if k not in (2, 3, 4)]
    if bad or not probs:
        raise LayerDiffError(f"layer counts {bad or '(none)'} are not possible in the toy world: use 2, 3 or 4 layers")
    if any(w < 0 for w in probs.values()) or sum(probs.values()) <= 0:
        raise LayerDiffError(f"layer count weights {probs} must be non-negative with a positive sum")
    counts = np.array(sorted(probs), dtype=np.int64)
    w = np.array([probs[int(c)] for c in counts], dtype=np.float64)
    return counts, w / w.sum()


def sample_prompt_spec(rng: np.random.Generator, num_layers: int | None = None,
                       layer_probs: Mapping[int, float] | None = None,
                       position_prob: float = DEFAULT_POSITION_PROB) -> ToySpec:
    """Draw a scene: background, 1-3 objects with distinct (shape, colour), optional distinct positions."""
    if num_layers is None:
        counts, p = _normalise_layer_probs(layer_probs)
        num_layers = int(rng.choice(counts, p=p))
    if num_layers not in (2, 3, 4):
        raise LayerDiffError(f"num_layers {num_layers} is not possible in the toy world: use 2, 3 or 4")
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    pairs = rng.choice(len(SHAPES) * len(COLOURS), size=num_layers - 1, replace=False)
    free_positions = list(POSITIONS)
    objects = []
    for pair in pairs:
        shape, colour = SHAPES[pair // len(COLOURS)], list(COLOURS)[pair % len(COLOURS)]
        size = "small" if rng.random() < 0.5 else "large"
        position = None
        if rng.random() < position_prob:
            position = free_positions.pop(int(rng.integers(len(free_positions))))
        objects.append(ToyObject(shape, colour, size, position))
    return ToySpec(background, tuple(objects))


# ---------------------------------------------------------------------------------------------
# shapes: exact binary masks, axis-aligned, bounding box centred with its larger side = extent


def _unit_polygon(points: np.ndarray) -> np.ndarray:
    """Centre a polygon's bounding box at 0 and scale its larger side to 2 (unit half-extent)."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) * (2.0 / (hi - lo).max())


def _polygons() -> dict[str, np.ndarray]:
    tri = np.array([[0.0, -np.sqrt(3) / 2], [1.0, np.sqrt(3) / 2], [-1.0, np.sqrt(3) / 2]])
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5  # point up, y grows downwards
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    star = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    return {"triangle": _unit_polygon(tri), "star": _unit_polygon(star)}


_POLYGONS = _polygons()
_CROSS_ARM = 0.34  # half-width of a cross arm, in half-extents
_HEART_HALF, _HEART_MID = 1.139, 0.118  # half-width and vertical bbox centre of the implicit heart


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of points (x, y) against polygon (N, 2)."""
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    xj, yj = poly[-1]
    for xi, yi in poly:
        crosses = (yi > y) != (yj > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (xj - xi) * (y - yi) / (yj - yi) + xi
        inside ^= crosses & (x < x_at)
        xj, yj = xi, yi
    return inside


def _unit_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "heart":  # the implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3, y up; bbox x +-1.139, y -1..1.236
        x, y = u * _HEART_HALF, _HEART_MID - v * _HEART_HALF
        r = x * x + y * y - 1.0
        return r * r * r <= x * x * y * y * y
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_ARM) & (av <= 1.0)) | ((av <= _CROSS_ARM) & (au <= 1.0))
    return _inside_polygon(u, v, _POLYGONS[shape])


def shape_mask(shape: str, height: int, width: int, cx: float, cy: float, extent: float) -> np.ndarray:
    """Binary (H, W) mask of ``shape`` centred at pixel coords (cx, cy), larger bbox side ``extent``.

    A pixel belongs to the shape when its centre does: no anti-aliasing, so masks are exact.
    """
    if shape not in SHAPES:
        raise LayerDiffError(f"shape {shape!r} is unknown: use one of {', '.join(SHAPES)}")
    h = extent / 2.0
    x0, x1 = max(0, int(np.floor(cx - h)) - 1), min(width, int(np.ceil(cx + h)) + 1)
    y0, y1 = max(0, int(np.floor(cy - h)) - 1), min(height, int(np.ceil(cy + h)) + 1)
    mask = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    v, u = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    mask[y0:y1, x0:x1] = _unit_shape(shape, (u + 0.5 - cx) / h, (v + 0.5 - cy) / h)
    return mask


# ---------------------------------------------------------------------------------------------
# backgrounds: distinct textures, uint8 (S, S, 3)


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
        raise LayerDiffError(f"toy background {name!r} is unknown: use one of {', '.join(BACKGROUNDS)}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    img = _BACKGROUND_RENDERERS[name](rng, size)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# placement and rendering

# allowed object centres per position, as fractions of the image side: (x_lo, x_hi, y_lo, y_hi)
_REGIONS: dict[str | None, tuple[float, float, float, float]] = {
    None: (0.0, 1.0, 0.0, 1.0),
    "left": (0.0, 0.36, 0.0, 1.0),
    "right": (0.64, 1.0, 0.0, 1.0),
    "top": (0.0, 1.0, 0.0, 0.36),
    "bottom": (0.0, 1.0, 0.64, 1.0),
    "centre": (0.42, 0.58, 0.42, 0.58),
}
_PLACEMENT_TRIES = 60  # candidate positions per object before the whole layout is redrawn


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 box, through an integral image."""
    c = np.pad(mask.astype(np.int32), ((r + 1, r), (r + 1, r))).cumsum(0).cumsum(1)
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) > 0


def _place(spec: ToySpec, size: int, rng: np.random.Generator):
    """Non-overlapping layout (with a margin) by rejection sampling; None when it fails."""
    margin = max(1, round(size / 32))
    blocked = np.zeros((size, size), dtype=bool)  # placed masks, dilated by the margin
    placed = []
    for obj in spec.objects:
        lo, hi = SIZES[obj.size]
        xl, xh, yl, yh = _REGIONS[obj.position]
        for _ in range(_PLACEMENT_TRIES):
            extent = rng.uniform(lo, hi) * size
            h = extent / 2 + 1  # keep the whole object inside the image
            x_lo, x_hi = max(xl * size, h), min(xh * size, size - h)  # region, kept inside the image
            y_lo, y_hi = max(yl * size, h), min(yh * size, size - h)
            cx, cy = rng.uniform(x_lo, max(x_hi, x_lo)), rng.uniform(y_lo, max(y_hi, y_lo))
            if blocked[int(cy), int(cx)]:  # every toy shape covers its centre: a cheap early reject
                continue
            mask = shape_mask(obj.shape, size, size, cx, cy, extent)
            if not (mask & blocked).any():
                placed.append((mask, cx, cy, extent))
                blocked |= _dilate(mask, margin)
                break
        else:
            return None
    return placed


def _render(spec: ToySpec, size: int, rng: np.random.Generator, key: str, restarts: int,
            extra: dict | None = None) -> LayeredSample | None:
    for _ in range(restarts):
        placed = _place(spec, size, rng)
        if placed is not None:
            break
    else:
        return None
    background = render_background(spec.background, size, rng)
    foregrounds, masks, labels = [], [], []
    for obj, (mask, cx, cy, extent) in zip(spec.objects, placed):
        fg = np.empty((size, size, 3), dtype=np.uint8)
        fg[:] = GREY
        fg[mask] = COLOURS[obj.colour]  # flat colour: exactly the palette value inside the mask
        ys, xs = np.nonzero(mask)
        foregrounds.append(Image.fromarray(fg, "RGB"))
        masks.append(Image.fromarray(mask.astype(np.uint8) * 255, "L"))
        labels.append({"shape": obj.shape, "colour": obj.colour, "size": obj.size, "position": obj.position,
                       "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                       "centre": [round(float(cx), 2), round(float(cy), 2)], "extent": round(float(extent), 2)})
    return LayeredSample(
        key=key,
        global_prompt=spec.global_prompt,
        layer_prompts=spec.layer_prompts,
        background=Image.fromarray(background, "RGB"),
        foregrounds=foregrounds,
        masks=masks,
        source="toy",
        extra={"generator": GENERATOR_VERSION, "background": spec.background, "objects": labels, **(extra or {})},
    )


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 32:
        raise LayerDiffError(f"toy image size {size!r} is too small: use 32 or more (128 is the default)")


def render_from_spec(spec: ToySpec, size: int = 128, rng: np.random.Generator | int | None = 0,
                     key: str = "toy-spec") -> LayeredSample:
    """Lay out and render a given scene (for evaluation ground truth); deterministic for an int ``rng``."""
    _check_size(size)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    sample = _render(spec, size, rng, key, restarts=30)
    if sample is None:
        raise LayerDiffError(
            f"the toy scene {spec.global_prompt!r} cannot be laid out without overlaps at size {size}: "
            "use fewer or smaller objects, or fewer position constraints"
        )
    return sample


def sample_key(seed: int, index: int) -> str:
    return f"toy-{seed}-{index:08d}"


def render_sample(seed: int, index: int, size: int = 128, num_layers: int | None = None,
                  layer_probs: Mapping[int, float] | None = None,
                  position_prob: float = DEFAULT_POSITION_PROB) -> LayeredSample:
    """Dataset sample ``index`` of the toy world with ``seed``: depends only on its arguments."""
    _check_size(size)
    if seed < 0 or index < 0:
        raise LayerDiffError(f"seed {seed} and index {index} must be 0 or more")
    rng = np.random.default_rng([seed, index])
    if num_layers is None:  # drawn once: redrawing it with the scene would favour easy (fewer-layer) scenes
        counts, p = _normalise_layer_probs(layer_probs)
        num_layers = int(rng.choice(counts, p=p))
    for _ in range(50):  # an unplaceable scene is redrawn; rare, and deterministic like the rest
        spec = sample_prompt_spec(rng, num_layers=num_layers, position_prob=position_prob)
        sample = _render(spec, size, rng, sample_key(seed, index), restarts=3, extra={"seed": seed, "index": index})
        if sample is not None:
            return sample
    raise RuntimeError(f"toy sample ({seed}, {index}) could not be laid out at size {size}")


# ---------------------------------------------------------------------------------------------
# dataset generation

_counter = None  # shared sample counter in pool workers (for the progress bar)


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def _tick_shared_counter() -> None:
    with _counter.get_lock():
        _counter.value += 1


def _write_toy_shard(job: tuple, tick: Callable[[], None] | None = None) -> str:
    out_dir, shard, start, stop, seed, size, layer_probs, position_prob, overwrite = job

    def samples():
        for i in range(start, stop):
            yield render_sample(seed, i, size, layer_probs=layer_probs, position_prob=position_prob)
            if tick is not None:
                tick()

    path = shard_path(out_dir, SHARD_PREFIX, shard)
    write_shard(path, samples(), overwrite=overwrite)
    return str(path)


def _pool_job(job: tuple) -> str:
    return _write_toy_shard(job, _tick_shared_counter if _counter is not None else None)


def _remove_temp_files(out_dir: Path, shard_ids) -> None:
    for i in shard_ids:
        for tmp in out_dir.glob(f".{shard_path(out_dir, SHARD_PREFIX, i).name}.*.tmp"):
            logger.info("removing leftover temporary file %s", tmp)
            tmp.unlink(missing_ok=True)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_output_dir(out_dir, overwrite: bool = False, resume: bool = False) -> list[Path]:
    """Refuse a folder that already holds shards unless ``overwrite`` or ``resume``; return its shards."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayerDiffError(f"--out {str(out)!r} is a file: give a folder for the shards")
    existing = list_shards(out) if out.is_dir() else []
    if existing and not (overwrite or resume):
        raise LayerDiffError(
            f"--out {str(out)!r} already holds {len(existing)} shards ({existing[0].name}, ...): pass --overwrite "
            "to replace them, --resume to finish an interrupted run, or choose an empty folder"
        )
    return existing


def generate_toy_dataset(out_dir, samples: int, seed: int = 0, size: int = 128, samples_per_shard: int = 1000,
                         workers: int = 2, overwrite: bool = False, layer_probs: Mapping[int, float] | None = None,
                         position_prob: float = DEFAULT_POSITION_PROB, resume: bool = False,
                         progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write ``samples`` toy samples into ``out_dir/toy-NNNNNN.tar`` shards, one process per shard.

    An ``out_dir`` that already holds shards is refused unless ``overwrite`` (regenerate; shards of
    an older run that are not rewritten are removed) or ``resume`` (keep the complete shards of an
    interrupted run with the same settings, write the missing ones). ``progress(n)`` is called with
    each batch of newly finished samples. Returns every shard path of the dataset.
    """
    if not isinstance(samples, int) or samples < 1:
        raise LayerDiffError(f"--samples {samples!r} must be a positive number of samples")
    if not isinstance(size, int) or size < 32 or size % 8:
        raise LayerDiffError(f"--size {size!r} must be a multiple of 8 and at least 32 (e.g. 64 or 128)")
    if samples_per_shard < 1:
        raise LayerDiffError(f"--samples-per-shard {samples_per_shard} must be at least 1")
    if seed < 0:
        raise LayerDiffError(f"--seed {seed} must be 0 or more")
    if not 0.0 <= position_prob <= 1.0:
        raise LayerDiffError(f"position_prob {position_prob} must lie in 0..1")
    if overwrite and resume:
        raise LayerDiffError("--overwrite and --resume contradict each other: pass only one")
    counts, probs = _normalise_layer_probs(layer_probs)
    layer_probs = {int(c): float(p) for c, p in zip(counts, probs)}
    out = Path(out_dir)
    existing = check_output_dir(out, overwrite=overwrite, resume=resume)
    out.mkdir(parents=True, exist_ok=True)

    n_shards = -(-samples // samples_per_shard)
    manifest = {"generator": GENERATOR_VERSION, "samples": samples, "seed": seed, "size": size,
                "samples_per_shard": samples_per_shard, "shards": n_shards,
                "layer_probs": {str(k): v for k, v in layer_probs.items()}, "position_prob": position_prob}
    todo = list(range(n_shards))
    if resume and existing:
        try:
            old = json.loads((out / MANIFEST_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != manifest:
            diff = "no readable manifest" if old is None else ", ".join(
                f"{k} {old.get(k)!r} -> {v!r}" for k, v in manifest.items() if old.get(k) != v)
            raise LayerDiffError(
                f"--resume: {str(out)!r} was generated with other settings ({diff}): rerun with the same settings "
                "or pass --overwrite"
            )
        todo = [i for i in todo if not shard_path(out, SHARD_PREFIX, i).exists()]
        if progress is not None:
            progress(sum(min(samples_per_shard, samples - i * samples_per_shard) for i in range(n_shards) if i not in todo))
    _remove_temp_files(out, todo)
    _write_json_atomic(out / MANIFEST_NAME, manifest)

    jobs = [(str(out), i, i * samples_per_shard, min(samples, (i + 1) * samples_per_shard), seed, size,
             layer_probs, position_prob, overwrite) for i in todo]
    t0 = time.perf_counter()
    workers = max(1, min(workers, len(jobs)))
    try:
        if workers == 1:
            _run_inline(jobs, progress)
        else:
            _run_pool(jobs, workers, progress)
    except BaseException:
        _remove_temp_files(out, todo)  # workers killed mid-shard leave only temporary files
        raise
    paths = [shard_path(out, SHARD_PREFIX, i) for i in range(n_shards)]
    if overwrite:
        for stale in set(existing) - set(paths):
            logger.info("removing shard %s of an earlier run", stale)
            stale.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    done = sum(j[3] - j[2] for j in jobs)
    logger.info("toy: %d samples in %d shards in %.1f s (%.0f samples/s)", done, len(jobs), dt, done / max(dt, 1e-9))
    return paths


def _run_inline(jobs, progress) -> None:
    for job in jobs:
        _write_toy_shard(job, (lambda: progress(1)) if progress is not None else None)


# Workers only run numpy and PIL, so fork is safe even when the parent has loaded torch, and unlike
# spawn it does not re-import the caller's __main__ (a stdin script would make a spawn pool respawn
# failing workers forever). Elsewhere spawn is the only sound choice.
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def _run_pool(jobs, workers: int, progress) -> None:
    ctx = mp.get_context(_START_METHOD)
    counter = ctx.Value("q", 0)
    reported = 0
    with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
        result = pool.map_async(_pool_job, jobs, chunksize=1)
        while not result.ready():
            result.wait(0.25)
            if progress is not None and counter.value > reported:
                now = counter.value
                progress(now - reported)
                reported = now
        result.get()  # re-raises a worker's exception
    if progress is not None and counter.value > reported:
        progress(counter.value - reported)
