"""Evaluation metrics: what is judged on one generated stack, and how the judgements add up.

A generated stack is judged by :mod:`layerdiff.evaluation.judge`, which knows only the toy
renderer, never the model. A generated foreground mask is the decoded soft mask > 0.5
(:data:`MASK_THRESHOLD`), taken per layer (no front-first overlap resolution, so one layer's mask
never depends on another's):

- ``background_accuracy``: ``classify_background(layer 0)`` names the prompted background;
- ``texture_fidelity``: ``texture_fidelity(layer 0, prompted background)``, the background's edge
  energy over that of the toy world's own backgrounds of the prompted class at the same size,
  clipped at 1.5 (1.0: as much pixel-scale detail as the toy world's; see
  :mod:`layerdiff.evaluation.judge`);
- ``colour_accuracy``: the median colour of the layer image inside its generated mask is the
  prompted palette colour; ``shape_accuracy``: the generated mask's shape is the prompted one;
  ``size_accuracy`` and ``position_accuracy`` (objects with a named position only) likewise;
  this is what the composite shows: the layer's pixels through its mask;
- ``mask_iou``: IoU of the generated mask with the object actually drawn in the layer image
  (``object_mask_from_layer``: the pixels away from the grey fill); an empty generated mask
  scores 0, not the 1.0 that two empty masks would give;
- ``overlap_fraction``: composites in which two foreground masks overlap by more than
  :data:`OVERLAP_TOLERANCE` (1%) of the smaller mask's area (masks of the training data never
  touch); a 2-layer composite has one foreground and never overlaps;
- ``empty_mask_rate``: foregrounds whose mask covers fewer than :func:`min_mask_area` pixels
  (these fail colour, shape, size and position);
- ``scene_accuracy``: composites with the right background and every foreground's colour and
  shape right.

Rates are means over composites (background, texture, overlap, scene) or over foregrounds (the
rest) (:func:`summarise`). :func:`breakdown` gives the same judgements over all layer counts per
prompted word: per shape, colour, size, position and background class. ``smg_minus_cfg`` is SMG
minus CFG per metric; ``smg_minus_cfg_stderr`` the standard error of that difference, paired over
identical prompts and seeds (:func:`compare_variants`).

The targets (for the trained built-in model, on >= 200 samples) are in :data:`TARGETS`, with
:data:`SHAPE_FLOOR` for each shape's accuracy over all layer counts; :func:`check_targets` says
which ones a run meets, per variant and layer count. "SMG at least as good as CFG" is given both
``strict`` (no metric worse) and ``within_noise`` (no metric worse by more than two paired standard
errors). The overall ``all`` uses the model's default variant (``primary``: SMG when the model's
sampler has self-mask guidance on, else CFG): every target for every layer count, every shape above
the floor, >= 200 samples and, when that variant is SMG, SMG within noise of CFG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from layerdiff.data.toy import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, ToySpec
from layerdiff.errors import LayerDiffError
from layerdiff.evaluation.judge import (
    classify_background,
    classify_colour,
    classify_position,
    classify_shape,
    classify_size,
    mask_iou,
    object_mask_from_layer,
    texture_fidelity,
)

MASK_THRESHOLD = 0.5
OVERLAP_TOLERANCE = 0.01  # overlap > 1% of the smaller mask's area = overlapping foregrounds

# metric -> (direction, threshold); direction ">=" means higher is better
TARGETS: dict[str, tuple[str, float]] = {
    "background_accuracy": (">=", 0.92),
    "texture_fidelity": (">=", 0.70),
    "colour_accuracy": (">=", 0.92),
    "shape_accuracy": (">=", 0.85),
    "size_accuracy": (">=", 0.92),
    "position_accuracy": (">=", 0.85),
    "mask_iou": (">=", 0.87),
    "overlap_fraction": ("<=", 0.03),
    "empty_mask_rate": ("<=", 0.01),
}
SHAPE_FLOOR = 0.75  # every shape's accuracy, over all layer counts
TARGET_MIN_SAMPLES = 200
# every reported metric: (name, unit it averages over, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("background_accuracy", "composite", True),
    ("texture_fidelity", "composite", True),
    ("colour_accuracy", "foreground", True),
    ("shape_accuracy", "foreground", True),
    ("size_accuracy", "foreground", True),
    ("position_accuracy", "positioned foreground", True),
    ("mask_iou", "foreground", True),
    ("overlap_fraction", "composite", False),
    ("empty_mask_rate", "foreground", False),
    ("scene_accuracy", "composite", True),
)
VARIANTS = ("cfg", "smg")
# breakdown group -> (the prompted words in vocabulary order, the metrics reported per word)
BREAKDOWNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shape": (SHAPES, ("shape_accuracy", "mask_iou")),
    "colour": (tuple(COLOURS), ("colour_accuracy", "mask_iou")),
    "size": (tuple(SIZES), ("size_accuracy",)),
    "position": (tuple(POSITIONS), ("position_accuracy",)),
    "background": (tuple(BACKGROUNDS), ("background_accuracy", "texture_fidelity")),
}

__all__ = [
    "BREAKDOWNS", "MASK_THRESHOLD", "METRICS", "OVERLAP_TOLERANCE", "SHAPE_FLOOR", "TARGETS", "TARGET_MIN_SAMPLES", "VARIANTS",
    "breakdown", "check_targets", "compare_variants", "judge_sample", "judge_stack", "mask_overlap", "metric_values",
    "min_mask_area", "paired_stderr", "summarise",
]


# ---------------------------------------------------------------------------------------------
# one stack


def min_mask_area(height: int, width: int) -> int:
    """Masks with fewer pixels than this count as empty: 0.1% of the image, at least 4 pixels."""
    return max(4, math.ceil(0.001 * height * width))


def mask_overlap(masks: np.ndarray) -> float:
    """Largest pairwise overlap of hard masks (K, H, W), as a fraction of the smaller mask's area
    (0 when fewer than two masks are non-empty)."""
    masks = np.asarray(masks, dtype=bool)
    areas = masks.reshape(len(masks), -1).sum(1)
    worst = 0.0
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            smaller = min(areas[a], areas[b])
            if smaller:
                worst = max(worst, float(np.logical_and(masks[a], masks[b]).sum() / smaller))
    return worst


def judge_sample(images: np.ndarray, masks: np.ndarray, spec: ToySpec) -> dict:
    """Judge one generated stack: images (L, H, W, 3) in 0..1, soft masks (L-1, H, W) in 0..1."""
    images, masks = np.asarray(images, dtype=np.float32), np.asarray(masks, dtype=np.float32)
    L = spec.num_layers
    if images.shape[0] != L or masks.shape[0] != L - 1:
        raise LayerDiffError(f"a stack of {images.shape[0]} layers and {masks.shape[0]} masks for a {L}-layer scene")
    hard = masks > MASK_THRESHOLD
    min_area = min_mask_area(*hard.shape[1:])
    background = classify_background(images[0])[0]
    layers = []
    for k, obj in enumerate(spec.objects):
        img, m = images[k + 1], hard[k]
        area = int(m.sum())
        empty = area < min_area
        colour = None if empty else classify_colour(img, m)
        shape = None if empty else classify_shape(m)
        size = None if empty else classify_size(m)
        positions = set() if empty else classify_position(m)
        drawn = object_mask_from_layer(img)
        layers.append({
            "prompted": {"shape": obj.shape, "colour": obj.colour, "size": obj.size, "position": obj.position},
            "colour": colour, "colour_ok": colour == obj.colour,
            "shape": shape, "shape_ok": shape == obj.shape,
            "size": size, "size_ok": size == obj.size,
            "position_ok": None if obj.position is None else obj.position in positions,
            "mask_iou": 0.0 if empty else mask_iou(m, drawn),
            "mask_area": area, "empty": empty,
        })
    overlap = mask_overlap(hard)
    return {
        "layers_count": L,
        "prompted_background": spec.background,
        "background": background, "background_ok": background == spec.background,
        "texture_fidelity": texture_fidelity(images[0], spec.background),
        "foregrounds": layers,
        "max_overlap": round(overlap, 4), "overlap": overlap > OVERLAP_TOLERANCE,
        "scene_ok": background == spec.background and all(f["colour_ok"] and f["shape_ok"] for f in layers),
    }


def judge_stack(stack, specs: Sequence[ToySpec]) -> list[dict]:
    """Judge every sample of a LayerStack (soft or hard masks) against its scene."""
    if stack.batch_size != len(specs):
        raise LayerDiffError(f"a batch of {stack.batch_size} stacks for {len(specs)} scenes: give one scene each")
    images = stack.images.float().cpu().numpy()
    masks = stack.masks.float().cpu().numpy()
    return [judge_sample(images[b], masks[b], spec) for b, spec in enumerate(specs)]

# ---------------------------------------------------------------------------------------------
# over many stacks


def _composite_values(records: Sequence[dict]) -> dict[str, np.ndarray]:
    c = lambda key: np.array([float(r[key]) for r in records], dtype=np.float64)  # noqa: E731
    return {
        "background_accuracy": c("background_ok"),
        "texture_fidelity": c("texture_fidelity"),
        "overlap_fraction": c("overlap"),
        "scene_accuracy": c("scene_ok"),
    }


def _foreground_values(fgs: Sequence[dict]) -> dict[str, np.ndarray]:
    f = lambda key: np.array([float(x[key]) for x in fgs], dtype=np.float64)  # noqa: E731
    return {
        "colour_accuracy": f("colour_ok"),
        "shape_accuracy": f("shape_ok"),
        "size_accuracy": f("size_ok"),
        "position_accuracy": np.array([float(x["position_ok"]) for x in fgs if x["position_ok"] is not None]),
        "mask_iou": f("mask_iou"),
        "empty_mask_rate": f("empty"),
    }


def metric_values(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-item values of every metric, in record order (so two variants pair up item by item)."""
    values = {**_composite_values(records), **_foreground_values([f for r in records for f in r["foregrounds"]])}
    return {m: values[m] for m, _, _ in METRICS}


