"""A model-free judge of toy-world layers, for evaluating generated layered images.

Each generated layer is judged on its own pixels and mask by fixed, hand-made classifiers that
know only the toy renderer (``layerdiff/data/toy.py``), never the diffusion model:

- background: a Gaussian naive-Bayes classifier on 59 colour/layout/texture features, fitted on
  the first call to freshly rendered backgrounds (clean, noisy and blurred; seed fixed here);
- colour: the median colour inside the mask, nearest palette entry;
- shape: the mask normalised to its bounding box, best soft IoU against rendered templates of
  each shape at several pixel sizes (the toy draws shapes upright, so no rotation search);
- the object actually drawn in a foreground layer: pixels far from the neutral grey fill;
- background texture fidelity: the background's edge energy relative to the toy world's own
  backgrounds of the prompted class (below).

Images are (H, W, 3) float in 0..1 or uint8 (numpy, PIL, or CPU tensors of that layout).

Texture fidelity. A background's *edge energy* (:func:`edge_energy`) is the mean absolute
difference of luminance (the mean of R, G and B, 0..1) between horizontally and between vertically
neighbouring pixels, averaged over the two directions, computed on the image as 8-bit pixels at its
own size (no resampling: resizing would itself blur or sharpen the detail being measured). The toy
backgrounds' detail is pixel-scale (mortar lines, grass blades, snowflakes and stars of one or two
pixels, sand grains, wood grain, tile edges), and it is exactly this that a blurred or smoothed
background loses, so the edge energy falls with it. :func:`texture_fidelity` divides it by the
mean edge energy of :data:`TEXTURE_REFERENCES` renders of the *prompted* class by the toy renderer
at the same size (:func:`texture_references`: fixed seeds, rendered once per size and then cached),
so a background with the toy world's own amount of detail scores 1.0 on average, a flat one 0,
and the score is comparable across classes whose raw edge energies differ widely. The ratio is
clipped at :data:`TEXTURE_CLIP` (1.5): more edge energy than the toy world's is noise or artefacts,
not fidelity, and one noisy background must not outweigh several flat ones in a mean. Ground-truth
renders score about 1.0 on average and spread around it one by one (a class's renders differ, e.g.
in how many clouds a sky has). It measures the amount of detail, not whether it is the right detail
(which class a background shows is the background classifier's job). Two limits: a blue sky has
almost no pixel-scale detail (its edge energy is mostly its smooth colour gradient), so blurring one
barely lowers its score; and the two smoothest classes (blue sky, snowy field) score above 1 with
even faint pixel noise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from layerdiff.data.toy import BACKGROUNDS, COLOURS, SHAPES, SIZES, shape_mask
from layerdiff.data.toy_backgrounds import render_background
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data")

_FEATURE_SIDE = 32  # images are reduced to this before background features are computed
_TEMPLATE_SIDE = 32  # shape masks are normalised to this square
_JUDGE_SEED = 0x1D6E  # the judge's own renders: a seed no dataset uses by default
OBJECT_THRESHOLD = 0.15  # |pixel - 0.5| above this (any channel) = drawn object, in 0..1 units
# extent / side between small (<= 0.28) and large (>= 0.35): nearer "small", because blur eats the
# tips of large stars but never grows an object
SIZE_THRESHOLD = SIZES["small"][1] + 0.01

TEXTURE_CLIP = 1.5  # texture fidelity above this (more detail than the toy world's) counts as this
TEXTURE_REFERENCES = 64  # renders per background class whose mean edge energy is the reference

__all__ = [
    "TEXTURE_CLIP", "TEXTURE_REFERENCES", "background_features", "classify_background", "classify_colour",
    "classify_position", "classify_shape", "classify_size", "edge_energy", "judge_layers", "mask_iou",
    "object_mask_from_layer", "texture_fidelity", "texture_references",
]


def _as_image(img, name: str = "image") -> np.ndarray:
    """(H, W, 3) float32 in 0..1 from uint8 or float input (numpy, PIL, tensor)."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise LayerDiffError(f"{name} has shape {arr.shape}: give an (H, W, 3) image")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.min() < -0.02 or arr.max() > 1.02:
        raise LayerDiffError(
            f"{name} values span {arr.min():.2f}..{arr.max():.2f}: give floats in 0..1 "
            "(map a -1..1 image with (x + 1) / 2) or uint8"
        )
    return np.clip(arr, 0.0, 1.0)


