"""The toy recipe's calibration stage: background and foreground guidance picked on a validation
stream of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerdiff import evaluate as ev
from layerdiff.calibrate import (
    CALIBRATION_SEED,
    calibrate_background_guidance,
    calibrate_foreground_guidance,
    foreground_score,
    pick_scale,
)
from layerdiff.errors import LayerDiffError
from layerdiff.io.checkpoint import load_model


@pytest.fixture(scope="module")
def tiny():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("tiny")
    torch.set_num_threads(before)


def test_pick_scale_takes_the_most_accurate_and_the_smaller_of_equals():
    assert pick_scale({5.0: 0.5, 10.0: 0.9, 20.0: 0.7}) == 10.0
    assert pick_scale({20.0: 0.9, 7.5: 0.9, 10.0: 0.8}) == 7.5
    assert pick_scale({3.0: 0.0}) == 3.0
    with pytest.raises(LayerDiffError, match="at least one candidate"):
        pick_scale({})


def test_calibration_judges_what_eval_judges_on_its_own_stream(tiny):
    """Each candidate's accuracy is the background accuracy that `eval` (plain CFG) reports for
    that background guidance on the same scenes and seeds; the scenes are not eval's."""
    res = calibrate_background_guidance(tiny, candidates=[2.0, 7.5], samples=6, batch=4)
    assert res["samples"] == 6 and res["seed"] == CALIBRATION_SEED
    assert set(res["accuracy"]) == {"2.0", "7.5"}
    assert res["background_cfg"] == pick_scale({float(k): v for k, v in res["accuracy"].items()})
    items = ev.fresh_items(6, seed=CALIBRATION_SEED)
    for scale in (2.0, 7.5):
        out = ev.evaluate(tiny, items, batch=4, background_cfg=scale)
        want = np.mean([r["background_ok"] for r in out["records"]["cfg"]])
        assert res["accuracy"][str(scale)] == pytest.approx(want, abs=1e-4), scale
    assert calibrate_background_guidance(tiny, candidates=[2.0, 7.5], samples=6, batch=4)["accuracy"] == res["accuracy"]
    eval_scenes = {ev.spec_signature(it.spec) for it in ev.fresh_items(6)}
    assert eval_scenes != {ev.spec_signature(it.spec) for it in items}
    assert {it.seed for it in items}.isdisjoint({it.seed for it in ev.fresh_items(240)})


@pytest.mark.parametrize("kwargs, message", [
    ({"candidates": []}, "one or more scales above 0"),
    ({"candidates": [0.0, 5.0]}, "one or more scales above 0"),
    ({"batch": 0}, "batch 0 must be at least 1"),
    ({"samples": 2}, "--samples 2 is fewer than the 3 layer counts"),
])
def test_bad_calibration_arguments_are_named(tiny, kwargs, message):
    with pytest.raises(LayerDiffError, match=message):
        calibrate_background_guidance(tiny, **kwargs)
    with pytest.raises(LayerDiffError, match=message):
        calibrate_foreground_guidance(tiny, **kwargs)


def test_foreground_score_is_the_mean_of_colour_shape_and_mask_iou():
    assert foreground_score({"colour_accuracy": 1.0, "shape_accuracy": 0.5, "mask_iou": 0.9}) == pytest.approx(0.8)
    assert foreground_score({"colour_accuracy": 0.0, "shape_accuracy": 0.0, "mask_iou": 0.0}) == 0.0


def test_foreground_calibration_judges_what_eval_judges(tiny):
    """Each foreground guidance candidate's colour, shape and mask IoU are what `eval` (plain CFG)
    reports for that cfg on the same scenes and seeds, with the background guidance held; the pick
    is the best foreground score."""
    res = calibrate_foreground_guidance(tiny, candidates=[1.5, 7.5], samples=6, batch=4, background_cfg=5.0)
    assert res["samples"] == 6 and res["seed"] == CALIBRATION_SEED
    assert set(res["score"]) == set(res["metrics"]) == {"1.5", "7.5"}
    assert res["cfg"] == pick_scale({float(k): v for k, v in res["score"].items()})
    items = ev.fresh_items(6, seed=CALIBRATION_SEED)
    for scale in (1.5, 7.5):
        out = ev.evaluate(tiny, items, batch=4, cfg=scale, background_cfg=5.0)
        want = ev.summarise(out["records"]["cfg"])["all"]
        got = res["metrics"][str(scale)]
        for metric in ("colour_accuracy", "shape_accuracy", "mask_iou"):
            assert got[metric] == pytest.approx(want[metric], abs=1e-4), (scale, metric)
        assert res["score"][str(scale)] == pytest.approx(foreground_score(got), abs=1e-4)
    # the two scales sample differently (the candidates are really applied)
    a = ev.evaluate(tiny, items[:1], batch=1, cfg=1.5, background_cfg=5.0, keep=1)["kept"]["cfg"][0]
    b = ev.evaluate(tiny, items[:1], batch=1, cfg=7.5, background_cfg=5.0, keep=1)["kept"]["cfg"][0]
    assert not np.allclose(np.asarray(a.images), np.asarray(b.images))
