"""The toy recipe's calibration stage: background and foreground guidance picked on a validation
stream of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerdiff.errors import LayerDiffError
from layerdiff.evaluation.calibrate import (
    CALIBRATION_SEED,
    background_score,
    calibrate_background_guidance,
    calibrate_foreground_guidance,
    foreground_score,
    pick_within_noise,
)
from layerdiff.evaluation.metrics import summarise
from layerdiff.evaluation.run import evaluate
from layerdiff.evaluation.scenes import fresh_items, spec_signature
from layerdiff.io.checkpoint import load_model
from layerdiff.settings import SamplerSettings


@pytest.fixture(scope="module")
def tiny():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("tiny")
    torch.set_num_threads(before)


def test_background_score_is_class_and_texture_capped_at_one():
    assert background_score([1, 0, 1], [0.5, 0.5, 1.4]).tolist() == [0.75, 0.25, 1.0]
    assert background_score(1.0, 2.0) == 1.0  # more detail than the toy world's earns nothing


def test_background_pick_follows_the_one_standard_error_rule_over_class_and_texture():
    """A larger scale that wins one more class on a few scenes but flattens the texture of all of them
    is not picked."""
    right = {7.5: [1, 1, 0, 1, 1, 1], 14.0: [1, 1, 1, 1, 1, 1]}
    texture = {7.5: [0.7, 0.7, 0.6, 0.8, 0.7, 0.7], 14.0: [0.5, 0.5, 0.4, 0.6, 0.5, 0.5]}
    pick, _ = pick_within_noise({c: background_score(right[c], texture[c]) for c in right})
    assert pick == 7.5
    assert pick_within_noise({c: right[c] for c in right})[0] == 7.5  # class alone: within the noise too
    assert pick_within_noise({7.5: [0.0] * 6, 14.0: [1.0] * 6})[0] == 14.0  # a clear win is taken


def test_calibration_judges_what_eval_judges_on_its_own_stream(tiny):
    """Each candidate's accuracy is the background accuracy that `eval` (plain CFG) reports for
    that background guidance on the same scenes and seeds; the scenes are not eval's."""
    res = calibrate_background_guidance(tiny, candidates=[2.0, 7.5], samples=6, batch=4)
    assert res["samples"] == 6 and res["seed"] == CALIBRATION_SEED
    assert set(res["accuracy"]) == set(res["texture"]) == set(res["score"]) == {"2.0", "7.5"}
    items = fresh_items(6, seed=CALIBRATION_SEED)
    per_scene = {}
    for scale in (2.0, 7.5):
        out = evaluate(tiny, items, batch=4, settings=SamplerSettings(background_cfg=scale))
        records = out["records"]["cfg"]
        want = np.mean([r["background_ok"] for r in records])
        assert res["accuracy"][str(scale)] == pytest.approx(want, abs=1e-4), scale
        texture = [r["texture_fidelity"] for r in records]
        assert res["texture"][str(scale)] == pytest.approx(np.mean(texture), abs=1e-4), scale
        per_scene[scale] = background_score([r["background_ok"] for r in records], texture)
        assert res["score"][str(scale)] == pytest.approx(per_scene[scale].mean(), abs=1e-4), scale
    assert res["background_cfg"] == pick_within_noise(per_scene)[0]
    assert calibrate_background_guidance(tiny, candidates=[2.0, 7.5], samples=6, batch=4)["accuracy"] == res["accuracy"]
    eval_scenes = {spec_signature(it.spec) for it in fresh_items(6)}
    assert eval_scenes != {spec_signature(it.spec) for it in items}
    assert {it.seed for it in items}.isdisjoint({it.seed for it in fresh_items(240)})


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


def test_pick_within_noise_takes_the_smallest_scale_within_one_standard_error_of_the_best():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 1.0, 200)
    # 4.5 beats 3 by a hair on the same items: inside the noise, so the smaller scale
    noise = rng.normal(0, 0.05, 200)
    pick, stderr = pick_within_noise({3.0: base, 4.5: base + 0.002 + noise - noise.mean()})
    assert pick == 3.0 and stderr[3.0] > 0.002 and stderr[4.5] == 0.0
    # a clear win (far beyond one standard error) is taken
    pick, stderr = pick_within_noise({2.0: base - 0.1, 3.0: base, 4.5: base - 0.05 + rng.normal(0, 0.01, 200)})
    assert pick == 3.0 and stderr[2.0] == pytest.approx(0.0, abs=1e-12)
    # equal scores: the smaller scale; one item: no spread to measure, the best
    assert pick_within_noise({7.5: [0.5, 0.7], 2.0: [0.5, 0.7]})[0] == 2.0
    assert pick_within_noise({2.0: [0.5], 3.0: [0.6]})[0] == 3.0
    with pytest.raises(LayerDiffError, match="at least one candidate"):
        pick_within_noise({})
    with pytest.raises(LayerDiffError, match="the same items"):
        pick_within_noise({2.0: [0.5, 0.6], 3.0: [0.5]})


