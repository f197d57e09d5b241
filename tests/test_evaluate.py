"""The `eval` command: fresh-combination filter, metrics on stacks with known ground truth, overlap
measure, CFG vs SMG comparison, and the command end to end with the random-weight `tiny` model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from layerdiff.cli import main
from layerdiff.data.toy import COLOURS, SHAPES, ToySpec, render_sample, sample_prompt_spec
from layerdiff.errors import LayerDiffError
from layerdiff.evaluation import metrics, scenes
from layerdiff.stack import LayerStack

FRESH_SEED = 777  # toy scenes that no test data set uses


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# fresh combinations


def test_training_signatures_replay_the_toy_generator_exactly():
    n = 30
    rebuilt = scenes.training_signatures(0, n)
    rendered = {scenes._labels_signature(render_sample(0, i, scenes.TRAIN_SIZE).extra) for i in range(n)}
    assert rebuilt == rendered
    # sample (0, 26) is one whose first scene cannot be laid out: the replay must follow the redraw
    rng = np.random.default_rng([0, 26])
    from layerdiff.data.toy import _normalise_layer_probs

    counts, p = _normalise_layer_probs(None)
    first = sample_prompt_spec(rng, num_layers=int(rng.choice(counts, p=p)))
    final = scenes._labels_signature(render_sample(0, 26, scenes.TRAIN_SIZE).extra)
    assert scenes.spec_signature(first) != final and final in rebuilt


def test_default_exclusion_is_the_builtin_models_training_set():
    from layerdiff.training.recipes import TOY_RECIPE

    assert (scenes.TRAIN_SEED, scenes.TRAIN_SAMPLES, scenes.TRAIN_SIZE) == (0, TOY_RECIPE["samples"], 128)


def test_data_signatures_read_the_same_scenes_from_shards(tmp_path):
    from layerdiff.data.toy_dataset import generate_toy_dataset

    generate_toy_dataset(tmp_path, 8, seed=3, size=64, workers=1)
    assert scenes.data_signatures(tmp_path) == scenes.training_signatures(3, 8, size=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerDiffError, match="no .tar shards"):
        scenes.data_signatures(tmp_path / "empty")


def test_fresh_items_never_repeat_a_training_scene_and_are_balanced_and_stable():
    exclude = scenes.training_signatures(0, 400)
    stats = {}
    items = scenes.fresh_items(30, FRESH_SEED, (2, 3, 4), exclude, stats=stats)
    assert all(scenes.spec_signature(it.spec) not in exclude for it in items)
    assert [it.num_layers for it in items] == [2, 3, 4] * 10
    assert [it.seed for it in items] == [FRESH_SEED + i for i in range(30)]
    assert set(stats) == {"rejected_seen_in_training", "rejected_unplaceable"}
    # item i depends only on (seed, i, layers): a shorter run is a prefix of a longer one
    assert scenes.fresh_items(7, FRESH_SEED, (2, 3, 4), exclude) == items[:7]

    # exclude exactly the scenes just drawn: every one must be rejected and replaced
    taken = {scenes.spec_signature(it.spec) for it in items}
    stats2 = {}
    again = scenes.fresh_items(30, FRESH_SEED, (2, 3, 4), exclude | taken, stats=stats2)
    assert all(scenes.spec_signature(it.spec) not in taken | exclude for it in again)
    assert stats2["rejected_seen_in_training"] >= 30


def test_fresh_items_gives_up_clearly_when_everything_is_excluded(monkeypatch):
    monkeypatch.setattr(scenes, "MAX_DRAWS", 5)

    class Everything(frozenset):
        def __contains__(self, item):
            return True

    with pytest.raises(LayerDiffError, match="no fresh 2-layer scene in 5 draws"):
        scenes.fresh_items(3, 1, (2,), Everything())
    with pytest.raises(LayerDiffError, match="--samples 2 is fewer than the 3 layer counts"):
        scenes.fresh_items(2, 1, (2, 3, 4))


def test_parse_layers():
    assert scenes.parse_layers("2,3,4") == (2, 3, 4)
    assert scenes.parse_layers(" 4 , 2 ") == (4, 2)
    for bad in ("", "1,2", "2,2", "x", "5"):
        with pytest.raises(LayerDiffError, match="--layers"):
            scenes.parse_layers(bad)
    with pytest.raises(LayerDiffError, match="at most 3 layers; drop \\[4\\]"):
        scenes.parse_layers("2,3,4", max_layers=3)


# ---------------------------------------------------------------------------------------------
# metrics on stacks whose ground truth is known


def _truth(n_layers: int, index: int, size: int = 128):
    """A rendered toy sample as float arrays: images (L, H, W, 3), masks (K, H, W), and its spec."""
    s = render_sample(FRESH_SEED, index, size, num_layers=n_layers)
    images = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in [s.background, *s.foregrounds]])
    masks = np.stack([np.asarray(m, dtype=np.float32) / 255 for m in s.masks])
    return images, masks, ToySpec.from_dict(s.extra)


@pytest.fixture(scope="module")
def truths():
    return [_truth(n, i) for i, n in enumerate((2, 3, 4, 2, 3, 4))]


def _stacks(truths) -> list[tuple[LayerStack, ToySpec]]:
    """Each rendered sample as a 1-sample LayerStack (a stack holds one layer count)."""
    return [(LayerStack(torch.from_numpy(im)[None], torch.from_numpy(m)[None]), spec) for im, m, spec in truths]


def test_rendered_ground_truth_scores_perfectly(truths):
    records = [metrics.judge_stack(stack, [spec])[0] for stack, spec in _stacks(truths)]
    summary = metrics.summarise(records)
    assert set(summary) == {"2", "3", "4", "all"}
    assert summary["all"]["samples"] == 6 and summary["all"]["foregrounds"] == 2 * (1 + 2 + 3)
    for group in summary.values():
        for metric in ("background_accuracy", "colour_accuracy", "shape_accuracy", "size_accuracy", "mask_iou",
                       "scene_accuracy"):
            assert group[metric] == 1.0, metric
        assert group["overlap_fraction"] == 0.0 and group["empty_mask_rate"] == 0.0
        assert group["position_accuracy"] in (None, 1.0)
    assert 0.8 <= summary["all"]["texture_fidelity"] <= 1.2  # the toy world's own backgrounds: about 1.0
    for rec, (_, spec) in zip(records, _stacks(truths)):
        assert rec["prompted_background"] == spec.background
        assert [f["prompted"] for f in rec["foregrounds"]] == spec.to_dict()["objects"]


def test_breakdown_per_prompted_word(truths):
    records = [metrics.judge_sample(*t) for t in truths]
    parts = metrics.breakdown(records)
    assert set(parts) == set(metrics.BREAKDOWNS)
    objects = [o for _, _, spec in truths for o in spec.objects]
    for group in ("shape", "colour", "size", "position"):
        words = [getattr(o, group) for o in objects if getattr(o, group) is not None]
        assert {w: v["foregrounds"] for w, v in parts[group].items()} == {w: words.count(w) for w in set(words)}
        for values in parts[group].values():
            assert all(values[m] == 1.0 for m in metrics.BREAKDOWNS[group][1]), (group, values)
    assert list(parts["shape"]) == [s for s in SHAPES if s in parts["shape"]]  # vocabulary order
    backgrounds = [spec.background for _, _, spec in truths]
    counts = {b: v["samples"] for b, v in parts["background"].items()}
    assert counts == {b: backgrounds.count(b) for b in set(backgrounds)}
    for name, values in parts["background"].items():
        want = np.mean([r["texture_fidelity"] for r in records if r["prompted_background"] == name])
        assert values["background_accuracy"] == 1.0 and values["texture_fidelity"] == pytest.approx(want, abs=1e-4)

    # one recoloured object and one blurred background: only their own words lose
    images, masks, spec = (x.copy() if isinstance(x, np.ndarray) else x for x in truths[2])
    images[1][masks[0] > 0.5] = np.asarray(COLOURS[_other_colour(spec.objects[0].colour)], dtype=np.float32) / 255
    blurred = Image.fromarray(np.rint(images[0] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    images[0] = np.asarray(blurred, dtype=np.float32) / 255
    bad = metrics.judge_sample(images, masks, spec)
    assert bad["texture_fidelity"] < 0.8 * records[2]["texture_fidelity"]
    worse = metrics.breakdown([bad])
    assert worse["colour"][spec.objects[0].colour]["colour_accuracy"] == 0.0
    assert all(v["colour_accuracy"] == 1.0 for c, v in worse["colour"].items() if c != spec.objects[0].colour)
    assert worse["background"][spec.background]["texture_fidelity"] == pytest.approx(bad["texture_fidelity"], abs=1e-4)
    assert metrics.breakdown([]) == {g: {} for g in metrics.BREAKDOWNS}


def test_a_batched_stack_is_judged_sample_by_sample(truths):
    same = [t for t in truths if t[2].num_layers == 3]
    stack = LayerStack(torch.from_numpy(np.stack([t[0] for t in same])), torch.from_numpy(np.stack([t[1] for t in same])))
    records = metrics.judge_stack(stack, [t[2] for t in same])
    assert len(records) == 2 and all(r["scene_ok"] for r in records)
    with pytest.raises(LayerDiffError, match="a batch of 2 stacks for 1 scenes"):
        metrics.judge_stack(stack, [same[0][2]])


def _other_colour(name: str) -> str:
    return next(c for c in COLOURS if c != name)


def test_corrupted_stacks_lose_exactly_what_was_broken(truths):
    images, masks, spec = (x.copy() if isinstance(x, np.ndarray) else x for x in truths[2])  # 4 layers
    assert spec.num_layers == 4
    # layer 1: recoloured object -> colour wrong, shape and IoU intact
    wrong = np.asarray(COLOURS[_other_colour(spec.objects[0].colour)], dtype=np.float32) / 255
    images[1][masks[0] > 0.5] = wrong
    # layer 2: mask moved 12 px right -> shape still right, IoU with the drawn object falls (its
    # colour is judged on what the moved mask shows, so it may go either way)
    masks[1] = np.roll(masks[1], 12, axis=1)
    # layer 3: mask gone -> empty: colour, shape fail, IoU 0
    masks[2] = 0.0
    # background: another toy background
    other = next(t for t in truths if t[2].background != spec.background)
    images[0] = other[0][0]
    rec = metrics.judge_sample(images, masks, spec)
    assert not rec["background_ok"] and not rec["scene_ok"]
    f1, f2, f3 = rec["foregrounds"]
    assert not f1["colour_ok"] and f1["shape_ok"] and f1["mask_iou"] == 1.0
    assert f2["shape_ok"] and f2["mask_iou"] < 0.8
    assert f3["empty"] and not f3["colour_ok"] and not f3["shape_ok"] and f3["mask_iou"] == 0.0
    s = metrics.summarise([rec])["4"]
    assert s["background_accuracy"] == 0.0
    assert s["colour_accuracy"] == pytest.approx(f2["colour_ok"] / 3, abs=1e-3)
    assert s["shape_accuracy"] == pytest.approx(2 / 3, abs=1e-3)
    assert s["empty_mask_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert s["mask_iou"] < 0.6


def test_overlap_measure():
    a = np.zeros((2, 64, 64), dtype=bool)
    a[0, 0:10, 0:10] = True  # 100 px
    a[1, 5:25, 9:29] = True  # 400 px; shares 5 px with the first
    assert metrics.mask_overlap(a) == pytest.approx(5 / 100)
    a[1, 5:10, 9] = False
    a[1, 9, 9] = True  # one shared pixel: 1% of the smaller mask, within the tolerance
    assert metrics.mask_overlap(a) == pytest.approx(0.01)
    assert metrics.mask_overlap(a[:1]) == 0.0 and metrics.mask_overlap(np.zeros((3, 8, 8))) == 0.0


def test_overlap_is_measured_on_soft_masks_per_layer(truths):
    images, masks, spec = (x.copy() if isinstance(x, np.ndarray) else x for x in truths[1])  # 3 layers
    rec = metrics.judge_sample(images, masks, spec)
    assert not rec["overlap"] and rec["max_overlap"] == 0.0
    grown = masks.copy()
    grown[1] = np.maximum(grown[1], grown[0])  # the front mask also covers the back object
    rec = metrics.judge_sample(images, grown, spec)
    assert rec["overlap"] and rec["max_overlap"] == 1.0
    faint = masks.copy()
    faint[1] = np.maximum(faint[1], 0.4 * faint[0])  # below the 0.5 mask threshold: no overlap
    assert not metrics.judge_sample(images, faint, spec)["overlap"]
    # a 2-layer scene has a single foreground and never overlaps
    assert metrics.summarise([metrics.judge_sample(*truths[0])])["2"]["overlap_fraction"] == 0.0


def test_smg_minus_cfg_is_paired_and_targets_are_checked(truths):
    good = [metrics.judge_sample(*t) for t in truths]
    bad = []
    for images, masks, spec in truths:
        masks = masks.copy()
        masks[-1] = 0.0  # the front object is missing
        bad.append(metrics.judge_sample(images, masks, spec))
    diff, se = metrics.compare_variants(bad, good)  # "cfg" = bad, "smg" = good
    assert diff["all"]["empty_mask_rate"] == pytest.approx(-6 / 12, abs=1e-3)
    assert diff["all"]["background_accuracy"] == 0.0 and se["all"]["background_accuracy"] == 0.0
    assert diff["2"]["mask_iou"] == 1.0 and se["2"]["mask_iou"] == 0.0
    results = {"cfg": metrics.summarise(bad), "smg": metrics.summarise(good)}
    met = metrics.check_targets(results, diff, se, samples=6)
    assert met["smg"]["all"]["all"] and not met["cfg"]["all"]["all"]
    assert met["smg_at_least_as_good_as_cfg"]["strict"]["all"]
    assert not met["enough_samples"] and not met["all"]  # 6 samples are too few to claim the targets
    assert metrics.check_targets(results, diff, se, samples=240)["all"]
    reverse = metrics.compare_variants(good, bad)
    worse = metrics.check_targets({"cfg": results["smg"], "smg": results["cfg"]}, *reverse, samples=240)
    assert not worse["smg_at_least_as_good_as_cfg"]["strict"]["all"] and not worse["all"]
    # the overall verdict follows the model's default variant; each shape is held to the floor
    parts = {"cfg": metrics.breakdown(bad), "smg": metrics.breakdown(good)}
    by_cfg = metrics.check_targets(results, diff, se, samples=240, breakdowns=parts, primary="cfg")
    assert by_cfg["primary"] == "cfg" and not by_cfg["all"]
    by_smg = metrics.check_targets(results, diff, se, samples=240, breakdowns=parts, primary="smg")
    assert by_smg["all"] and by_smg["smg"]["every_shape"]["all"] and not by_smg["cfg"]["every_shape"]["all"]
    assert set(by_smg["smg"]["every_shape"]) == {r["prompted"]["shape"] for g in good for r in g["foregrounds"]} | {"all"}
    # CFG as the default: SMG's own shortfalls against CFG do not count
    swapped = metrics.check_targets({"cfg": results["smg"], "smg": results["cfg"]}, *reverse, samples=240,
                                    breakdowns={"cfg": parts["smg"], "smg": parts["cfg"]}, primary="cfg")
    assert swapped["all"] and not swapped["smg_at_least_as_good_as_cfg"]["strict"]["all"]
    with pytest.raises(LayerDiffError, match="primary variant 'both'"):
        metrics.check_targets(results, diff, se, samples=240, primary="both")


# ---------------------------------------------------------------------------------------------
# the command


def test_eval_command_end_to_end(tmp_path, capsys):
    out, grid = tmp_path / "report.json", tmp_path / "grid.png"
    rc = main(["eval", "--model", "tiny", "--samples", "6", "--steps", "2", "--threads", "1",
               "--exclude-train-samples", "100", "--out", str(out), "--grid", str(grid), "--grid-samples", "2",
               "--details"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(printed)
    assert out.read_text() == printed
    assert {"model", "samples", "seed", "settings", "cfg", "smg", "smg_minus_cfg", "smg_minus_cfg_stderr",
            "targets_met", "seconds"} <= set(report)
    assert report["model"] == "tiny" and report["samples"] == 6 and report["seed"] == scenes.DEFAULT_SEED
    s = report["settings"]
    assert s["steps"] == 2 and s["cfg"] == 7.5 and s["sampler"] == "ddim" and s["scheduler"] == "normal" and s["mask_guidance"] > 0
    assert s["image_size"] == 64 and s["layers"] == [2, 3, 4] and s["exclusion"]["train_samples"] == 100
    assert s["background_cfg"] == 7.5 and s["layout_cleanup"] == 1.0  # the tiny model's defaults, recorded
    for variant in ("cfg", "smg", "smg_minus_cfg"):
        assert set(report[variant]) == {"2", "3", "4", "all"}
        for group in report[variant].values():
            assert {m for m, _, _ in metrics.METRICS} <= set(group)
    assert report["cfg"]["all"]["samples"] == 6 and report["cfg"]["4"]["foregrounds"] == 6
    for group in report["cfg"].values():
        for m in ("background_accuracy", "colour_accuracy", "shape_accuracy", "mask_iou", "overlap_fraction"):
            assert 0.0 <= group[m] <= 1.0
    met = report["targets_met"]
    assert set(met["smg"]) == {"2", "3", "4", "all", "every_shape"} and met["all"] is False
    assert met["primary"] == "smg"  # the tiny model's own defaults run self-mask guidance
    assert len(report["per_sample"]) == 6 and report["per_sample"][0]["seed"] == scenes.DEFAULT_SEED
    assert set(report["breakdown"]) == {"cfg", "smg"}
    for variant, parts in report["breakdown"].items():
        assert set(parts) == set(metrics.BREAKDOWNS)
        assert sum(v["foregrounds"] for v in parts["shape"].values()) == report[variant]["all"]["foregrounds"]
        assert sum(v["foregrounds"] for v in parts["colour"].values()) == report[variant]["all"]["foregrounds"]
        assert sum(v["samples"] for v in parts["background"].values()) == 6
    for scene in report["per_sample"]:
        for variant in ("cfg", "smg"):
            assert 0.0 <= scene[variant]["texture_fidelity"] <= 1.5
            assert scene[variant]["prompted_background"] == scene["spec"]["background"]
            assert [f["prompted"] for f in scene[variant]["foregrounds"]] == scene["spec"]["objects"]
    img = Image.open(grid)  # scenes 0 (2 layers) and 1 (3 layers): composite, background, 2 fg, 2 masks
    assert img.size[0] == 128 * 6 and img.size[1] > 4 * 128  # a CFG row and an SMG row per scene


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "tiny", "--samples", "2"], "--samples 2 is fewer than the 3 layer counts"),
    (["--model", "tiny", "--layers", "2,5"], "--layers '2,5' is not valid"),
    (["--model", "tiny", "--mask-guidance", "0"], "--mask-guidance 0.0 must be above 0"),
    (["--model", "tiny", "--samples", "0"], "--samples 0 must be at least 1"),
    (["--model", "tiny", "--layout-cleanup", "2"], "--layout-cleanup 2.0 must be within 0..1"),
    (["--model", "tiny", "--layout-cleanup-start", "-1"], "--layout-cleanup-start -1.0 must be within 0..1"),
    (["--model", "/no/such/file.safetensors"], "file.safetensors"),
])
def test_bad_input_gives_one_error_line(argv, message, capsys):
    assert main(["eval", *argv, "--exclude-train-samples", "0"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_output_paths_are_checked_before_generating(tmp_path, capsys):
    assert main(["eval", "--model", "tiny", "--out", str(tmp_path / "missing" / "r.json")]) == 1
    assert "does not exist" in capsys.readouterr().err