def _as_mask(mask, name: str = "mask") -> np.ndarray:
    """(H, W) bool from bool, 0..1 float, 0..255 uint8, PIL or (1, H, W)."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    arr = np.asarray(mask)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise LayerDiffError(f"{name} has shape {arr.shape}: give an (H, W) mask")
    if arr.dtype == bool:
        return arr
    if arr.dtype == np.uint8:
        return arr >= 128
    return arr.astype(np.float32) >= 0.5


# ---------------------------------------------------------------------------------------------
# background


def background_features(img) -> np.ndarray:
    """Colour layout (4x4 grid means), colour spread, edge energy and bright/dark fractions."""
    x = _as_image(img, "background")
    small = Image.fromarray(np.rint(x * 255).astype(np.uint8), "RGB").resize((_FEATURE_SIDE,) * 2, Image.BOX)
    s = np.asarray(small, dtype=np.float32) / 255.0  # (32, 32, 3)
    grid = s.reshape(4, 8, 4, 8, 3).mean(axis=(1, 3)).ravel()  # (48,)
    lum = s.mean(-1)
    feats = [grid, s.reshape(-1, 3).std(0),
             [np.abs(np.diff(lum, axis=1)).mean(), np.abs(np.diff(lum, axis=0)).mean()],
             [(lum > 0.85).mean(), (lum < 0.15).mean()],
             np.percentile(lum, [10, 50, 90]),
             [(s[..., 0] - s[..., 2]).mean()]]
    return np.concatenate([np.ravel(f) for f in feats]).astype(np.float64)


def _degrade(img: np.ndarray, rng: np.random.Generator, kind: int) -> np.ndarray:
    if kind == 1:
        return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    if kind == 2:
        pil = Image.fromarray(np.rint(img * 255).astype(np.uint8), "RGB").filter(ImageFilter.BoxBlur(1))
        return np.asarray(pil, dtype=np.float32) / 255.0
    return img


@lru_cache(maxsize=1)
def _background_model(per_class: int = 16) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Fit per-class feature means and variances on the judge's own renders (once, then cached)."""
    rng = np.random.default_rng(_JUDGE_SEED)
    names = list(BACKGROUNDS)
    feats = []
    for name in names:
        rows = []
        for i in range(per_class):
            img = render_background(name, (64, 96, 128)[i % 3], rng).astype(np.float32) / 255.0
            rows.extend(background_features(_degrade(img, rng, kind)) for kind in range(3))
        feats.append(np.stack(rows))
    allf = np.concatenate(feats)
    scale = allf.std(0) + 1e-3
    means = np.stack([(f / scale).mean(0) for f in feats])
    var = np.stack([(f / scale).var(0) for f in feats]) + 0.05  # floor: no feature is trusted blindly
    return names, scale, means, var


def classify_background(img) -> tuple[str, float]:
    """Name of the toy background in ``img`` (H, W, 3) and the posterior probability of that name."""
    names, scale, means, var = _background_model()
    f = background_features(img) / scale
    loglik = -0.5 * (((f - means) ** 2) / var + np.log(var)).sum(1)  # (classes,)
    p = np.exp(loglik - loglik.max())
    p /= p.sum()
    best = int(p.argmax())
    return names[best], float(p[best])


def edge_energy(img) -> float:
    """Mean absolute luminance difference of neighbouring pixels (across and down, averaged), 0..1 units.

    Luminance is the mean of R, G and B of the image as 8-bit pixels, at the image's own size.
    """
    x = _as_image(img, "background")
    if min(x.shape[:2]) < 2:
        raise LayerDiffError(f"background of {x.shape[0]}x{x.shape[1]} px has no neighbouring pixels: give 2x2 or more")
    lum = np.rint(x * 255.0).mean(-1) / 255.0
    return float(0.5 * (np.abs(np.diff(lum, axis=1)).mean() + np.abs(np.diff(lum, axis=0)).mean()))


