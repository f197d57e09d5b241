"""PSD save/load: round trip at 8 bits, placement of offset layers, groups, errors."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from layerdiff.errors import LayerDiffError
from layerdiff.io.psd import load_psd, save_psd
from layerdiff.stack import LayerStack

psd_tools = pytest.importorskip("psd_tools")


def q8(t: torch.Tensor) -> torch.Tensor:
    """What 8-bit storage gives back."""
    return (t.clamp(0, 1) * 255).round() / 255


def random_stack(batch: int = 1, layers: int = 3, h: int = 5, w: int = 7) -> LayerStack:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, layers, h, w, 3, generator=g)
    masks = torch.rand(batch, layers - 1, h, w, generator=g)
    masks[..., 0, :] = 0.0  # fully transparent row: its RGB must still survive
    names = ("sky", "tree", "chäir – ünïcode")[:layers]
    return LayerStack(images=images, masks=masks, names=names, prompts=("a",) * layers)


def test_round_trip(tmp_path):
    stack = random_stack(batch=2)
    path = save_psd(stack, tmp_path / "out.psd", batch_index=1)
    assert path == tmp_path / "out.psd" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out.psd"]  # no temp files left
    back = load_psd(path)
    assert back.batch_size == 1 and back.names == stack.names and back.latents is None
    assert back.prompts == ("", "", "")
    torch.testing.assert_close(back.images[0], q8(stack.images[1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(back.masks[0], q8(stack.masks[1]), atol=1e-6, rtol=0)

    psd = psd_tools.PSDImage.open(path)
    assert [layer.name for layer in psd] == list(stack.names)  # bottom -> top
    assert (psd.width, psd.height) == (7, 5)
    merged = np.asarray(psd.topil().convert("RGB"), dtype=np.float32) / 255
    expected = stack.select_batch([1]).composite()[0].numpy()
    assert np.abs(merged - expected).max() <= 2.5 / 255  # stored composite, 8-bit rounding of layers


def test_overwrite_refused_then_allowed(tmp_path):
    stack = random_stack(layers=2)
    path = tmp_path / "a.psd"
    path.write_bytes(b"keep me")
    with pytest.raises(LayerDiffError, match="already exists: pass overwrite=True") as err:
        save_psd(stack, path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == b"keep me"
    save_psd(stack, path, overwrite=True)
    assert load_psd(path).num_layers == 2
    with pytest.raises(LayerDiffError, match="batch_index 1 is out of range"):
        save_psd(stack, tmp_path / "b.psd", batch_index=1)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(LayerDiffError, match="does not exist") as err:
        load_psd(tmp_path / "nope.psd")
    assert "nope.psd" in str(err.value)
    bad = tmp_path / "bad.psd"
    bad.write_bytes(b"not a psd at all")
    with pytest.raises(LayerDiffError, match="cannot read .* as a PSD file"):
        load_psd(bad)


def test_no_pixel_layers(tmp_path):
    path = tmp_path / "empty.psd"
    psd_tools.PSDImage.new("RGB", (4, 4)).save(path)
    with pytest.raises(LayerDiffError, match="has no pixel layers: found no layers at all"):
        load_psd(path)


def test_offsets_groups_hidden_and_transparent_background(tmp_path):
    psd = psd_tools.PSDImage.new("RGBA", (4, 3))
    bg = np.zeros((3, 4, 4), np.uint8)
    bg[..., 0] = 255
    bg[..., 3] = 255
    bg[0, 0, 3] = 0  # one transparent background pixel -> composited over white
    psd.create_pixel_layer(Image.fromarray(bg), name="bg")
    inner = psd.create_pixel_layer(
        Image.fromarray(np.full((1, 2, 4), 255, np.uint8)), name="in group", left=1, top=2
    )
    psd.create_group([inner], name="group")
    psd.create_pixel_layer(Image.fromarray(np.full((2, 2, 4), 255, np.uint8)), name="hidden").visible = False
    edge = np.full((2, 3, 4), 128, np.uint8)
    edge[..., 3] = 255
    psd.create_pixel_layer(Image.fromarray(edge), name="edge", left=2, top=-1)  # partly off canvas
    path = tmp_path / "hand.psd"
    psd.save(path)

    s = load_psd(path)
    assert s.names == ("bg", "in group", "edge")
    assert s.images[0, 0, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert s.images[0, 0, 1, 1].tolist() == [1.0, 0.0, 0.0]
    group_mask = torch.zeros(3, 4)
    group_mask[2, 1:3] = 1.0
    assert torch.equal(s.masks[0, 0], group_mask)
    assert torch.equal(s.images[0, 1, 0, 0], torch.full((3,), 0.5))  # outside the layer: grey
    edge_mask = torch.zeros(3, 4)
    edge_mask[0, 2:4] = 1.0  # rows -1..0 and columns 2..4 of a 3x4 canvas
    assert torch.equal(s.masks[0, 1], edge_mask)
    torch.testing.assert_close(s.images[0, 2, 0, 3], torch.full((3,), 128 / 255))


def test_layer_mask_and_opacity(tmp_path):
    # An RGB (not RGBA) document keeps a layer's alpha as a layer mask, as Photoshop users often do.
    psd = psd_tools.PSDImage.new("RGB", (3, 2))
    psd.create_pixel_layer(Image.fromarray(np.full((2, 3, 3), 200, np.uint8)), name="bg")
    fg = np.full((2, 3, 4), 100, np.uint8)
    fg[..., 3] = 255
    fg[0, 0, 3] = 0
    psd.create_pixel_layer(Image.fromarray(fg), name="fg", opacity=102)  # 40 %
    path = tmp_path / "masked.psd"
    psd.save(path)
    s = load_psd(path)
    expected = torch.full((2, 3), 0.4)
    expected[0, 0] = 0.0
    torch.testing.assert_close(s.masks[0, 0], expected)
    torch.testing.assert_close(s.images[0, 1], torch.full((2, 3, 3), 100 / 255))


def test_missing_psd_tools_names_pip_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psd_tools", None)  # import psd_tools now raises ImportError
    with pytest.raises(LayerDiffError, match='pip install "psd-tools'):
        save_psd(random_stack(layers=2), tmp_path / "x.psd")
    assert not (tmp_path / "x.psd").exists()
