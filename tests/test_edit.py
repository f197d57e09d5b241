"""layerdiff.edit: kept layers come back bit-identical (pixels, masks, latents), edits change only
what they should, inputs are never modified, and bad input is answered with a clear error."""

import pytest
import torch

from layerdiff.conditioning import LayerPrompts
from layerdiff.edit import (
    edit_layer,
    ensure_latents,
    inpaint_layer,
    region_to_latent,
    style_layers,
    transform_layer,
)
from layerdiff.errors import LayerDiffError
from layerdiff.io.checkpoint import load_model
from layerdiff.pipeline import generate
from layerdiff.settings import SamplerSettings
from layerdiff.stack import LayerStack

FAST = SamplerSettings(steps=2)
NO_SMG = SamplerSettings(steps=2, mask_guidance=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the threads'
    contention makes them 5-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


@pytest.fixture(scope="module")
def stack(model):
    """Two samples of a 3-layer stack (background + 2 foregrounds), 64x64, with latents."""
    prompts = LayerPrompts("a red star and a blue circle in front of a brick wall",
                           ("a brick wall", "a red star", "a blue circle"))
    return generate(model, prompts, FAST, seed=1, batch=2)


def snapshot(s: LayerStack):
    return [t.clone() for t in (s.images, s.masks, s.latents) if t is not None]


def unchanged(s: LayerStack, snap) -> bool:
    return all(torch.equal(a, b) for a, b in zip([t for t in (s.images, s.masks, s.latents) if t is not None], snap))


def assert_layer_kept(out: LayerStack, ref: LayerStack, j: int):
    assert torch.equal(out.images[:, j], ref.images[:, j]), f"layer {j} pixels changed"
    assert torch.equal(out.latents[:, j], ref.latents[:, j]), f"layer {j} latents changed"
    if j > 0:
        assert torch.equal(out.masks[:, j - 1], ref.masks[:, j - 1]), f"layer {j} mask changed"


def test_edit_keeps_every_other_layer_bit_identical(model, stack):
    snap = snapshot(stack)
    out = edit_layer(model, stack, 1, "a green heart", seed=5, settings=FAST)
    assert unchanged(stack, snap)  # the input is never written into
    for j in (0, 2):
        assert_layer_kept(out, stack, j)
    assert not torch.equal(out.images[:, 1], stack.images[:, 1])
    assert not torch.equal(out.latents[:, 1], stack.latents[:, 1])
    assert set(out.masks[:, 0].unique().tolist()) <= {0.0, 1.0}  # the new mask is binary
    assert out.prompts == ("a brick wall", "a green heart", "a blue circle")
    assert out.names[1] == "layer 1: a green heart" and out.names[2] == stack.names[2]
    assert out.seeds[1] == 5 and out.seeds[2] == stack.seeds[2]
    assert out.global_prompt == "a green heart and a blue circle in front of a brick wall"
    again = edit_layer(model, stack, 1, "a green heart", seed=5, settings=FAST)
    assert torch.equal(again.latents, out.latents)  # same seed, same result


def test_edit_image_only_keeps_the_shape(model, stack):
    one = stack.select_batch([0])
    out = edit_layer(model, one, 2, "a yellow square", seed=2, regenerate="image only", settings=NO_SMG)
    assert torch.equal(out.masks, one.masks)
    assert torch.equal(out.latents[:, 2, 4:], one.latents[:, 2, 4:])  # mask channels locked
    assert not torch.equal(out.latents[:, 2, :4], one.latents[:, 2, :4])
    for j in (0, 1):
        assert_layer_kept(out, one, j)


def test_edit_background_keeps_its_mask_slot_and_the_foregrounds(model, stack):
    one = stack.select_batch([1])
    out = edit_layer(model, one, 0, "a snowy field", seed=3, settings=NO_SMG)
    assert torch.equal(out.latents[:, 0, 4:], one.latents[:, 0, 4:])  # the all-white mask latent
    assert not torch.equal(out.images[:, 0], one.images[:, 0])
    for j in (1, 2):
        assert_layer_kept(out, one, j)


def test_stack_without_latents_is_encoded_and_kept_pixels_are_copied(model, stack):
    user = stack.select_batch([0]).with_latents(None)  # like Layers from Images / a PSD
    encoded = ensure_latents(model, user)
    assert encoded.latents.shape == (1, 3, 8, 8, 8) and user.latents is None
    out = edit_layer(model, user, 1, "a green heart", seed=1, settings=NO_SMG)
    for j in (0, 2):
        assert torch.equal(out.images[:, j], user.images[:, j])
        assert torch.equal(out.latents[:, j], encoded.latents[:, j])
    assert torch.equal(out.masks[:, 1], user.masks[:, 1])


def test_region_to_latent_cells_and_grow(stack):
    region = torch.zeros(64, 64)
    region[9, 9] = 1.0  # one pixel in latent cell (1, 1)
    cells = region_to_latent(region, stack, 8, grow=0)
    assert cells.shape == (2, 8, 8) and cells.sum(dim=(1, 2)).tolist() == [1, 1] and cells[0, 1, 1]
    grown = region_to_latent(region, stack, 8, grow=1)
    assert grown[0, :3, :3].all() and grown[0].sum() == 9
    assert not region_to_latent(torch.full((64, 64), 0.4), stack, 8, 0).any()  # 0.5 threshold


def test_inpaint_changes_only_the_region(model, stack):
    one = stack.select_batch([0])
    region = torch.zeros(1, 64, 64)
    region[:, 20:30, 36:44] = 1.0  # cells rows 2..3, cols 4..5; grown by 1: rows 1..4, cols 3..6
    out = inpaint_layer(model, one, 0, region, "a snowy field", seed=4, grow=1, settings=NO_SMG)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[8:40, 24:56] = True
    assert torch.equal(out.images[0, 0][~inside], one.images[0, 0][~inside])
    assert not torch.equal(out.images[0, 0][inside], one.images[0, 0][inside])
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[1:5, 3:7] = True
    assert torch.equal(out.latents[0, 0][:, ~cells], one.latents[0, 0][:, ~cells])
    for j in (1, 2):
        assert_layer_kept(out, one, j)
    fg = inpaint_layer(model, one, 2, region, "a green heart", seed=4, grow=0, settings=NO_SMG)
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[16:32, 32:48] = False
    assert torch.equal(fg.masks[0, 1][outside], one.masks[0, 1][outside])
    assert torch.equal(fg.images[0, 2][outside], one.images[0, 2][outside])


def test_style_keeps_layout_and_unstyled_layers(model, stack):
    one = stack.select_batch([0])
    snap = snapshot(one)
    out = style_layers(model, one, "watercolor style", 0.6, layers=[1, 2], seed=3, settings=NO_SMG)
    assert unchanged(one, snap)
    assert torch.equal(out.masks, one.masks)
    assert torch.equal(out.latents[:, :, 4:], one.latents[:, :, 4:])  # every mask channel locked
    assert_layer_kept(out, one, 0)
    assert not torch.equal(out.images[:, 1], one.images[:, 1])
    assert out.prompts == ("a brick wall", "a red star, watercolor style", "a blue circle, watercolor style")
    assert out.global_prompt == one.global_prompt  # not every layer restyled
    assert style_layers(model, one, "watercolor style", 0.0) is one
    everything = style_layers(model, one, "pixel art", 1.0, seed=1, settings=NO_SMG)
    assert everything.global_prompt.endswith(", pixel art") and torch.equal(everything.masks, one.masks)


def test_transform_is_plain_stack_ops_and_harmonize_keeps_others(model, stack):
    one = stack.select_batch([0])
    moved = transform_layer(one, 1, dx=5, dy=-3)
    assert torch.equal(moved.images, one.translate_layer(1, 5, -3).images) and moved.latents is None
    assert transform_layer(one, 1, move_to=2).names == one.reorder([2, 1]).names
    assert transform_layer(one, 2, remove=True).num_layers == 2
    scaled = transform_layer(one, 1, scale=0.5)
    assert torch.equal(scaled.masks, one.scale_layer(1, 0.5).masks)
    out = transform_layer(one, 1, dx=8, move_to=2, model=model, harmonize=0.3, seed=2, settings=NO_SMG)
    ref = one.translate_layer(1, 8, 0).move_layer(1, 2)
    assert out.latents is not None and torch.equal(out.masks, ref.masks)
    for j in (0, 1):
        assert torch.equal(out.images[:, j], ref.images[:, j])
    assert not torch.equal(out.images[:, 2], ref.images[:, 2])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, s: edit_layer(m, s, 3, "x"), "layer_index 3 is out of range for a stack of 3 layers: use 0..2"),
        (lambda m, s: edit_layer(m, s, 1, "  "), "is empty"),
        (lambda m, s: edit_layer(m, s, 0, "x", regenerate="mask only"), "background, which has no mask"),
        (lambda m, s: edit_layer(m, s, 1, "x", regenerate="colour"), "regenerate 'colour' is unknown"),
        (lambda m, s: inpaint_layer(m, s, 1, torch.ones(1, 32, 32), "x"), "(1, 32, 32)"),
        (lambda m, s: inpaint_layer(m, s, 1, torch.zeros(64, 64), "x"), "region mask is empty"),
        (lambda m, s: style_layers(m, s, "x", 1.5), "strength 1.5 is outside 0..1"),
        (lambda m, s: style_layers(m, s, "x", 0.5, layers=[4]), "layer index 4 is out of range"),
        (lambda m, s: transform_layer(s, 0, dx=3), "layer_index 0 is the background"),
        (lambda m, s: transform_layer(s, 1, harmonize=0.2), "harmonize > 0 needs a model"),
        (lambda m, s: transform_layer(s, 1, harmonize=-0.1, model=m), "harmonize -0.1 is outside 0..1"),
        (lambda m, s: transform_layer(s, 1, scale=0), "scale 0 is outside 0.05..8"),
    ],
)
def test_bad_input_is_named(model, stack, call, message):
    with pytest.raises(LayerDiffError) as info:
        call(model, stack)
    assert message in str(info.value)