@lru_cache(maxsize=4)
def texture_references(size: int) -> dict[str, float]:
    """Each toy background's mean edge energy over the judge's own renders at ``size`` px (once per size).

    Render ``i`` of class ``c`` uses the seed ``(judge seed, c, i)``, so the references do not depend on
    which sizes were asked for before.
    """
    out = {}
    for c, name in enumerate(BACKGROUNDS):
        energies = [edge_energy(render_background(name, size, np.random.default_rng([_JUDGE_SEED, c, i])))
                    for i in range(TEXTURE_REFERENCES)]
        out[name] = float(np.mean(energies))
    return out


def texture_fidelity(img, background: str, clip: float | None = TEXTURE_CLIP) -> float:
    """Edge energy of ``img`` over the mean edge energy of toy ``background`` renders at its size.

    1.0: as much pixel-scale detail as the toy world's backgrounds of that class; 0: flat. Clipped
    at ``clip`` (None: the raw ratio). A non-square image is compared with renders at its larger side.
    """
    if background not in BACKGROUNDS:
        raise LayerDiffError(f"toy background {background!r} is unknown: use one of {', '.join(BACKGROUNDS)}")
    x = _as_image(img, "background")
    ratio = edge_energy(x) / texture_references(int(max(x.shape[:2])))[background]
    return ratio if clip is None else min(ratio, float(clip))


# ---------------------------------------------------------------------------------------------
# objects


def object_mask_from_layer(layer_img, threshold: float = OBJECT_THRESHOLD, adaptive: bool = True) -> np.ndarray:
    """(H, W) bool: the object drawn in a foreground layer, i.e. pixels away from the grey 0.5 fill.

    First every pixel with a channel farther than ``threshold`` from 0.5; with ``adaptive``, the
    edge is then put half-way between the grey fill and the object's median colour (where a
    blurred step edge really lies), which keeps small shapes' corners under blur. Isolated single
    pixels (noise) are dropped.
    """
    x = _as_image(layer_img, "layer image")
    rough = np.abs(x - 0.5).max(-1) > threshold
    mask = rough
    if adaptive and rough.any():
        inner = _erode(rough)
        colour = np.median(x[inner if inner.sum() >= 4 else rough], axis=0)
        d = colour - 0.5
        if np.abs(d).max() > threshold:
            t = ((x - 0.5) @ d) / float(d @ d)  # 0 at grey, 1 at the object's colour
            mask = rough & (t > 0.5)
    return mask & (_neighbour_count(mask) > 0)


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1).astype(np.uint8)
    h, w = mask.shape
    return sum(m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - mask


def mask_iou(a, b) -> float:
    """Intersection over union of two masks; 1.0 when both are empty."""
    a, b = _as_mask(a, "mask a"), _as_mask(b, "mask b")
    if a.shape != b.shape:
        raise LayerDiffError(f"masks have shapes {a.shape} and {b.shape}: give masks of one size")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32) / 255.0  # (8, 3)


def classify_colour(layer_img, mask) -> str | None:
    """Palette name nearest to the median colour inside ``mask``; None for an empty mask."""
    x = _as_image(layer_img, "layer image")
    m = _as_mask(mask)
    if m.shape != x.shape[:2]:
        raise LayerDiffError(f"mask is {m.shape} but the layer image is {x.shape[:2]}: give them one size")
    inner = _erode(m)
    use = inner if inner.sum() >= 4 else m  # edges of a blurred object mix with the grey fill
    if not use.any():
        return None
    median = np.median(x[use], axis=0)
    return _PALETTE_NAMES[int(((_PALETTE - median) ** 2).sum(1).argmin())]


