"""The toy world: procedural composable images with exact layers, masks and prompts.

A scene is a textured background and 1-3 flat-coloured shapes that never overlap, listed back to
front. Everything is pure numpy, and sample ``i`` of a dataset depends only on ``(seed, i)``, so
shards can be generated in any order, in parallel or resumed, and always hold the same bytes.

Two steps, usable apart by evaluation code: :func:`sample_prompt_spec` draws *what* is in a scene
(a :class:`ToySpec`, from which the prompts follow), :func:`render_from_spec` draws *where* and
renders it. :func:`render_sample` does both for dataset sample ``(seed, index)``. The background
textures are :mod:`layerdiff.data.toy_backgrounds`; datasets of shards are
:mod:`layerdiff.data.toy_dataset`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from layerdiff.data.format import GREY, LayeredSample
from layerdiff.data.toy_backgrounds import render_background
from layerdiff.errors import LayerDiffError

GENERATOR_VERSION = "toy-v1"

# name -> prompt phrase; each is rendered with its own texture (layerdiff.data.toy_backgrounds)
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
    "render_from_spec", "render_sample", "sample_prompt_spec", "shape_mask",
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
