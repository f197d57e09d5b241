"""Layer-set export: file set, pixel contents, determinism, overwrite and folder errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from layerdiff.errors import LayerDiffError
from layerdiff.io.export import write_layer_set, write_layer_sets
from layerdiff.stack import LayerStack


def make_stack(batch: int = 1) -> LayerStack:
    g = torch.Generator().manual_seed(1)
    return LayerStack(
        images=torch.rand(batch, 3, 4, 6, 3, generator=g),
        masks=(torch.rand(batch, 2, 4, 6, generator=g) > 0.5).float(),
        names=("background", "cat", "hat"),
        prompts=("room", "a cat", "a red hat"),
        global_prompt="a cat in a hat",
        seeds=(7, 8, 9),
    )


def u8(t: torch.Tensor) -> np.ndarray:
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


EXPECTED = [
    "composite.png", "layer_00.png", "layer_01.png", "layer_02.png",
    "mask_01.png", "mask_02.png", "layers.psd", "meta.json",
]  # fmt: skip


def test_write_layer_set_contents(tmp_path):
    stack = make_stack()
    out = tmp_path / "new" / "set"  # created, parents too
    paths = write_layer_set(stack, out, {"steps": 20, "sampler": "ddim"})
    assert [p.name for p in paths] == EXPECTED
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPECTED)  # nothing else (no temp files)

    comp = Image.open(out / "composite.png")
    assert comp.mode == "RGB" and comp.size == (6, 4)
    assert np.array_equal(np.asarray(comp), u8(stack.composite()[0]))
    bg = Image.open(out / "layer_00.png")
    assert bg.mode == "RGB" and np.array_equal(np.asarray(bg), u8(stack.images[0, 0]))
    for i in (1, 2):
        layer = Image.open(out / f"layer_{i:02d}.png")
        assert layer.mode == "RGBA" and np.array_equal(np.asarray(layer), u8(stack.layer_rgba(i)[0]))
        mask = Image.open(out / f"mask_{i:02d}.png")
        assert mask.mode == "L" and np.array_equal(np.asarray(mask), u8(stack.masks[0, i - 1]))
        assert set(np.unique(np.asarray(mask))) <= {0, 255}

    meta = json.loads((out / "meta.json").read_text("utf-8"))
    assert meta["steps"] == 20 and meta["sampler"] == "ddim"
    assert (meta["width"], meta["height"], meta["num_layers"]) == (6, 4, 3)
    assert meta["global_prompt"] == "a cat in a hat" and meta["psd"] == "layers.psd"
    assert [layer["name"] for layer in meta["layers"]] == list(stack.names)
    assert [layer["prompt"] for layer in meta["layers"]] == list(stack.prompts)
    assert [layer["seed"] for layer in meta["layers"]] == [7, 8, 9]
    assert meta["layers"][0]["mask"] is None and meta["layers"][2]["mask"] == "mask_02.png"

    from layerdiff.io.psd import load_psd

    assert load_psd(out / "layers.psd").names == stack.names


def test_png_bytes_are_deterministic(tmp_path):
    stack = make_stack()
    write_layer_set(stack, tmp_path / "a", {"x": 1}, psd=False)
    write_layer_set(stack, tmp_path / "b", {"x": 1}, psd=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "layers.psd" not in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_overwrite_checked_before_writing(tmp_path):
    stack = make_stack()
    (tmp_path / "mask_02.png").write_bytes(b"old")
    with pytest.raises(LayerDiffError, match="already holds .*mask_02.png: pass overwrite=True"):
        write_layer_set(stack, tmp_path, {})
    assert [p.name for p in tmp_path.iterdir()] == ["mask_02.png"]  # nothing half-written
    assert (tmp_path / "mask_02.png").read_bytes() == b"old"
    write_layer_set(stack, tmp_path, {}, overwrite=True)
    assert Image.open(tmp_path / "mask_02.png").mode == "L"


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(LayerDiffError, match="output folder .*file exists as a file"):
        write_layer_set(make_stack(), blocker, {})
    with pytest.raises(LayerDiffError, match="cannot create output folder .*file/sub"):
        write_layer_set(make_stack(), blocker / "sub", {})


def test_bad_meta_and_batch_index(tmp_path):
    with pytest.raises(LayerDiffError, match="meta cannot be written as JSON"):
        write_layer_set(make_stack(), tmp_path / "m", {"tensor": torch.zeros(1)})
    with pytest.raises(LayerDiffError, match="meta cannot be written as JSON"):
        write_layer_set(make_stack(), tmp_path / "m", {"cfg": float("nan")})
    with pytest.raises(
        LayerDiffError, match=r"batch_index 2 is out of range for a batch of 1 samples \(0..0\)"
    ):
        write_layer_set(make_stack(), tmp_path / "m", {}, batch_index=2)
    assert not (tmp_path / "m").exists()


def test_write_layer_sets_batches(tmp_path):
    one = write_layer_sets(make_stack(), tmp_path / "single", {}, psd=False)
    assert {p.parent for p in one} == {tmp_path / "single"}

    stack = make_stack(batch=2)
    paths = write_layer_sets(stack, tmp_path / "many", {"run": "t"}, psd=False)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["sample_000", "sample_001"]
    assert len(paths) == 2 * (len(EXPECTED) - 1)
    for b in range(2):
        d = tmp_path / "many" / f"sample_{b:03d}"
        assert np.array_equal(np.asarray(Image.open(d / "composite.png")), u8(stack.composite()[b]))
        meta = json.loads((d / "meta.json").read_text("utf-8"))
        assert meta["batch_index"] == b and meta["run"] == "t"
        assert [layer["seed"] for layer in meta["layers"]] == ([7, 8, 9] if b == 0 else [None] * 3)

    with pytest.raises(
        LayerDiffError, match=r"many already holds sample_000/composite.png, .*\(and 10 more\)"
    ):
        write_layer_sets(stack, tmp_path / "many", {}, psd=False)
    write_layer_sets(stack, tmp_path / "many", {}, overwrite=True, psd=False)

    clash = tmp_path / "clash" / "sample_001"
    clash.mkdir(parents=True)
    (clash / "meta.json").write_text("old")
    with pytest.raises(
        LayerDiffError, match=r"clash already holds sample_001/meta.json: pass overwrite=True"
    ):
        write_layer_sets(stack, tmp_path / "clash", {}, psd=False)
    assert not (tmp_path / "clash" / "sample_000").exists()  # sample 0 was not written either
    assert (clash / "meta.json").read_text() == "old"