def _normalise_to_box(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    pil = Image.fromarray(crop, "L").resize((_TEMPLATE_SIDE,) * 2, Image.BILINEAR)
    return np.asarray(pil, dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def _shape_templates() -> dict[str, list[np.ndarray]]:
    """Each shape rendered by the toy renderer at several pixel sizes and sub-pixel offsets."""
    out: dict[str, list[np.ndarray]] = {}
    for shape in SHAPES:
        temps = []
        for extent in (9, 12, 16, 22, 30, 44, 64, 120):
            for off in (0.0, 0.25, 0.5):
                side = extent + 6
                m = shape_mask(shape, side, side, side / 2 + off, side / 2 + off / 2, extent)
                variants = [m]
                if extent <= 30:  # small shapes as a slightly blurry generator draws them
                    blurred = Image.fromarray(m.astype(np.uint8) * 255, "L").filter(ImageFilter.BoxBlur(1))
                    variants.append(np.asarray(blurred) >= 128)
                temps.extend(t for t in map(_normalise_to_box, variants) if t is not None)
        out[shape] = temps
    return out


def shape_scores(mask) -> dict[str, float]:
    """Best soft IoU of the normalised mask against each shape's templates."""
    norm = _normalise_to_box(_as_mask(mask))
    if norm is None:
        return {s: 0.0 for s in SHAPES}
    scores = {}
    for shape, temps in _shape_templates().items():
        scores[shape] = max(float(np.minimum(norm, t).sum() / max(np.maximum(norm, t).sum(), 1e-6)) for t in temps)
    return scores


def classify_shape(mask) -> str | None:
    """Toy shape name whose templates best match ``mask``; None for an empty mask."""
    m = _as_mask(mask)
    if m.sum() < 4:
        return None
    scores = shape_scores(m)
    return max(scores, key=scores.get)


def classify_size(mask) -> str | None:
    """"small" or "large" from the bounding box's larger side relative to the image side."""
    m = _as_mask(mask)
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return None
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / max(m.shape)
    return "small" if extent < SIZE_THRESHOLD else "large"


def classify_position(mask, tolerance: float = 0.04) -> set[str]:
    """Every toy position word that the mask's bounding-box centre satisfies (with a tolerance)."""
    m = _as_mask(mask)
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return set()
    h, w = m.shape
    cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
    found = set()
    if cx <= 0.36 + tolerance:
        found.add("left")
    if cx >= 0.64 - tolerance:
        found.add("right")
    if cy <= 0.36 + tolerance:
        found.add("top")
    if cy >= 0.64 - tolerance:
        found.add("bottom")
    if abs(cx - 0.5) <= 0.08 + tolerance and abs(cy - 0.5) <= 0.08 + tolerance:
        found.add("centre")
    return found


def judge_layers(background, foregrounds: Sequence, masks: Sequence, labels: Mapping) -> dict:
    """Judge one generated layered image against toy labels (``sample.extra`` of a toy sample).

    ``masks`` are the generated masks; shape, colour, size and position are read from the object
    actually drawn in each layer, and ``mask_iou`` compares the generated mask with that object.
    """
    objects = labels["objects"]
    if len(foregrounds) != len(objects) or len(masks) != len(objects):
        raise LayerDiffError(
            f"{len(foregrounds)} foregrounds and {len(masks)} masks for {len(objects)} labelled objects: give one each"
        )
    bg_name, bg_conf = classify_background(background)
    layers = []
    for fg, mask, label in zip(foregrounds, masks, objects):
        drawn = object_mask_from_layer(fg)
        shape, colour = classify_shape(drawn), classify_colour(fg, drawn)
        size = classify_size(drawn)
        positions = classify_position(drawn)
        layers.append({
            "shape": shape, "shape_ok": shape == label["shape"],
            "colour": colour, "colour_ok": colour == label["colour"],
            "size": size, "size_ok": size == label["size"],
            "position_ok": label.get("position") is None or label["position"] in positions,
            "mask_iou": mask_iou(_as_mask(mask), drawn),
        })
    return {"background": bg_name, "background_confidence": bg_conf,
            "background_ok": bg_name == labels["background"],
            "texture_fidelity": texture_fidelity(background, labels["background"]), "layers": layers}
