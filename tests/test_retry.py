"""Empty-layer retry: a foreground still empty early in sampling gets new noise, deterministically."""

from __future__ import annotations

import pytest
import torch
from sampling_support import PROMPTS, sample_with

from layerdiff.conditioning import LayerPrompts, encode_prompts
from layerdiff.errors import LayerDiffError
from layerdiff.sampling import Lock, sample
from layerdiff.settings import SamplerSettings


def _axis(present: bool, model):
    """A (white, black) mask axis under which read_masks reads every foreground as present (about
    +1000 everywhere) or as empty (about -1000): the retry's check, steered without training."""
    white, black = model.mask_axis()
    ones = torch.ones_like(white)
    base = (-1000.0 if present else 1000.0) * ones
    return base + ones, base


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral", "dpmpp_2m"])
def test_empty_layer_retries_redraw_only_the_empty_layers_noise(trained_like_tiny_model, scheduler):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS).repeat(2)
    kw = dict(steps=5, scheduler=scheduler, seeds=[3, 4])
    plain = sample_with(model, cond, **kw)
    # every foreground present at the check: nothing is redrawn, the result is bit-identical
    present = sample_with(model, cond, **kw, mask_axis=_axis(True, model), empty_layer_retries=2)
    assert torch.equal(plain, present)
    # every foreground empty at the check: their noise is redrawn (twice), deterministically
    calls = []
    gone = sample_with(model, cond, **kw, mask_axis=_axis(False, model), empty_layer_retries=2,
                   callback=lambda s, t, x0: calls.append(s))
    again = sample_with(model, cond, **kw, mask_axis=_axis(False, model), empty_layer_retries=2)
    once = sample_with(model, cond, **kw, mask_axis=_axis(False, model), empty_layer_retries=1)
    assert torch.equal(gone, again)
    assert calls == [1, 2, 3, 4, 5]  # replayed steps are reported once
    for b in range(2):
        for k in (1, 2):
            assert not torch.equal(gone[b, k], plain[b, k]) and not torch.equal(gone[b, k], once[b, k])
    # the background's noise is kept; it still changes a little through inter-layer attention
    assert (gone[:, 0] - plain[:, 0]).abs().mean() < (gone[:, 1:] - plain[:, 1:]).abs().mean()


def test_empty_layer_retries_skip_padding_and_locked_layers_and_partial_starts(trained_like_tiny_model):
    model = trained_like_tiny_model
    two = encode_prompts(model, [PROMPTS, LayerPrompts("a red star in front of a brick wall", ("a brick wall", "a red star"))])
    assert two.valid.tolist() == [[True, True, True], [True, True, False]]
    empty_axis = _axis(False, model)
    a = sample_with(model, two, steps=4, seeds=[1, 2], mask_axis=empty_axis, empty_layer_retries=1)
    b = sample_with(model, two, steps=4, seeds=[1, 2])
    assert not torch.equal(a[1, 1], b[1, 1]) and torch.equal(a[1, 2], b[1, 2])  # the padding layer is never redrawn
    cond = encode_prompts(model, PROMPTS)
    clean = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(9))
    lock = Lock.layers(clean, [0, 1])
    c = sample_with(model, cond, steps=4, lock=lock, mask_axis=empty_axis, empty_layer_retries=1)
    assert torch.equal(c[:, :2], clean[:, :2])
    assert not torch.equal(c[:, 2], sample_with(model, cond, steps=4, lock=lock)[:, 2])  # only the free layer redrawn
    # restyling (strength < 1) starts from the given latents: nothing to redraw
    init = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_with(model, cond, steps=4, init_latents=init, strength=0.5, mask_axis=empty_axis,
                               empty_layer_retries=2),
                       sample_with(model, cond, steps=4, init_latents=init, strength=0.5))


def test_empty_layer_retry_arguments(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    with pytest.raises(LayerDiffError, match="empty_layer_retries -1"):
        sample_with(model, cond, empty_layer_retries=-1)
    with pytest.raises(LayerDiffError, match="empty_layer_check 1.5"):
        sample_with(model, cond, empty_layer_retries=1, empty_layer_check=1.5)
    with pytest.raises(LayerDiffError, match="needs mask_axis"):
        sample(model.unet, cond, 8, 8, [0], SamplerSettings(steps=3, empty_layer_retries=1))