def test_region_mismatch_shows_both_shapes(model, stack):
    with pytest.raises(LayerDiffError, match=r"\(1, 32, 32\).*\(2, 64, 64\)"):
        inpaint_layer(model, stack, 1, torch.ones(1, 32, 32), "x")


def test_stack_the_model_cannot_handle(model):
    five = LayerStack(images=torch.rand(1, 5, 64, 64, 3), masks=torch.rand(1, 4, 64, 64))
    with pytest.raises(LayerDiffError, match="5 layers but this model handles at most 4.*remove 1"):
        edit_layer(model, five, 1, "x")
    odd = LayerStack(images=torch.rand(1, 2, 60, 60, 3), masks=torch.rand(1, 1, 60, 60))
    with pytest.raises(LayerDiffError, match="60x60.*not a multiple of 8: use 56 or 64"):
        style_layers(model, odd, "x", 0.5)


def test_prompts_of_psd_layers_come_from_their_names(model, stack):
    """A PSD saved by the pack names layers 'layer 1: a red star': edits reuse that as the prompt."""
    psd_like = LayerStack(images=stack.images[:1], masks=stack.masks[:1], names=stack.names)
    out = style_layers(model, psd_like, "pixel art", 0.3, layers=[1], seed=1, settings=NO_SMG)
    assert out.prompts[1] == "a red star, pixel art"
