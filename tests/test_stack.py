"""LayerStack: exact expectations on tiny hand-built stacks (B=1, L=3, 2x2 unless stated)."""

import dataclasses

import pytest
import torch

from layerdiff.errors import LayerDiffError
from layerdiff.stack import LayerStack

# Values are exact binary fractions so composites can be compared with torch.equal.
BG, F1, F2 = 0.25, 0.5, 1.0
M1 = [[1.0, 1.0], [0.0, 0.5]]
M2 = [[0.0, 1.0], [0.0, 0.5]]


def make_stack(batch: int = 1, latents: bool = True) -> LayerStack:
    images = torch.stack(
        [torch.full((2, 2, 3), BG), torch.full((2, 2, 3), F1), torch.full((2, 2, 3), F2)]
    )  # (L, H, W, 3)
    images = images.unsqueeze(0).repeat(batch, 1, 1, 1, 1)  # (B, L, H, W, 3)
    masks = torch.tensor([M1, M2]).unsqueeze(0).repeat(batch, 1, 1, 1)  # (B, K, H, W)
    lat = None
    if latents:
        # layer l's latent is filled with l (+ 10 * sample) so permutations are visible
        lat = torch.arange(3.0).view(1, 3, 1, 1, 1).repeat(batch, 1, 8, 1, 1)
        lat = lat + 10 * torch.arange(float(batch)).view(batch, 1, 1, 1, 1)  # (B, L, 8, 1, 1)
    return LayerStack(
        images=images,
        masks=masks,
        latents=lat,
        names=("bg", "a", "b"),
        prompts=("sky", "tree", "dog"),
        global_prompt="a dog by a tree",
        seeds=(1, 2, 3),
    )


def latent_ids(stack: LayerStack) -> list[int]:
    return [int(v) for v in stack.latents[0, :, 0, 0, 0]]


# ---- construction and validation ---------------------------------------------------------------


def test_properties_and_defaults():
    s = make_stack()
    assert (s.batch_size, s.num_layers, s.num_foregrounds, s.height, s.width) == (1, 3, 2, 2, 2)
    d = LayerStack(images=s.images, masks=s.masks)
    assert d.names == ("background", "layer 1", "layer 2")
    assert d.prompts == ("", "", "") and d.seeds == (None, None, None) and d.latents is None
    assert "LayerStack(images=(1, 3, 2, 2, 3)" in repr(s)


def test_frozen():
    s = make_stack()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.names = ("x", "y", "z")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(images=torch.zeros(1, 3, 2, 2, 4), masks=torch.zeros(1, 2, 2, 2)), "(1, 3, 2, 2, 4)"),
        (dict(images=torch.zeros(1, 0, 2, 2, 3), masks=torch.zeros(1, 0, 2, 2)), "no layers"),
        (dict(images=torch.zeros(1, 3, 2, 2, 3), masks=torch.zeros(1, 3, 2, 2)), "(1, 2, 2, 2)"),
        (dict(images=torch.zeros(1, 3, 2, 2, 3, dtype=torch.uint8), masks=torch.zeros(1, 2, 2, 2)), "uint8"),
        (dict(images=torch.zeros(1, 3, 2, 2, 3), masks=torch.zeros(1, 2, 2, 2, dtype=torch.int64)), "int64"),
        (
            dict(
                images=torch.zeros(1, 3, 2, 2, 3),
                masks=torch.zeros(1, 2, 2, 2),
                latents=torch.zeros(1, 3, 4, 1, 1),
            ),
            "(1, 3, 4, 1, 1)",
        ),
        (dict(images=torch.zeros(1, 3, 2, 2, 3), masks=torch.zeros(1, 2, 2, 2), names=("a",)), "1 entries"),
        (dict(images=torch.zeros(1, 3, 2, 2, 3), masks=torch.zeros(1, 2, 2, 2), seeds=("x", 1, 2)), "seeds"),
    ],
)
def test_validation_errors(kwargs, fragment):
    with pytest.raises(LayerDiffError) as err:
        LayerStack(**kwargs)
    assert fragment in str(err.value)


