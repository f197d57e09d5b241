"""Classifier-free guidance (with the background's own scale) and self-mask guidance (hooks of the loop),
and the masks and blur it reads."""

from __future__ import annotations

import pytest
import torch
from sampling_support import PROMPTS, sample_with

from layerdiff.conditioning import encode_prompts
from layerdiff.config import get_preset
from layerdiff.errors import LayerDiffError
from layerdiff.sampling import gaussian_blur, read_masks
from layerdiff.settings import DEFAULTS, SamplerSettings


def test_guidance_scales_change_the_result(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    base = sample_with(model, cond, cfg=1.0)
    cfg = sample_with(model, cond, cfg=5.0)
    smg = sample_with(model, cond, cfg=5.0, mask_guidance=1.0, mask_guidance_start=0.0)
    smg_late = sample_with(model, cond, cfg=5.0, mask_guidance=1.0, mask_guidance_start=1.0)
    assert not torch.equal(base, cfg)
    assert not torch.equal(cfg, smg)
    assert torch.equal(cfg, smg_late)  # start fraction 1.0: never switched on
    assert torch.equal(cfg, sample_with(model, cond, cfg=5.0, mask_guidance=0.0))


def test_smg_erosion_keeps_guidance_to_the_masks_interiors(trained_like_tiny_model):
    """Eroded past every mask's size, SMG degrades nothing: its degraded pass is the unconditional
    one and the result is plain CFG's; the whole mask (erode 0) changes the result."""
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    cfg = sample_with(model, cond, cfg=5.0)
    whole = sample_with(model, cond, cfg=5.0, mask_guidance=1.0, mask_guidance_start=0.0, mask_guidance_erode=0)
    gone = sample_with(model, cond, cfg=5.0, mask_guidance=1.0, mask_guidance_start=0.0, mask_guidance_erode=8)
    assert (whole - cfg).abs().max() > 1e-3
    torch.testing.assert_close(gone, cfg, atol=1e-5, rtol=1e-5)
    assert SamplerSettings().resolve(model).mask_guidance_erode == model.config.sampling.mask_guidance_erode
    # the whole mask unless a model says otherwise; the toy recipe's models erode by one pixel
    assert DEFAULTS.mask_guidance_erode == 0 and get_preset("toy").sampling.mask_guidance_erode == 1
    assert SamplerSettings().resolve(get_preset("toy")).mask_guidance_erode == 1
    assert SamplerSettings(mask_guidance_erode=2).resolve(get_preset("toy")).mask_guidance_erode == 2
    for bad in (-1, 0.5, True, "1"):
        with pytest.raises(LayerDiffError, match="mask_guidance_erode"):
            sample_with(model, cond, mask_guidance=1.0, mask_guidance_erode=bad)


def test_smg_unet_calls_are_batched(trained_like_tiny_model):
    """CFG: one UNet call of 2B per step; SMG: one call of 3B once active (no extra call)."""
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    calls = []
    hook = model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        sample_with(model, cond, steps=4, cfg=3.0)
        assert calls == [2, 2, 2, 2]
        calls.clear()
        sample_with(model, cond, steps=4, cfg=3.0, mask_guidance=0.75, mask_guidance_start=0.25)
        assert calls == [2, 3, 3, 3]
    finally:
        hook.remove()


def test_background_cfg_guides_the_background_alone(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    first = {}

    def keep_first(name):
        return lambda step, total, x0: first.setdefault(name, x0.clone()) is None or None

    same = sample_with(model, cond, cfg=5.0, background_cfg=5.0)
    assert torch.equal(same, sample_with(model, cond, cfg=5.0))  # background_cfg == cfg: plain CFG
    for name, bg in (("plain", None), ("strong", 12.0)):
        sample_with(model, cond, cfg=5.0, background_cfg=bg, callback=keep_first(name))
    # first step: the background's prediction changes, every foreground's is that of plain CFG
    assert not torch.equal(first["plain"][:, 0], first["strong"][:, 0])
    torch.testing.assert_close(first["plain"][:, 1:], first["strong"][:, 1:])
    # cfg 1 (no guidance) with a guided background still runs the unconditional pass
    assert not torch.equal(sample_with(model, cond, cfg=1.0), sample_with(model, cond, cfg=1.0, background_cfg=4.0))


def test_read_masks_projects_on_white_black_axis():
    white, black = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x0 = torch.zeros(1, 3, 8, 2, 2)
    x0[:, 1, 4:] = white[:, None, None]
    x0[:, 2, 4:] = black[:, None, None]
    x0[:, 2, 4:, 0, 0] = (white + black) / 2
    m = read_masks(x0, white, black)
    assert m.shape == (1, 2, 2, 2)
    torch.testing.assert_close(m[0, 0], torch.ones(2, 2))
    torch.testing.assert_close(m[0, 1], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_gaussian_blur_preserves_constants_and_smooths():
    x = torch.full((1, 2, 6, 6), 3.0)
    torch.testing.assert_close(gaussian_blur(x, 1.0), x)
    spike = torch.zeros(1, 1, 9, 9)
    spike[..., 4, 4] = 1
    out = gaussian_blur(spike, 1.0)
    assert out[..., 4, 4] < 1 and abs(out.sum().item() - 1) < 1e-5
