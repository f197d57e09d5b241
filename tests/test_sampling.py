"""The sampling loop: every sampler and scheduler, determinism, batches, partial starts, callbacks,
argument checks, and generate end to end."""

from __future__ import annotations

import pytest
import torch
from sampling_support import PROMPTS, sample_with

from layerdiff.conditioning import encode_prompts
from layerdiff.errors import Interrupted, LayerDiffError
from layerdiff.pipeline import generate
from layerdiff.sampling import Lock
from layerdiff.settings import KARRAS_SAMPLERS, SAMPLERS, SamplerSettings

COMBOS = [(s, "normal") for s in SAMPLERS] + [(s, "karras") for s in KARRAS_SAMPLERS]


@pytest.mark.parametrize(("sampler", "scheduler"), COMBOS, ids=[f"{a}-{b}" for a, b in COMBOS])
def test_every_sampler_and_scheduler_runs_and_is_deterministic(trained_like_tiny_model, sampler, scheduler):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    kw = dict(sampler=sampler, scheduler=scheduler, mask_guidance=0.5, mask_guidance_start=0.0)
    a = sample_with(model, cond, **kw)
    b = sample_with(model, cond, **kw)
    assert a.shape == (1, 3, 8, 8, 8)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)  # same seed -> bit-identical
    c = sample_with(model, cond, sampler=sampler, scheduler=scheduler, seeds=[1])
    assert not torch.equal(a, c)


def test_batch_sample_equals_single_sample_with_its_seed(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    both = sample_with(model, cond.repeat(2), seeds=[5, 6])
    one = sample_with(model, cond, seeds=[6])
    torch.testing.assert_close(both[1:], one, atol=1e-4, rtol=1e-4)


def test_strength_zero_returns_input_and_partial_strength_stays_close(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    init = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_with(model, cond, init_latents=init, strength=0.0), init)
    low = sample_with(model, cond, init_latents=init, strength=0.2, steps=10)
    high = sample_with(model, cond, init_latents=init, strength=1.0, steps=10)
    assert (low - init).abs().mean() < (high - init).abs().mean()


def test_callback_progress_preview_and_cancel(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    seen = []
    sample_with(model, cond, steps=3, callback=lambda s, t, x0: seen.append((s, t, tuple(x0.shape))))
    assert seen == [(1, 3, (1, 3, 8, 8, 8)), (2, 3, (1, 3, 8, 8, 8)), (3, 3, (1, 3, 8, 8, 8))]
    with pytest.raises(Interrupted, match="step 2 of 3"):
        sample_with(model, cond, steps=3, callback=lambda s, t, x0: s < 2)

    def boom(s, t, x0):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_with(model, cond, steps=3, callback=boom)


def test_bad_sampler_arguments(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    with pytest.raises(LayerDiffError, match="sampler 'nope' is unknown: choose one of ddim, euler"):
        sample_with(model, cond, scheduler="nope")
    with pytest.raises(LayerDiffError, match="sampler 'ddim' has no karras schedule"):
        sample_with(model, cond, sampler="ddim", scheduler="karras")
    with pytest.raises(LayerDiffError, match="one seed per sample"):
        sample_with(model, cond, seeds=[1, 2])
    with pytest.raises(LayerDiffError, match="steps 0"):
        sample_with(model, cond, steps=0)
    with pytest.raises(LayerDiffError, match="lock.latents has shape"):
        sample_with(model, cond, lock=Lock.layers(torch.zeros(1, 2, 8, 8, 8), [0]))


def test_generate_end_to_end_decodes_binary_non_overlapping_masks(tiny_model):
    stack = generate(tiny_model, PROMPTS, SamplerSettings(steps=2), width=64, height=48, seed=0, batch=2)
    assert stack.images.shape == (2, 3, 48, 64, 3) and stack.masks.shape == (2, 2, 48, 64)
    assert stack.latents.shape == (2, 3, 8, 6, 8)
    assert set(torch.unique(stack.masks).tolist()) <= {0.0, 1.0}
    assert stack.masks.sum(dim=1).max() <= 1  # overlaps resolved, front wins
    assert stack.names[0].startswith("background") and stack.prompts == PROMPTS.layers
    again = generate(tiny_model, PROMPTS, SamplerSettings(steps=2), width=64, height=48, seed=0, batch=2)
    assert torch.equal(stack.images, again.images) and torch.equal(stack.masks, again.masks)
