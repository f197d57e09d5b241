"""The model-free toy judge, on fresh renders (a seed no dataset uses), clean and mildly degraded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from layerdiff.data.toy import SHAPES, render_sample, shape_mask
from layerdiff.errors import LayerDiffError
from layerdiff.evaluation import judge

FRESH_SEED = 90210


@pytest.fixture(scope="module")
def fresh():
    return [render_sample(FRESH_SEED, i, size) for size in (64, 128) for i in range(16)]


def degrade(img: Image.Image, kind: str, rng) -> np.ndarray:
    """uint8 image -> float 0..1 with Gaussian noise (sigma 0.03) and/or a 3x3 box blur."""
    if kind in ("blur", "both"):
        img = img.filter(ImageFilter.BoxBlur(1))
    x = np.asarray(img, dtype=np.float32) / 255.0
    if kind in ("noise", "both"):
        x = np.clip(x + rng.normal(0, 0.03, x.shape), 0, 1)
    return x


def accuracies(samples, kind: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    hits: dict[str, list[bool]] = {"background": [], "shape": [], "colour": [], "size": [], "position": []}
    ious = []
    for s in samples:
        hits["background"].append(judge.classify_background(degrade(s.background, kind, rng))[0] == s.extra["background"])
        for fg, mask, obj in zip(s.foregrounds, s.masks, s.extra["objects"]):
            layer = degrade(fg, kind, rng)
            drawn = judge.object_mask_from_layer(layer)
            hits["shape"].append(judge.classify_shape(drawn) == obj["shape"])
            hits["colour"].append(judge.classify_colour(layer, drawn) == obj["colour"])
            hits["size"].append(judge.classify_size(drawn) == obj["size"])
            hits["position"].append(obj["position"] is None or obj["position"] in judge.classify_position(drawn))
            ious.append(judge.mask_iou(mask, drawn))
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    out["mask_iou"] = float(np.mean(ious))
    return out


def test_judge_is_exact_on_clean_renders(fresh):
    acc = accuracies(fresh, "clean")
    assert acc == {"background": 1.0, "shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0, "mask_iou": 1.0}


@pytest.mark.parametrize("kind", ["noise", "blur", "both"])
def test_judge_survives_mild_noise_and_blur(fresh, kind):
    acc = accuracies(fresh, kind)
    assert acc["background"] == 1.0 and acc["colour"] == 1.0
    assert acc["shape"] >= 0.95 and acc["size"] >= 0.95 and acc["position"] >= 0.95
    assert acc["mask_iou"] >= 0.9


def test_object_mask_recovers_the_stored_mask(fresh):
    for s in fresh[:8]:
        for fg, mask in zip(s.foregrounds, s.masks):
            assert np.array_equal(judge.object_mask_from_layer(fg), np.asarray(mask) == 255)


def test_shape_templates_match_every_shape_at_any_size():
    for shape in SHAPES:
        for extent in (12, 20, 37, 90):
            m = shape_mask(shape, 100, 100, 50.3, 49.6, extent)
            assert judge.classify_shape(m) == shape, (shape, extent)


def test_judge_layers_summary(fresh):
    s = fresh[3]
    res = judge.judge_layers(s.background, s.foregrounds, s.masks, s.extra)
    assert res["background_ok"] and res["background_confidence"] > 0.9
    assert all(layer["shape_ok"] and layer["colour_ok"] and layer["size_ok"] and layer["position_ok"]
               and layer["mask_iou"] == 1.0 for layer in res["layers"])
    with pytest.raises(LayerDiffError, match="labelled objects"):
        judge.judge_layers(s.background, s.foregrounds[:-1], s.masks, s.extra)


def test_input_layouts_and_errors():
    s = render_sample(FRESH_SEED, 99, 64)
    chw = np.asarray(s.foregrounds[0], dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W)
    assert np.array_equal(judge.object_mask_from_layer(chw), np.asarray(s.masks[0]) == 255)
    empty = np.zeros((64, 64), dtype=bool)
    assert judge.classify_shape(empty) is None and judge.classify_colour(s.foregrounds[0], empty) is None
    assert judge.classify_size(empty) is None and judge.classify_position(empty) == set()
    assert judge.mask_iou(empty, empty) == 1.0
    with pytest.raises(LayerDiffError, match=r"\(x \+ 1\) / 2"):
        judge.classify_background(np.full((64, 64, 3), -0.8, dtype=np.float32))
    with pytest.raises(LayerDiffError, match="shape"):
        judge.classify_background(np.zeros((64, 64), dtype=np.float32))