def test_foreground_score_is_the_mean_of_colour_shape_and_mask_iou():
    assert foreground_score({"colour_accuracy": 1.0, "shape_accuracy": 0.5, "mask_iou": 0.9}) == pytest.approx(0.8)
    assert foreground_score({"colour_accuracy": 0.0, "shape_accuracy": 0.0, "mask_iou": 0.0}) == 0.0


def test_foreground_calibration_judges_what_eval_judges(tiny):
    """Each foreground guidance candidate's colour, shape and mask IoU are what `eval` (plain CFG)
    reports for that cfg on the same scenes and seeds, with the background guidance held; the pick
    is the smallest scale within one paired standard error of the best foreground score."""
    res = calibrate_foreground_guidance(tiny, candidates=[1.5, 7.5], samples=6, batch=4, background_cfg=5.0)
    assert res["samples"] == 6 and res["seed"] == CALIBRATION_SEED
    assert set(res["score"]) == set(res["metrics"]) == {"1.5", "7.5"}
    items = fresh_items(6, seed=CALIBRATION_SEED)
    per_item = {}
    for scale in (1.5, 7.5):
        out = evaluate(tiny, items, batch=4, settings=SamplerSettings(cfg=scale, background_cfg=5.0))
        want = summarise(out["records"]["cfg"])["all"]
        got = res["metrics"][str(scale)]
        for metric in ("colour_accuracy", "shape_accuracy", "mask_iou"):
            assert got[metric] == pytest.approx(want[metric], abs=1e-4), (scale, metric)
        assert res["score"][str(scale)] == pytest.approx(foreground_score(got), abs=1e-4)
        per_item[scale] = [(f["colour_ok"] + f["shape_ok"] + f["mask_iou"]) / 3
                           for r in out["records"]["cfg"] for f in r["foregrounds"]]
    pick, stderr = pick_within_noise(per_item)
    assert res["cfg"] == pick and res["rule"] == "one standard error"
    assert res["stderr"] == {str(c): pytest.approx(v, abs=1e-4) for c, v in stderr.items()}
    # the two scales sample differently (the candidates are really applied)
    a = evaluate(tiny, items[:1], batch=1, settings=SamplerSettings(cfg=1.5, background_cfg=5.0), keep=1)["kept"]["cfg"][0]
    b = evaluate(tiny, items[:1], batch=1, settings=SamplerSettings(cfg=7.5, background_cfg=5.0), keep=1)["kept"]["cfg"][0]
    assert not np.allclose(np.asarray(a.images), np.asarray(b.images))


def test_calibrate_command_writes_a_calibrated_copy_and_keeps_the_weights(tmp_path, capsys):
    """`calibrate` writes a copy whose sampling defaults hold the picks (and the table in its
    metadata), with the weights bit for bit; it never replaces a file unasked."""
    import json

    from layerdiff.cli import main
    from layerdiff.io.checkpoint import load_layerdiff, save_layerdiff
    from layerdiff.io.files import read_safetensors

    src = tmp_path / "tiny.safetensors"
    save_layerdiff(load_model("tiny"), src)
    out = tmp_path / "calibrated.safetensors"
    args = ["calibrate", "--model", str(src), "--out", str(out), "--samples", "3", "--threads", "1",
            "--background-candidates", "2,6", "--foreground-candidates", "1.5,7.5", "--exclude-train-samples", "0"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["background_cfg"] in (2.0, 6.0) and result["cfg"] in (1.5, 7.5)
    score, stderr = result["foreground"]["score"], result["foreground"]["stderr"]
    assert result["cfg"] == min(float(c) for c in score if score[c] >= max(score.values()) - stderr[c] - 1e-4)
    assert set(result["background"]["score"]) == {"2.0", "6.0"}
    model = load_layerdiff(out)
    assert model.config.sampling.cfg == result["cfg"] and model.config.sampling.background_cfg == result["background_cfg"]
    (a, meta), (b, _) = read_safetensors(out), read_safetensors(src)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(meta["calibration"]) == result
    before = out.read_bytes()
    assert main(args) == 1  # exists: refused, untouched
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    # only the foregrounds: the background guidance stays the file's
    assert main([*args[:-6], "--background-candidates", "none", "--foreground-candidates", "1.5",
                 "--exclude-train-samples", "0", "--overwrite"]) == 0
    again = load_layerdiff(out).config.sampling
    assert again.cfg == 1.5 and again.background_cfg == load_layerdiff(src).config.sampling.background_cfg


@pytest.mark.parametrize("extra, message", [
    (["--foreground-candidates", "2,x"], "--foreground-candidates '2,x' is not a list of numbers"),
    (["--background-candidates", "0"], "--background-candidates '0' must list guidance scales above 0"),
    (["--background-candidates", "none", "--foreground-candidates", "none"], "nothing to calibrate"),
    (["--samples", "2"], "--samples 2 must be at least 3"),
])
def test_calibrate_command_names_bad_arguments(tmp_path, capsys, extra, message):
    from layerdiff.cli import main

    out = tmp_path / "out.safetensors"
    assert main(["calibrate", "--model", "tiny", "--out", str(out), *extra]) == 1
    assert message in capsys.readouterr().err and not out.exists()
