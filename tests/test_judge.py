"""The model-free toy judge, on fresh renders (a seed no dataset uses), clean and mildly degraded;
background texture fidelity on ground-truth and blurred backgrounds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from layerdiff.data.toy import BACKGROUNDS, SHAPES, render_sample, shape_mask
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
    assert res["texture_fidelity"] == judge.texture_fidelity(s.background, s.extra["background"])
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


# ---------------------------------------------------------------------------------------------
# background texture fidelity


def backgrounds_per_class(size: int, per_class: int = 6) -> dict[str, list[Image.Image]]:
    """Ground-truth backgrounds of fresh toy scenes at ``size``: the first ``per_class`` of each class."""
    out: dict[str, list[Image.Image]] = {b: [] for b in BACKGROUNDS}
    index = 0
    while min(len(v) for v in out.values()) < per_class:
        s = render_sample(FRESH_SEED, index, size)
        index += 1
        if len(out[s.extra["background"]]) < per_class:
            out[s.extra["background"]].append(s.background)
    return out


@pytest.mark.parametrize("size", [64, 128])
def test_texture_fidelity_is_one_on_ground_truth_and_falls_when_blurred(size):
    scores, blurred = {}, {}
    for name, images in backgrounds_per_class(size).items():
        scores[name] = np.mean([judge.texture_fidelity(im, name) for im in images])
        blurred[name] = np.mean([judge.texture_fidelity(im.filter(ImageFilter.GaussianBlur(1)), name) for im in images])
        assert 0.9 <= scores[name] <= 1.1, (name, scores[name])
        if name == "blue sky":  # no pixel-scale detail: its edge energy is its smooth gradient, which blur keeps
            assert blurred[name] <= scores[name] + 1e-6
        else:
            assert blurred[name] <= 0.8 * scores[name], (name, blurred[name], scores[name])
    assert 0.95 <= np.mean(list(scores.values())) <= 1.05
    assert np.mean(list(blurred.values())) <= 0.7
    for name, images in backgrounds_per_class(size, 2).items():  # a box blur too, and a stronger blur loses more
        for im in images:
            box, strong = im.filter(ImageFilter.BoxBlur(1)), im.filter(ImageFilter.GaussianBlur(2))
            if name != "blue sky":
                assert judge.texture_fidelity(strong, name) < judge.texture_fidelity(box, name) < 0.8 * \
                    judge.texture_fidelity(im, name)


def test_texture_fidelity_bounds_inputs_and_determinism():
    flat = np.full((64, 64, 3), 0.4, dtype=np.float32)
    assert judge.edge_energy(flat) == 0.0 and judge.texture_fidelity(flat, "brick wall") == 0.0
    noise = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    assert judge.texture_fidelity(noise, "blue sky") == judge.TEXTURE_CLIP  # more detail than the toy's: clipped
    assert judge.texture_fidelity(noise, "blue sky", clip=None) > 10
    # the same image as uint8, float, PIL and (3, H, W) scores the same
    s = render_sample(FRESH_SEED, 5, 64)
    u8 = np.asarray(s.background)
    as_float = u8.astype(np.float32) / 255.0
    want = judge.texture_fidelity(u8, s.extra["background"])
    for img in (as_float, s.background, as_float.transpose(2, 0, 1)):
        assert judge.texture_fidelity(img, s.extra["background"]) == pytest.approx(want, abs=1e-9)
    # references depend only on the size, whatever was asked for before
    refs = judge.texture_references(64)
    judge.texture_references.cache_clear()
    judge.texture_references(96)
    assert judge.texture_references(64) == refs and set(refs) == set(BACKGROUNDS) and min(refs.values()) > 0
    with pytest.raises(LayerDiffError, match="toy background 'lava' is unknown"):
        judge.texture_fidelity(u8, "lava")
    with pytest.raises(LayerDiffError, match="no neighbouring pixels"):
        judge.edge_energy(np.zeros((1, 8, 3), dtype=np.float32))