def test_background_only_stack():
    s = LayerStack(images=torch.full((2, 1, 2, 2, 3), BG), masks=torch.zeros(2, 0, 2, 2))
    assert torch.equal(s.composite(), torch.full((2, 2, 2, 3), BG))
    assert torch.equal(s.binarized().masks, s.masks)
    assert torch.equal(s.flat_masks(), torch.ones(2, 2, 2))


# ---- compositing and views ---------------------------------------------------------------------


def test_composite_formula_and_front_wins():
    # C1 = M1 F1 + (1 - M1) B; C2 = M2 F2 + (1 - M2) C1, by hand per pixel:
    # (0,0): 0.5 -> 0.5;  (0,1) both masks 1: front wins -> 1.0;  (1,0): 0.25;  (1,1): .375 -> .6875
    expected = torch.tensor([[0.5, 1.0], [0.25, 0.6875]]).unsqueeze(-1).expand(2, 2, 3)
    out = make_stack().composite()
    assert out.shape == (1, 2, 2, 3)
    assert torch.equal(out[0], expected)


def test_composite_order_matters():
    s = make_stack()
    swapped = s.reorder([2, 1]).composite()
    assert swapped[0, 0, 1, 0].item() == F1  # now layer "a" (0.5) is in front at the overlap


def test_rgba_and_layer_rgba():
    s = make_stack()
    rgba = s.rgba()
    assert rgba.shape == (1, 3, 2, 2, 4)
    assert torch.equal(rgba[..., :3], s.images)
    assert torch.equal(rgba[0, 0, ..., 3], torch.ones(2, 2))
    assert torch.equal(rgba[0, 1, ..., 3], torch.tensor(M1))
    assert torch.equal(rgba[0, 2, ..., 3], torch.tensor(M2))
    for i in range(3):
        assert torch.equal(s.layer_rgba(i), rgba[:, i])
    with pytest.raises(
        LayerDiffError, match=r"layer index 5 is out of range for a stack of 3 layers \(0..2\)"
    ):
        s.layer_rgba(5)


def test_flat_batch_is_sample_major():
    s = make_stack(batch=2)
    images = s.images.clone()
    images[1] += 0.0625  # tell sample 1 apart
    s = dataclasses.replace(s, images=images)
    flat, masks = s.flat_rgba_batch(), s.flat_masks()
    assert flat.shape == (6, 2, 2, 4) and masks.shape == (6, 2, 2)
    for b in range(2):
        for layer in range(3):
            assert torch.equal(flat[b * 3 + layer], s.layer_rgba(layer)[b])
            assert torch.equal(masks[b * 3 + layer], flat[b * 3 + layer, ..., 3])
    assert torch.equal(masks[3], torch.ones(2, 2))


