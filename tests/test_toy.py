"""Toy world: exact layers and masks, prompts, determinism, dataset generation and the data CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerdiff.cli import main
from layerdiff.data import toy
from layerdiff.data.format import GREY, list_shards, read_shard
from layerdiff.data.toy import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ToyObject,
    ToySpec,
    render_from_spec,
    render_sample,
    sample_prompt_spec,
)
from layerdiff.data.toy_backgrounds import render_background
from layerdiff.data.toy_dataset import generate_toy_dataset
from layerdiff.errors import LayerDiffError

SIZE = 64


@pytest.fixture(scope="module")
def samples():
    return [render_sample(11, i, SIZE) for i in range(40)]


def test_vocabulary_is_complete_and_distinct():
    assert list(BACKGROUNDS) == ["blue sky", "green meadow", "sandy beach", "brick wall", "wooden floor",
                                 "snowy field", "night sky", "checkered floor"]
    assert SHAPES == ("circle", "square", "triangle", "star", "heart", "cross")
    assert set(COLOURS) == {"red", "orange", "yellow", "green", "blue", "purple", "white", "black"}
    rgb = np.array(list(COLOURS.values()), dtype=float)
    dist = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1)) + np.eye(len(rgb)) * 1e9
    assert dist.min() > 90  # palette entries are far apart
    assert np.abs(rgb - 128).max(1).min() > 80  # and far from the grey fill
    backgrounds = [render_background(n, SIZE, 0) for n in BACKGROUNDS]
    assert all(b.std() > 5 for b in backgrounds)  # textured, not flat


def test_layers_and_masks_are_exact(samples):
    for s in samples:
        assert 2 <= s.num_layers <= 4 and s.size == (SIZE, SIZE)
        union = np.zeros((SIZE, SIZE), dtype=bool)
        for fg, mask, obj in zip(s.foregrounds, s.masks, s.extra["objects"]):
            m = np.asarray(mask)
            assert set(np.unique(m).tolist()) <= {0, 255} and m.any()
            m = m == 255
            f = np.asarray(fg)
            assert np.all(f[m] == COLOURS[obj["colour"]]) and np.all(f[~m] == GREY)
            ys, xs = np.nonzero(m)
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert not (union & toy._dilate(m, 1)).any()  # no overlap, with at least a pixel of margin
            union |= m


def test_sizes_and_positions_follow_the_labels(samples):
    regions = toy._REGIONS
    for s in samples:
        for obj in s.extra["objects"]:
            lo, hi = SIZES[obj["size"]]
            assert lo * SIZE <= obj["extent"] <= hi * SIZE
            x0, y0, x1, y1 = obj["bbox"]
            assert max(x1 - x0, y1 - y0) <= obj["extent"] + 1
            cx, cy = obj["centre"]
            xl, xh, yl, yh = regions[obj["position"]]
            assert xl * SIZE - 1 <= cx <= xh * SIZE + 1 and yl * SIZE - 1 <= cy <= yh * SIZE + 1


def test_prompts_name_what_is_drawn(samples):
    for s in samples:
        ex = s.extra
        assert s.layer_prompts[0] == BACKGROUNDS[ex["background"]]
        assert s.global_prompt.endswith(f"in front of {BACKGROUNDS[ex['background']]}")
        for prompt, obj in zip(s.layer_prompts[1:], ex["objects"]):
            assert prompt.startswith(f"a {obj['size']} {obj['colour']} {obj['shape']}")
            assert (obj["position"] is not None) == any(p in prompt for p in POSITIONS.values())
            if obj["position"]:
                assert prompt.endswith(POSITIONS[obj["position"]])
            assert prompt in s.global_prompt
    spec = ToySpec("brick wall", (ToyObject("star", "red", "large"), ToyObject("circle", "blue", "small")))
    assert spec.global_prompt == "a large red star and a small blue circle in front of a brick wall"
    assert spec.layer_prompts == ["a brick wall", "a large red star", "a small blue circle"]
    three = ToySpec("night sky", (*spec.objects, ToyObject("cross", "white", "small", "left")))
    assert three.global_prompt == ("a large red star, a small blue circle and a small white cross on the left "
                                   "in front of a night sky")


def test_render_is_deterministic_per_seed_and_index():
    a, b = render_sample(5, 17, SIZE), render_sample(5, 17, SIZE)
    for x, y in zip([a.background, *a.foregrounds, *a.masks], [b.background, *b.foregrounds, *b.masks]):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert (a.global_prompt, a.extra) == (b.global_prompt, b.extra)
    c = render_sample(6, 17, SIZE)
    assert c.key != a.key and not np.array_equal(np.asarray(a.background), np.asarray(c.background))


def test_layer_counts_and_specs():
    assert {render_sample(1, i, SIZE, layer_probs={4: 1}).num_layers for i in range(5)} == {4}
    assert render_sample(1, 0, SIZE, num_layers=2).num_layers == 2
    rng = np.random.default_rng(0)
    counts = [sample_prompt_spec(rng).num_layers for _ in range(600)]
    assert all(150 <= counts.count(n) <= 250 for n in (2, 3, 4))  # equal by default
    spec = ToySpec.from_dict(sample_prompt_spec(np.random.default_rng(3), num_layers=4).to_dict())
    s = render_from_spec(spec, SIZE, rng=9, key="eval-1")
    assert s.key == "eval-1" and s.layer_prompts == spec.layer_prompts and s.extra["background"] == spec.background
    with pytest.raises(LayerDiffError, match="cannot be laid out"):
        render_from_spec(ToySpec("blue sky", tuple(ToyObject("square", c, "large", "centre") for c in ("red", "blue"))), SIZE)
    with pytest.raises(LayerDiffError, match="use one of"):
        ToyObject("hexagon", "red", "small")
    with pytest.raises(LayerDiffError, match="1 to 3"):
        ToySpec("blue sky", ())


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in list_shards(d)}


def test_dataset_is_reproducible_and_independent_of_sharding(tmp_path):
    a = generate_toy_dataset(tmp_path / "a", 10, seed=3, size=SIZE, samples_per_shard=4, workers=1)
    generate_toy_dataset(tmp_path / "b", 10, seed=3, size=SIZE, samples_per_shard=4, workers=2)  # two processes
    assert [p.name for p in a] == ["toy-000000.tar", "toy-000001.tar", "toy-000002.tar"]
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    generate_toy_dataset(tmp_path / "c", 10, seed=3, size=SIZE, samples_per_shard=10, workers=1)
    flat = [s for p in list_shards(tmp_path / "a") for s in read_shard(p)]
    one = list(read_shard(list_shards(tmp_path / "c")[0]))
    assert [s.key for s in flat] == [s.key for s in one] == [f"toy-3-{i:08d}" for i in range(10)]
    assert all(np.array_equal(np.asarray(x.foregrounds[-1]), np.asarray(y.foregrounds[-1])) for x, y in zip(flat, one))
    manifest = json.loads((tmp_path / "a" / "toy_manifest.json").read_text())
    assert manifest["samples"] == 10 and manifest["shards"] == 3


def test_existing_shards_are_never_overwritten_silently(tmp_path):
    out = tmp_path / "d"
    generate_toy_dataset(out, 6, size=SIZE, samples_per_shard=2, workers=1)
    before = shard_bytes(out)
    with pytest.raises(LayerDiffError, match="already holds 3 shards"):
        generate_toy_dataset(out, 4, seed=1, size=SIZE, samples_per_shard=2, workers=1)
    assert shard_bytes(out) == before
    generate_toy_dataset(out, 2, seed=1, size=SIZE, samples_per_shard=2, workers=1, overwrite=True)
    assert [p.name for p in list_shards(out)] == ["toy-000000.tar"]  # stale shards of the old run removed
    assert [s.key for s in read_shard(out / "toy-000000.tar")] == ["toy-1-00000000", "toy-1-00000001"]


def test_killed_run_leaves_only_complete_shards_and_resume_finishes(tmp_path, monkeypatch):
    out = tmp_path / "k"
    real = toy.render_sample

    def dying(seed, index, *args, **kwargs):
        if index == 5:
            raise KeyboardInterrupt  # as if the run were stopped inside the third shard
        return real(seed, index, *args, **kwargs)

    monkeypatch.setattr(toy, "render_sample", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_toy_dataset(out, 8, size=SIZE, samples_per_shard=2, workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["toy-000000.tar", "toy-000001.tar", "toy_manifest.json"]
    monkeypatch.setattr(toy, "render_sample", real)
    with pytest.raises(LayerDiffError, match="other settings"):
        generate_toy_dataset(out, 8, seed=2, size=SIZE, samples_per_shard=2, workers=1, resume=True)
    generate_toy_dataset(out, 8, size=SIZE, samples_per_shard=2, workers=1, resume=True)
    generate_toy_dataset(tmp_path / "ref", 8, size=SIZE, samples_per_shard=2, workers=1)
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "positive"),
    ({"size": 100}, "multiple of 8"),
    ({"layer_probs": {5: 1}}, "not possible"),
    ({"overwrite": True, "resume": True}, "contradict"),
])
def test_generate_rejects_bad_input(tmp_path, kwargs, message):
    args = {"samples": 4, "size": SIZE} | kwargs
    with pytest.raises(LayerDiffError, match=message):
        generate_toy_dataset(tmp_path / "x", workers=1, **args)


def test_cli_toy_and_inspect_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["data", "toy", "--out", str(out), "--samples", "9", "--size", "64", "--samples-per-shard", "4",
            "--workers", "1", "--seed", "4", "--layers", "3:1,4:1"]
    assert main(argv) == 0
    assert len(list_shards(out)) == 3 and "wrote 9 toy samples" in capsys.readouterr().out
    assert main(argv) == 1
    assert "already holds 3 shards" in capsys.readouterr().err and len(list_shards(out)) == 3
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()

    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(out), "--sheet", str(sheet), "--count", "3"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(next(line for line in printed.splitlines() if line.startswith("{")))
    assert summary["samples"] == 9 and set(summary["by_layers"]) == {"3", "4"} and summary["shards"] == 3
    assert "total" in printed and sheet.is_file()
    from PIL import Image

    with Image.open(sheet) as im:
        assert im.size[0] == 8 * 128 and im.size[1] > 3 * 128


@pytest.mark.parametrize("argv, message", [
    (["data", "toy", "--out", "{tmp}/a", "--samples", "0"], "--samples 0"),
    (["data", "toy", "--out", "{tmp}/a", "--samples", "3", "--size", "60"], "--size 60"),
    (["data", "toy", "--out", "{tmp}/a", "--samples", "3", "--layers", "1,2"], "--layers"),
    (["data", "inspect", "{tmp}/missing"], "does not exist"),
    (["data", "inspect", "{tmp}"], "no .tar shards"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