def paired_stderr(d: np.ndarray) -> float | None:
    """Standard error of the mean of paired differences ``d`` (None for fewer than two pairs)."""
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None


def _groups(records: Sequence[dict]) -> dict[str, list[dict]]:
    counts = sorted({r["layers_count"] for r in records})
    out = {str(n): [r for r in records if r["layers_count"] == n] for n in counts}
    out["all"] = list(records)
    return out


def _mean(v: np.ndarray) -> float | None:
    return round(float(v.mean()), 4) if len(v) else None


def summarise(records: Sequence[dict]) -> dict[str, dict]:
    """{"2": {...}, "3": {...}, "4": {...}, "all": {...}}: every metric, plus sample counts."""
    out = {}
    for name, group in _groups(records).items():
        values = metric_values(group)
        out[name] = {"samples": len(group), "foregrounds": sum(len(r["foregrounds"]) for r in group),
                     **{m: _mean(values[m]) for m, _, _ in METRICS}}
    return out


def breakdown(records: Sequence[dict]) -> dict[str, dict]:
    """Over all layer counts, per prompted word: the metrics that judge it (:data:`BREAKDOWNS`).

    {"shape": {"circle": {"foregrounds", "shape_accuracy", "mask_iou"}, ...}, "colour", "size",
    "position" (foregrounds whose prompt names one) likewise, "background": {"blue sky":
    {"samples", "background_accuracy", "texture_fidelity"}, ...}}; words no scene prompted are left out.
    """
    fgs = [f for r in records for f in r["foregrounds"]]
    out: dict[str, dict] = {}
    for group, (words, names) in BREAKDOWNS.items():
        out[group] = {}
        for word in words:
            if group == "background":
                chosen = [r for r in records if r["prompted_background"] == word]
                values, count = _composite_values(chosen), {"samples": len(chosen)}
            else:
                chosen = [f for f in fgs if f["prompted"][group] == word]
                values, count = _foreground_values(chosen), {"foregrounds": len(chosen)}
            if chosen:
                out[group][word] = {**count, **{m: _mean(values[m]) for m in names}}
    return out