def test_binarized_resolves_overlap_front_wins():
    s = make_stack()
    hard = s.binarized(0.5)  # 0.5 is not > 0.5
    assert torch.equal(hard.masks[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(hard.masks[0, 1], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    low = s.binarized(0.25)  # (1,1) is set in both: the front layer owns it
    assert torch.equal(low.masks[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(low.masks[0, 1], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert (low.masks.sum(1) <= 1).all()
    assert low.latents is s.latents
    with pytest.raises(LayerDiffError, match="threshold"):
        s.binarized(1.5)


# ---- layer selection and order -----------------------------------------------------------------


def test_select_layers_permutes_everything():
    s = make_stack()
    t = s.select_layers([0, 2])
    assert t.names == ("bg", "b") and t.prompts == ("sky", "dog") and t.seeds == (1, 3)
    assert torch.equal(t.images[0, 1], s.images[0, 2])
    assert torch.equal(t.masks[0, 0], torch.tensor(M2))
    assert latent_ids(t) == [0, 2]
    assert t.global_prompt == s.global_prompt
    with pytest.raises(LayerDiffError, match="must start with 0"):
        s.select_layers([1, 0])
    with pytest.raises(LayerDiffError, match="repeat"):
        s.select_layers([0, 1, 1])
    with pytest.raises(LayerDiffError, match="out of range"):
        s.select_layers([0, 3])


def test_remove_layer():
    s = make_stack()
    t = s.remove_layer(1)
    assert t.names == ("bg", "b") and latent_ids(t) == [0, 2]
    assert torch.equal(t.masks[0, 0], torch.tensor(M2))
    with pytest.raises(LayerDiffError, match="background, which cannot be removed"):
        s.remove_layer(0)
    with pytest.raises(
        LayerDiffError, match=r"layer index 3 is out of range for a stack of 3 layers \(0..2\)"
    ):
        s.remove_layer(3)


def test_reorder_and_move():
    s = make_stack()
    t = s.reorder([2, 1])
    assert t.names == ("bg", "b", "a") and t.seeds == (1, 3, 2) and latent_ids(t) == [0, 2, 1]
    assert torch.equal(t.masks[0], torch.tensor([M2, M1]))
    assert torch.equal(t.images[0, 1], s.images[0, 2])
    with pytest.raises(LayerDiffError, match="not a permutation"):
        s.reorder([0, 1, 2])
    with pytest.raises(LayerDiffError, match="not a permutation"):
        s.reorder([1, 1])
    m = s.move_layer(1, 2)
    assert m.names == ("bg", "b", "a") and latent_ids(m) == [0, 2, 1]
    assert s.move_layer(2, 2).names == s.names
    with pytest.raises(LayerDiffError, match="target position 3 is out of range"):
        s.move_layer(1, 3)
    with pytest.raises(LayerDiffError, match="background"):
        s.move_layer(0, 1)


def test_move_layer_four_foregrounds():
    images = torch.zeros(1, 5, 1, 1, 3)
    s = LayerStack(
        images=images,
        masks=torch.zeros(1, 4, 1, 1),
        latents=torch.arange(5.0).view(1, 5, 1, 1, 1).repeat(1, 1, 8, 1, 1),
    )
    t = s.move_layer(4, 1)
    assert t.names == ("background", "layer 4", "layer 1", "layer 2", "layer 3")
    assert latent_ids(t) == [0, 4, 1, 2, 3]


# ---- pixel transforms --------------------------------------------------------------------------


def test_translate_layer():
    images = torch.zeros(1, 2, 3, 3, 3)
    images[0, 1, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    masks = torch.zeros(1, 1, 3, 3)
    masks[0, 0, 0, 0] = 1.0
    s = LayerStack(images=images, masks=masks, latents=torch.zeros(1, 2, 8, 1, 1))
    t = s.translate_layer(1, 2, 1)  # right 2, down 1
    expected_mask = torch.zeros(3, 3)
    expected_mask[1, 2] = 1.0
    assert torch.equal(t.masks[0, 0], expected_mask)
    assert torch.equal(t.images[0, 1, 1, 2], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(t.images[0, 1, 0], torch.full((3, 3), 0.5))  # exposed row: grey
    assert torch.equal(t.images[0, 1, :, :2], torch.full((3, 2, 3), 0.5))  # exposed columns: grey
    assert torch.equal(t.images[0, 0], s.images[0, 0]) and t.latents is None
    back = t.translate_layer(1, -2, -1)
    assert torch.equal(back.masks, s.masks)
    gone = s.translate_layer(1, 5, 0)
    assert torch.equal(gone.masks, torch.zeros(1, 1, 3, 3))
    assert torch.equal(gone.images[0, 1], torch.full((3, 3, 3), 0.5))
    assert torch.equal(s.translate_layer(1, 0, 0).images, s.images)
    with pytest.raises(LayerDiffError, match="dx must be a whole number"):
        s.translate_layer(1, 1.5, 0)
    with pytest.raises(LayerDiffError, match="background"):
        s.translate_layer(0, 1, 0)


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    """Mass centre (x, y) of an (H, W) mask in continuous pixel coordinates."""
    h, w = mask.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    total = mask.sum()
    return ((mask * xs).sum() / total).item(), ((mask * ys).sum() / total).item()


def test_scale_layer():
    h = w = 8
    images = torch.zeros(1, 2, h, w, 3)
    images[0, 1] = 0.75
    masks = torch.zeros(1, 1, h, w)
    masks[0, 0, 2:4, 2:4] = 1.0  # bbox centre (3, 3)
    s = LayerStack(images=images, masks=masks, latents=torch.zeros(1, 2, 8, 1, 1))
    assert s.mask_bbox_centers(1).tolist() == [[3.0, 3.0]]
    same = s.scale_layer(1, 1.0)
    torch.testing.assert_close(same.masks, s.masks)
    torch.testing.assert_close(same.images, s.images)
    # Bilinear resampling softens the edges, so check area, centre and the solid core.
    big = s.scale_layer(1, 2.0)  # about (3, 3): the 2x2 square becomes 4x4 on [1, 5)
    assert big.latents is None
    assert big.masks.sum().item() == pytest.approx(16.0)
    assert centroid(big.masks[0, 0]) == pytest.approx((3.0, 3.0))
    assert torch.equal(big.masks[0, 0, 2:4, 2:4], torch.ones(2, 2))
    assert big.masks[0, 0, 6:].abs().sum() == 0 and big.masks[0, 0, :, 6:].abs().sum() == 0
    shifted = s.scale_layer(1, 2.0, center=(2.0, 2.0))  # top-left corner stays: square on [2, 6)
    assert shifted.masks.sum().item() == pytest.approx(16.0)
    assert centroid(shifted.masks[0, 0]) == pytest.approx((4.0, 4.0))
    small = s.scale_layer(1, 0.25, center=(4.0, 4.0))  # whole image shrinks: edges become grey
    torch.testing.assert_close(small.images[0, 1, 0, 0], torch.full((3,), 0.5))
    torch.testing.assert_close(small.images[0, 1, 4, 4], torch.full((3,), 0.75))
    with pytest.raises(LayerDiffError, match="scale factor"):
        s.scale_layer(1, 0)


def test_replace_layer():
    s = make_stack()
    new_image = torch.full((1, 2, 2, 3), 0.125)
    t = s.replace_layer(2, image=new_image, prompt="cat", name="c")
    assert torch.equal(t.images[0, 2], new_image[0]) and torch.equal(t.images[0, :2], s.images[0, :2])
    assert t.names == ("bg", "a", "c") and t.prompts == ("sky", "tree", "cat") and t.seeds == (1, 2, 3)
    assert t.latents is None  # new pixels, no new latent
    lat = torch.full((1, 8, 1, 1), 7.0)
    u = s.replace_layer(1, image=new_image, mask=torch.zeros(1, 2, 2), latent=lat, seed=42)
    assert latent_ids(u) == [0, 7, 2] and u.seeds == (1, 42, 3)
    assert torch.equal(u.masks[0, 0], torch.zeros(2, 2)) and torch.equal(u.masks[0, 1], s.masks[0, 1])
    assert latent_ids(s.replace_layer(0, prompt="sea")) == [0, 1, 2]
    with pytest.raises(LayerDiffError, match="background, which has no mask"):
        s.replace_layer(0, mask=torch.zeros(1, 2, 2))
    with pytest.raises(LayerDiffError, match=r"\(1, 2, 2, 3\), got \(2, 2, 3\)"):
        s.replace_layer(1, image=torch.zeros(2, 2, 3))
    with pytest.raises(LayerDiffError, match="no latents"):
        make_stack(latents=False).replace_layer(1, latent=lat)


# ---- batch -------------------------------------------------------------------------------------


def test_select_batch_and_concat():
    s = make_stack(batch=3)
    t = s.select_batch([2, 0])
    assert t.batch_size == 2 and t.latents[:, 0, 0, 0, 0].tolist() == [20.0, 0.0]
    assert t.seeds == (None, None, None)  # seeds describe sample 0, which is no longer first
    assert s.select_batch([0, 1]).seeds == (1, 2, 3)
    with pytest.raises(
        LayerDiffError, match=r"batch index 3 is out of range for a batch of 3 samples \(0..2\)"
    ):
        s.select_batch([3])
    c = LayerStack.concat([s.select_batch([0]), s.select_batch([1, 2])])
    assert (
        torch.equal(c.images, s.images)
        and torch.equal(c.masks, s.masks)
        and torch.equal(c.latents, s.latents)
    )
    assert c.seeds == (1, 2, 3)
    mixed = LayerStack.concat([s, make_stack(latents=False)])
    assert mixed.batch_size == 4 and mixed.latents is None


def test_concat_errors():
    s = make_stack()
    with pytest.raises(LayerDiffError, match="2 layers but stack 0 has 3"):
        LayerStack.concat([s, s.remove_layer(1)])
    with pytest.raises(LayerDiffError, match="layer names"):
        LayerStack.concat([s, s.replace_layer(1, name="z")])
    other = LayerStack(images=torch.zeros(1, 3, 4, 2, 3), masks=torch.zeros(1, 2, 4, 2), names=s.names)
    with pytest.raises(LayerDiffError, match="2x4 but stack 0 is 2x2"):
        LayerStack.concat([s, other])
    with pytest.raises(LayerDiffError, match="non-empty"):
        LayerStack.concat([])


# ---- conversion --------------------------------------------------------------------------------


def test_with_latents_to_and_from_rgba():
    s = make_stack(latents=False)
    assert s.with_latents(torch.zeros(1, 3, 8, 1, 1)).latents.shape == (1, 3, 8, 1, 1)
    with pytest.raises(LayerDiffError, match=r"\(1, 2, 8, 1, 1\)"):
        s.with_latents(torch.zeros(1, 2, 8, 1, 1))
    d = s.to("cpu", dtype=torch.float64)
    assert d.images.dtype == torch.float64 and d.masks.dtype == torch.float64
    r = LayerStack.from_rgba(
        s.images[:, 0], [s.layer_rgba(1), s.layer_rgba(2)], names=s.names, prompts=s.prompts
    )
    assert torch.equal(r.images, s.images) and torch.equal(r.masks, s.masks) and r.names == s.names
    with pytest.raises(LayerDiffError, match="foreground 1 must be RGBA"):
        LayerStack.from_rgba(s.images[:, 0], [s.images[:, 1]])
    with pytest.raises(LayerDiffError, match=r"background must be RGB \(B, H, W, 3\)"):
        LayerStack.from_rgba(s.layer_rgba(0))
    only_bg = LayerStack.from_rgba(s.images[:, 0])
    assert only_bg.num_layers == 1 and only_bg.masks.shape == (1, 0, 2, 2)


def test_operations_never_modify_inputs():
    s = make_stack(batch=2)
    images, masks, latents = s.images.clone(), s.masks.clone(), s.latents.clone()
    ops = [
        lambda x: x.composite(),
        lambda x: x.rgba(),
        lambda x: x.flat_rgba_batch().add_(1),
        lambda x: x.flat_masks().add_(1),
        lambda x: x.layer_rgba(1).add_(1),
        lambda x: x.binarized(0.25).masks.add_(1),
        lambda x: x.select_layers([0, 2, 1]).images.add_(1),
        lambda x: x.remove_layer(1).latents.add_(1),
        lambda x: x.reorder([2, 1]).masks.add_(1),
        lambda x: x.move_layer(1, 2),
        lambda x: x.translate_layer(1, 1, 0).images.add_(1),
        lambda x: x.scale_layer(2, 1.5).masks.add_(1),
        lambda x: x.replace_layer(1, image=torch.zeros(2, 2, 2, 3), mask=torch.zeros(2, 2, 2)).images.add_(1),
        lambda x: x.replace_layer(1, latent=torch.zeros(2, 8, 1, 1)).latents.add_(1),
        lambda x: x.select_batch([1, 0]).images.add_(1),
        lambda x: LayerStack.concat([x, x]).images.add_(1),
        lambda x: x.to("cpu", dtype=torch.float64).images.add_(1),
    ]
    for op in ops:
        op(s)
        assert (
            torch.equal(s.images, images) and torch.equal(s.masks, masks) and torch.equal(s.latents, latents)
        )


def test_one_automatic_name_scheme_read_in_both_spellings():
    from layerdiff.stack import automatic_name, default_name

    assert default_name(0) == "background" and default_name(2) == "layer 2"
    assert default_name(1, "a red star") == "layer 1: a red star" and len(default_name(1, "x" * 99)) == 60
    assert automatic_name("layer 1: a red star") == (True, "a red star")
    assert automatic_name("layer_3") == (True, "")  # unnamed layers of earlier versions' files
    assert automatic_name("background") == (True, "") and automatic_name("my star") == (False, "")
