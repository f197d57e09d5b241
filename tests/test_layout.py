"""Layout cleanup: one object per foreground, no two foregrounds in one place (and its hook)."""

from __future__ import annotations

import pytest
import torch
from sampling_support import PROMPTS, sample_with

from layerdiff.conditioning import encode_prompts
from layerdiff.errors import LayerDiffError
from layerdiff.sampling import clean_layout, read_masks
from layerdiff.sampling.layout import _components

WHITE, BLACK = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([-1.0, 0.0, 0.5, 1.0])


EMPTY = torch.cat([torch.tensor([0.1, -0.2, 0.3, 0.0]), BLACK])


def _scene(*layers):
    """x0 (1, 1 + K, 8, 12, 12): background random, foreground k's mask channels black except its
    boxes (y0, y1, x0, x1, value 0..1), image channels random."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1 + len(layers), 8, 12, 12, generator=g)
    for k, boxes in enumerate(layers, start=1):
        x0[0, k, 4:] = BLACK[:, None, None]
        for y0, y1, x0_, x1, v in boxes:
            x0[0, k, 4:, y0:y1, x0_:x1] = (BLACK + v * (WHITE - BLACK))[:, None, None]
    return x0


def test_components_are_eight_connected():
    hard = torch.zeros(1, 6, 6, dtype=torch.bool)
    hard[0, 0:2, 0:2] = True
    hard[0, 2, 2] = True  # touches the first block diagonally: same component
    hard[0, 4:6, 4:6] = True  # separate
    lab = _components(hard)
    assert lab[0, 0, 0] == lab[0, 2, 2] != lab[0, 5, 5]
    assert (lab[~hard] == 36).all() and len(torch.unique(lab[hard])) == 2


def test_clean_layout_keeps_one_object_per_layer():
    x0 = _scene([(1, 5, 1, 5, 1.0), (9, 11, 9, 11, 1.0)], [(1, 3, 8, 11, 0.9)])
    out = clean_layout(x0, WHITE, BLACK, EMPTY)
    m = read_masks(out, WHITE, BLACK)[0] > 0.5
    assert m[0, 1:5, 1:5].all() and not m[0, 8:, 8:].any()  # the smaller copy is gone
    assert torch.equal(out[0, 1, :, 1:5, 1:5], x0[0, 1, :, 1:5, 1:5])  # the kept object is untouched
    torch.testing.assert_close(out[0, 1, :, 9, 9], EMPTY)  # emptied: neutral fill, black mask
    assert torch.equal(out[:, 0], x0[:, 0]) and torch.equal(out[:, 2], x0[:, 2])  # background, clean layer
    assert torch.equal(clean_layout(x0, WHITE, BLACK, EMPTY, strength=0.0), x0)
    padding = torch.tensor([[True, False, True]])  # layer 1 is padding in a mixed batch: left alone
    assert torch.equal(clean_layout(x0, WHITE, BLACK, EMPTY, valid=padding), x0)
    half = clean_layout(x0, WHITE, BLACK, EMPTY, strength=0.5)
    torch.testing.assert_close(half[0, 1, :, 9, 9], (x0[0, 1, :, 9, 9] + EMPTY) / 2)


def test_clean_layout_one_pixel_gap_does_not_split_an_object():
    x0 = _scene([(2, 6, 2, 4, 1.0), (2, 6, 5, 7, 1.0)])  # two bars one latent pixel apart
    assert torch.equal(clean_layout(x0, WHITE, BLACK, EMPTY), x0)


def _touch(a, b):
    """True where mask a has a pixel on or 8-adjacent to a pixel of mask b."""
    grown = torch.nn.functional.max_pool2d(b[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    return bool((a & grown).any())


def test_clean_layout_overlap_goes_to_the_stronger_mask_or_a_priority_layer():
    x0 = _scene([(2, 8, 2, 8, 0.8)], [(5, 10, 5, 10, 1.0)])
    m = read_masks(clean_layout(x0, WHITE, BLACK, EMPTY), WHITE, BLACK)[0] > 0.5
    assert m[1, 5:10, 5:10].all()  # the stronger layer 2 keeps the shared pixels
    assert m[0, 2:4, 2:8].all() and m[0, 2:8, 2:4].all()  # layer 1 keeps what is away from layer 2
    assert not _touch(m[0], m[1])  # and leaves a latent pixel of gap: decoded masks would overlap
    assert torch.equal(clean_layout(x0, WHITE, BLACK, EMPTY, valid=torch.tensor([[True, True, False]]))[:, 1], x0[:, 1])
    no_gap = read_masks(clean_layout(x0, WHITE, BLACK, EMPTY, gap=False), WHITE, BLACK)[0] > 0.5
    assert not (no_gap[0] & no_gap[1]).any() and _touch(no_gap[0], no_gap[1]) and no_gap[0, 4, 2:5].all()
    first = torch.tensor([[True, False]])
    out = clean_layout(x0, WHITE, BLACK, EMPTY, priority=first)
    m = read_masks(out, WHITE, BLACK)[0] > 0.5
    assert m[0, 2:8, 2:8].all() and not _touch(m[1], m[0]) and m[1, 9, 5:10].all()
    assert torch.equal(out[0, 1], x0[0, 1])  # a priority layer is never changed


def test_clean_layout_keeps_a_small_object_inside_a_larger_ones_claim():
    # a weak small object (2x2) on a strong large one (8x8): by mask strength alone it would vanish
    x0 = _scene([(1, 9, 1, 9, 1.0)], [(4, 6, 4, 6, 0.6)])
    m = read_masks(clean_layout(x0, WHITE, BLACK, EMPTY), WHITE, BLACK)[0] > 0.5
    assert m[1, 4:6, 4:6].all()  # the smaller object sits in front and keeps its place
    assert not _touch(m[0], m[1]) and m[0, 1, 1:9].all() and m[0, 1:9, 1].all()  # the large one yields around it
    first = torch.tensor([[True, False]])  # unless the larger one has priority (locked in an edit)
    m = read_masks(clean_layout(x0, WHITE, BLACK, EMPTY, priority=first), WHITE, BLACK)[0] > 0.5
    assert m[0, 1:9, 1:9].all() and not m[1].any()


def test_sampler_layout_cleanup(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    empty = model.empty_layer_latent()
    assert empty.shape == (8,)
    plain = sample_with(model, cond)
    late = sample_with(model, cond, layout_cleanup=1.0, layout_cleanup_start=1.0, empty_latent=empty)
    assert torch.equal(plain, late)  # start fraction 1.0: never switched on
    a = sample_with(model, cond, layout_cleanup=1.0, layout_cleanup_start=0.0, empty_latent=empty)
    b = sample_with(model, cond, layout_cleanup=1.0, layout_cleanup_start=0.0, empty_latent=empty)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(LayerDiffError, match="layout_cleanup 1.5 is outside 0..1"):
        sample_with(model, cond, layout_cleanup=1.5, empty_latent=empty)
    with pytest.raises(LayerDiffError, match="layout_cleanup_start -0.1 is outside 0..1"):
        sample_with(model, cond, layout_cleanup=1.0, layout_cleanup_start=-0.1, empty_latent=empty)
    with pytest.raises(LayerDiffError, match="layout cleanup needs mask_axis and empty_latent"):
        sample_with(model, cond, layout_cleanup=1.0)
