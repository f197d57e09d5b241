"""The evaluation's contact sheet: for each of the first scenes, a CFG row and an SMG row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from layerdiff.evaluation.metrics import VARIANTS
from layerdiff.evaluation.scenes import EvalItem

DEFAULT_GRID_SAMPLES = 6

__all__ = ["DEFAULT_GRID_SAMPLES", "contact_sheet", "png_bytes"]


def contact_sheet(items: Sequence[EvalItem], kept: dict) -> object:
    """PIL image: for each kept item, a CFG row and an SMG row (composite, layers, then masks)."""
    from PIL import Image

    from layerdiff.data.format import LayeredSample
    from layerdiff.data.sheet import contact_sheet as sheet

    def pil(x, mode="RGB"):
        arr = np.clip(np.rint(x.numpy() * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode)

    rows = []
    for it in items:
        for variant in VARIANTS:
            stack = kept[variant].get(it.index)
            if stack is None:
                continue
            hard = stack.binarized()  # what the composite shows: front layer wins
            rows.append(LayeredSample(
                key=f"{variant}-{it.index:05d}", global_prompt=it.spec.global_prompt,
                layer_prompts=list(it.spec.layer_prompts), background=pil(hard.images[0, 0]),
                foregrounds=[pil(hard.images[0, k]) for k in range(1, hard.num_layers)],
                masks=[pil(hard.masks[0, k], "L") for k in range(hard.num_foregrounds)],
            ))
    return sheet(rows)


def png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
