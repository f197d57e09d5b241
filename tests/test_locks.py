"""RePaint locks: locked latents come back bit-identical and the free ones fit them."""

from __future__ import annotations

import pytest
import torch
from sampling_support import PROMPTS, sample_with

from layerdiff.conditioning import encode_prompts
from layerdiff.sampling import Lock


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral", "dpmpp_2m_karras"])
def test_locked_layers_come_back_bit_identical(trained_like_tiny_model, scheduler):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    clean = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(9))
    out = sample_with(model, cond, lock=Lock.layers(clean, [0, 2]), scheduler=scheduler)
    assert torch.equal(out[:, 0], clean[:, 0]) and torch.equal(out[:, 2], clean[:, 2])
    assert not torch.equal(out[:, 1], clean[:, 1])
    # the free layer depends on the locked context (inter-layer attention sees it)
    other = sample_with(model, cond, lock=Lock.layers(clean * 0.5, [0, 2]), scheduler=scheduler)
    assert not torch.equal(out[:, 1], other[:, 1])


def test_channel_and_region_locks(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    clean = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    chan = torch.zeros(1, 3, 8, 1, 1, dtype=torch.bool)
    chan[:, 1, 4:] = True  # keep layer 1's mask channels
    out = sample_with(model, cond, lock=Lock(clean, chan))
    assert torch.equal(out[:, 1, 4:], clean[:, 1, 4:]) and not torch.equal(out[:, 1, :4], clean[:, 1, :4])
    region = torch.zeros(1, 3, 1, 8, 8, dtype=torch.bool)
    region[:, 2, :, :4] = True
    out = sample_with(model, cond, lock=Lock(clean, region))
    assert torch.equal(out[:, 2, :, :4], clean[:, 2, :, :4])
    assert not torch.equal(out[:, 2, :, 4:], clean[:, 2, :, 4:])


def test_lock_mask_locked_names_the_foregrounds_whose_place_is_fixed():
    lat = torch.zeros(2, 4, 8, 3, 3)
    assert Lock.layers(lat, [0, 2]).mask_locked().tolist() == [[False, True, False]] * 2
    channels = torch.zeros(2, 4, 8, 1, 1, dtype=torch.bool)
    channels[:, 1:, 4:] = True  # Layer Style: every mask channel locked, images free
    assert Lock(lat, channels).mask_locked().all()
    region = torch.zeros(2, 4, 1, 3, 3, dtype=torch.bool)
    region[:, 3, :, 0, 0] = True  # a region lock does not fix the layer's place
    assert not Lock(lat, region).mask_locked().any()