def compare_variants(cfg_records: Sequence[dict], smg_records: Sequence[dict]) -> tuple[dict, dict]:
    """(SMG minus CFG, its paired standard error) per layer count and metric; records pair by position."""
    if len(cfg_records) != len(smg_records):
        raise LayerDiffError(f"{len(cfg_records)} CFG and {len(smg_records)} SMG results: they must pair up")
    diff, stderr = {}, {}
    cfg_groups, smg_groups = _groups(cfg_records), _groups(smg_records)
    for name in cfg_groups:
        a, b = metric_values(cfg_groups[name]), metric_values(smg_groups[name])
        diff[name], stderr[name] = {}, {}
        for m, _, _ in METRICS:
            d = b[m] - a[m]
            diff[name][m] = _mean(d)
            se = paired_stderr(d)
            stderr[name][m] = round(se, 4) if se is not None else None
    return diff, stderr


def _meets(value: float | None, direction: str, threshold: float) -> bool:
    if value is None:
        return False
    return value >= threshold if direction == ">=" else value <= threshold


def check_targets(results: dict, diff: dict, stderr: dict, samples: int, breakdowns: dict | None = None,
                  primary: str = "smg") -> dict:
    """Which targets a run meets: per variant and layer count, each shape (from ``breakdowns``, the
    per-variant :func:`breakdown`), SMG vs CFG, and overall for the ``primary`` variant."""
    if primary not in VARIANTS:
        raise LayerDiffError(f"primary variant {primary!r} is not one of {VARIANTS}")
    out: dict = {"targets": {m: f"{d} {t}" for m, (d, t) in TARGETS.items()}, "shape_floor": SHAPE_FLOOR,
                 "min_samples": TARGET_MIN_SAMPLES, "primary": primary}
    for variant in VARIANTS:
        out[variant] = {}
        for group, summary in results[variant].items():
            # None: nothing to judge (no foreground of the group named a position)
            met = {m: None if summary[m] is None else _meets(summary[m], d, t) for m, (d, t) in TARGETS.items()}
            out[variant][group] = {**met, "all": all(v is not False for v in met.values())}
        if breakdowns is not None:
            shapes = {w: _meets(v["shape_accuracy"], ">=", SHAPE_FLOOR)
                      for w, v in breakdowns[variant].get("shape", {}).items()}
            out[variant]["every_shape"] = {**shapes, "all": all(shapes.values())}
    strict, noise = {}, {}
    higher = {m: h for m, _, h in METRICS}
    for m in TARGETS:
        d, se = diff["all"][m], stderr["all"][m] or 0.0
        if d is None:
            strict[m] = noise[m] = True
            continue
        signed = d if higher[m] else -d  # > 0: SMG better
        strict[m] = signed >= 0
        noise[m] = signed >= -2 * se
    out["smg_at_least_as_good_as_cfg"] = {"strict": {**strict, "all": all(strict.values())},
                                          "within_noise": {**noise, "all": all(noise.values())}}
    out["enough_samples"] = samples >= TARGET_MIN_SAMPLES
    per_count = [v["all"] for g, v in out[primary].items() if g not in ("all", "every_shape")]
    smg_ok = primary != "smg" or bool(noise and all(noise.values()))
    out["all"] = bool(all(per_count) and out[primary].get("every_shape", {}).get("all", True) and smg_ok
                      and out["enough_samples"])
    return out
