"""Pure functions of the MLCID builder: which detections become layers, and in which order.

METHOD.md section 6: keep masks covering 1-60% of the image, drop near-duplicates, at most 3
foregrounds; order by depth inside each mask (fallback: the lower box bottom is nearer). Training
data has non-overlapping masks (METHOD.md section 1); small overlaps that pass the filter go to
the front layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from layerdiff.data.mlcid.stages import Box, Detection
from layerdiff.data.record_checks import MAX_LAYERS
from layerdiff.errors import LayerDiffError

# reasons a detection is dropped (the summary counts them by these names)
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
DUPLICATE = "duplicate"
OVERLAP = "overlap"
TOO_MANY = "too_many"
EMPTY_MASK = "empty_mask"
OCCLUDED = "occluded"  # fell under min_area once the front layers took their overlap


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of :func:`filter_detections`; areas are fractions of the image."""

    min_area: float = 0.01
    max_area: float = 0.6
    max_foregrounds: int = 3
    max_overlap: float = 0.2  # intersection / smaller mask above which the weaker one is dropped
    duplicate_iou: float = 0.7  # mask IoU above which two detections are the same object

    def __post_init__(self):
        if not 0.0 <= self.min_area < self.max_area <= 1.0:
            raise LayerDiffError(
                f"--min-area {self.min_area} / --max-area {self.max_area}: need 0 <= min-area < max-area <= 1 "
                "(fractions of the image, e.g. 0.01 and 0.6)"
            )
        if not 1 <= self.max_foregrounds <= MAX_LAYERS - 1:
            raise LayerDiffError(f"--max-foregrounds {self.max_foregrounds} must be from 1 to {MAX_LAYERS - 1} "
                                 "(the paper uses 3)")
        if not 0.0 <= self.max_overlap <= 1.0:
            raise LayerDiffError(f"--max-overlap {self.max_overlap} must be a fraction in 0..1, e.g. 0.2")
        if not 0.0 < self.duplicate_iou <= 1.0:
            raise LayerDiffError(f"--duplicate-iou {self.duplicate_iou} must be in (0, 1], e.g. 0.7")


@dataclass
class FilterResult:
    kept: list[int]  # indices into the detections, strongest first
    rejected: dict[int, str] = field(default_factory=dict)  # index -> reason


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    """Clip ``box`` to the image and order its corners."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def box_mask(box: Box, height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool, True on the pixels whose centres lie in ``box``."""
    x0, y0, x1, y1 = box
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def clip_masks_to_boxes(masks: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[np.ndarray]:
    """Each mask AND its box: SAM occasionally leaks past the prompt box; a layer stays in its box."""
    return [np.asarray(m, dtype=bool) & box_mask(b, *np.shape(m)) for m, b in zip(masks, boxes)]


def box_iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_nms(detections: Sequence[Detection], iou: float = 0.5, max_detections: int = 20) -> list[Detection]:
    """Greedy non-maximum suppression across phrases, strongest first."""
    order = sorted(range(len(detections)), key=lambda i: (-detections[i].score, i))
    kept: list[Detection] = []
    for i in order:
        d = detections[i]
        if (d.box[2] - d.box[0]) < 1 or (d.box[3] - d.box[1]) < 1:
            continue  # degenerate box: nothing to segment
        if all(box_iou(d.box, k.box) <= iou for k in kept):
            kept.append(d)
            if len(kept) >= max_detections:
                break
    return kept


def filter_detections(masks: Sequence[np.ndarray], scores: Sequence[float], config: FilterConfig) -> FilterResult:
    """Greedy by descending score: area range, then duplicates, overlap and the foreground cap
    against the detections already kept."""
    result = FilterResult(kept=[])
    if not masks:
        return result
    total = float(np.asarray(masks[0]).size)
    areas = [float(np.count_nonzero(m)) for m in masks]
    for i in sorted(range(len(masks)), key=lambda i: (-float(scores[i]), i)):
        frac = areas[i] / total
        if areas[i] == 0:
            result.rejected[i] = EMPTY_MASK
        elif frac < config.min_area:
            result.rejected[i] = TOO_SMALL
        elif frac > config.max_area:
            result.rejected[i] = TOO_LARGE
        else:
            reason = None
            for j in result.kept:
                inter = float(np.count_nonzero(masks[i] & masks[j]))
                if inter == 0:
                    continue
                if inter / (areas[i] + areas[j] - inter) > config.duplicate_iou:
                    reason = DUPLICATE
                    break
                if inter / min(areas[i], areas[j]) > config.max_overlap:
                    reason = OVERLAP
            if reason is None and len(result.kept) >= config.max_foregrounds:
                reason = TOO_MANY
            if reason is None:
                result.kept.append(i)
            else:
                result.rejected[i] = reason
    return result


def order_back_to_front(depths: Sequence[float], boxes: Sequence[Box]) -> list[int]:
    """Indices from the farthest object (largest depth) to the nearest; ties go by box bottom
    (higher in the image = farther), then by index, so the order is deterministic."""
    return sorted(range(len(depths)), key=lambda i: (-float(depths[i]), float(boxes[i][3]), i))


def resolve_overlaps(masks_back_to_front: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Remove from each mask the pixels of every mask in front of it: the front layer wins."""
    out = [np.asarray(m, dtype=bool).copy() for m in masks_back_to_front]
    covered = np.zeros_like(out[0]) if out else None
    for k in range(len(out) - 1, -1, -1):  # front to back
        out[k] &= ~covered
        covered |= out[k]
    return out
