"""Sampler: every scheduler, determinism, CFG batching, self-mask guidance, locks, callbacks."""

from __future__ import annotations

import pytest
import torch

from layerdiff.errors import Interrupted, LayerDiffError
from layerdiff.pipeline import LayerPrompts, encode_prompts, generate
from layerdiff.sampling import SCHEDULERS, Lock, _components, clean_layout, gaussian_blur, read_masks, sample

PROMPTS = LayerPrompts("a red star in front of a brick wall", ("a brick wall", "a red star", "a blue circle"))


def _sample(model, cond, **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("seeds", list(range(cond.batch_size)))
    kw.setdefault("mask_axis", model.mask_axis())
    return sample(model.unet, cond, 8, 8, scheduler_config=model.config.scheduler, **kw)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_runs_and_is_deterministic(trained_like_tiny_model, scheduler):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    a = _sample(model, cond, scheduler=scheduler, mask_guidance=0.5, mask_guidance_start=0.0)
    b = _sample(model, cond, scheduler=scheduler, mask_guidance=0.5, mask_guidance_start=0.0)
    assert a.shape == (1, 3, 8, 8, 8)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)  # same seed -> bit-identical
    c = _sample(model, cond, scheduler=scheduler, seeds=[1])
    assert not torch.equal(a, c)


def test_batch_sample_equals_single_sample_with_its_seed(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    both = _sample(model, cond.repeat(2), seeds=[5, 6])
    one = _sample(model, cond, seeds=[6])
    torch.testing.assert_close(both[1:], one, atol=1e-4, rtol=1e-4)


def test_guidance_scales_change_the_result(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    base = _sample(model, cond, cfg=1.0)
    cfg = _sample(model, cond, cfg=5.0)
    smg = _sample(model, cond, cfg=5.0, mask_guidance=1.0, mask_guidance_start=0.0)
    smg_late = _sample(model, cond, cfg=5.0, mask_guidance=1.0, mask_guidance_start=1.0)
    assert not torch.equal(base, cfg)
    assert not torch.equal(cfg, smg)
    assert torch.equal(cfg, smg_late)  # start fraction 1.0: never switched on
    assert torch.equal(cfg, _sample(model, cond, cfg=5.0, mask_guidance=0.0))


def test_smg_erosion_keeps_guidance_to_the_masks_interiors(trained_like_tiny_model):
    """Eroded past every mask's size, SMG degrades nothing: its degraded pass is the unconditional
    one and the result is plain CFG's; the whole mask (erode 0) changes the result."""
    from layerdiff.pipeline import sampler_kwargs

    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    cfg = _sample(model, cond, cfg=5.0)
    whole = _sample(model, cond, cfg=5.0, mask_guidance=1.0, mask_guidance_start=0.0, mask_guidance_erode=0)
    gone = _sample(model, cond, cfg=5.0, mask_guidance=1.0, mask_guidance_start=0.0, mask_guidance_erode=8)
    assert (whole - cfg).abs().max() > 1e-3
    torch.testing.assert_close(gone, cfg, atol=1e-5, rtol=1e-5)
    assert sampler_kwargs(model)["mask_guidance_erode"] == model.config.sampling.mask_guidance_erode
    # the whole mask unless a model says otherwise; the toy recipe's models erode by one pixel
    from layerdiff.config import SamplingDefaults, get_preset

    assert SamplingDefaults().mask_guidance_erode == 0 and get_preset("toy").sampling.mask_guidance_erode == 1
    import dataclasses

    assert sampler_kwargs(dataclasses.replace(model, config=get_preset("toy")))["mask_guidance_erode"] == 1
    for bad in (-1, 0.5, True, "1"):
        with pytest.raises(LayerDiffError, match="mask_guidance_erode"):
            _sample(model, cond, mask_guidance=1.0, mask_guidance_erode=bad)


def test_smg_unet_calls_are_batched(trained_like_tiny_model):
    """CFG: one UNet call of 2B per step; SMG: one call of 3B once active (no extra call)."""
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    calls = []
    hook = model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        _sample(model, cond, steps=4, cfg=3.0)
        assert calls == [2, 2, 2, 2]
        calls.clear()
        _sample(model, cond, steps=4, cfg=3.0, mask_guidance=0.75, mask_guidance_start=0.25)
        assert calls == [2, 3, 3, 3]
    finally:
        hook.remove()


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral", "dpmpp_2m_karras"])
def test_locked_layers_come_back_bit_identical(trained_like_tiny_model, scheduler):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    clean = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(9))
    out = _sample(model, cond, lock=Lock.layers(clean, [0, 2]), scheduler=scheduler)
    assert torch.equal(out[:, 0], clean[:, 0]) and torch.equal(out[:, 2], clean[:, 2])
    assert not torch.equal(out[:, 1], clean[:, 1])
    # the free layer depends on the locked context (inter-layer attention sees it)
    other = _sample(model, cond, lock=Lock.layers(clean * 0.5, [0, 2]), scheduler=scheduler)
    assert not torch.equal(out[:, 1], other[:, 1])


def test_channel_and_region_locks(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    clean = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    chan = torch.zeros(1, 3, 8, 1, 1, dtype=torch.bool)
    chan[:, 1, 4:] = True  # keep layer 1's mask channels
    out = _sample(model, cond, lock=Lock(clean, chan))
    assert torch.equal(out[:, 1, 4:], clean[:, 1, 4:]) and not torch.equal(out[:, 1, :4], clean[:, 1, :4])
    region = torch.zeros(1, 3, 1, 8, 8, dtype=torch.bool)
    region[:, 2, :, :4] = True
    out = _sample(model, cond, lock=Lock(clean, region))
    assert torch.equal(out[:, 2, :, :4], clean[:, 2, :, :4])
    assert not torch.equal(out[:, 2, :, 4:], clean[:, 2, :, 4:])


def test_strength_zero_returns_input_and_partial_strength_stays_close(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    init = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_sample(model, cond, init_latents=init, strength=0.0), init)
    low = _sample(model, cond, init_latents=init, strength=0.2, steps=10)
    high = _sample(model, cond, init_latents=init, strength=1.0, steps=10)
    assert (low - init).abs().mean() < (high - init).abs().mean()


def test_callback_progress_preview_and_cancel(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    seen = []
    _sample(model, cond, steps=3, callback=lambda s, t, x0: seen.append((s, t, tuple(x0.shape))))
    assert seen == [(1, 3, (1, 3, 8, 8, 8)), (2, 3, (1, 3, 8, 8, 8)), (3, 3, (1, 3, 8, 8, 8))]
    with pytest.raises(Interrupted, match="step 2 of 3"):
        _sample(model, cond, steps=3, callback=lambda s, t, x0: s < 2)

    def boom(s, t, x0):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sample(model, cond, steps=3, callback=boom)


def test_bad_sampler_arguments(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    with pytest.raises(LayerDiffError, match="unknown scheduler 'nope'"):
        _sample(model, cond, scheduler="nope")
    with pytest.raises(LayerDiffError, match="one seed per sample"):
        _sample(model, cond, seeds=[1, 2])
    with pytest.raises(LayerDiffError, match="steps 0"):
        _sample(model, cond, steps=0)
    with pytest.raises(LayerDiffError, match="lock.latents has shape"):
        _sample(model, cond, lock=Lock.layers(torch.zeros(1, 2, 8, 8, 8), [0]))


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


def test_generate_end_to_end_decodes_binary_non_overlapping_masks(tiny_model):
    stack = generate(tiny_model, PROMPTS, width=64, height=48, seed=0, batch=2, steps=2)
    assert stack.images.shape == (2, 3, 48, 64, 3) and stack.masks.shape == (2, 2, 48, 64)
    assert stack.latents.shape == (2, 3, 8, 6, 8)
    assert set(torch.unique(stack.masks).tolist()) <= {0.0, 1.0}
    assert stack.masks.sum(dim=1).max() <= 1  # overlaps resolved, front wins
    assert stack.names[0].startswith("background") and stack.prompts == PROMPTS.layers
    again = generate(tiny_model, PROMPTS, width=64, height=48, seed=0, batch=2, steps=2)
    assert torch.equal(stack.images, again.images) and torch.equal(stack.masks, again.masks)


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
    plain = _sample(model, cond)
    late = _sample(model, cond, layout_cleanup=1.0, layout_cleanup_start=1.0, empty_latent=empty)
    assert torch.equal(plain, late)  # start fraction 1.0: never switched on
    a = _sample(model, cond, layout_cleanup=1.0, layout_cleanup_start=0.0, empty_latent=empty)
    b = _sample(model, cond, layout_cleanup=1.0, layout_cleanup_start=0.0, empty_latent=empty)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(LayerDiffError, match="layout_cleanup 1.5 is outside 0..1"):
        _sample(model, cond, layout_cleanup=1.5, empty_latent=empty)
    with pytest.raises(LayerDiffError, match="layout_cleanup_start -0.1 is outside 0..1"):
        _sample(model, cond, layout_cleanup=1.0, layout_cleanup_start=-0.1, empty_latent=empty)
    with pytest.raises(LayerDiffError, match="layout cleanup needs mask_axis and empty_latent"):
        _sample(model, cond, layout_cleanup=1.0)


def test_background_cfg_guides_the_background_alone(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    first = {}

    def keep_first(name):
        return lambda step, total, x0: first.setdefault(name, x0.clone()) is None or None

    same = _sample(model, cond, cfg=5.0, background_cfg=5.0)
    assert torch.equal(same, _sample(model, cond, cfg=5.0))  # background_cfg == cfg: plain CFG
    for name, bg in (("plain", None), ("strong", 12.0)):
        _sample(model, cond, cfg=5.0, background_cfg=bg, callback=keep_first(name))
    # first step: the background's prediction changes, every foreground's is that of plain CFG
    assert not torch.equal(first["plain"][:, 0], first["strong"][:, 0])
    torch.testing.assert_close(first["plain"][:, 1:], first["strong"][:, 1:])
    # cfg 1 (no guidance) with a guided background still runs the unconditional pass
    assert not torch.equal(_sample(model, cond, cfg=1.0), _sample(model, cond, cfg=1.0, background_cfg=4.0))


def test_lock_mask_locked_names_the_foregrounds_whose_place_is_fixed():
    lat = torch.zeros(2, 4, 8, 3, 3)
    assert Lock.layers(lat, [0, 2]).mask_locked().tolist() == [[False, True, False]] * 2
    channels = torch.zeros(2, 4, 8, 1, 1, dtype=torch.bool)
    channels[:, 1:, 4:] = True  # Layer Style: every mask channel locked, images free
    assert Lock(lat, channels).mask_locked().all()
    region = torch.zeros(2, 4, 1, 3, 3, dtype=torch.bool)
    region[:, 3, :, 0, 0] = True  # a region lock does not fix the layer's place
    assert not Lock(lat, region).mask_locked().any()


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
    plain = _sample(model, cond, **kw)
    # every foreground present at the check: nothing is redrawn, the result is bit-identical
    present = _sample(model, cond, **kw, mask_axis=_axis(True, model), empty_layer_retries=2)
    assert torch.equal(plain, present)
    # every foreground empty at the check: their noise is redrawn (twice), deterministically
    calls = []
    gone = _sample(model, cond, **kw, mask_axis=_axis(False, model), empty_layer_retries=2,
                   callback=lambda s, t, x0: calls.append(s))
    again = _sample(model, cond, **kw, mask_axis=_axis(False, model), empty_layer_retries=2)
    once = _sample(model, cond, **kw, mask_axis=_axis(False, model), empty_layer_retries=1)
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
    a = _sample(model, two, steps=4, seeds=[1, 2], mask_axis=empty_axis, empty_layer_retries=1)
    b = _sample(model, two, steps=4, seeds=[1, 2])
    assert not torch.equal(a[1, 1], b[1, 1]) and torch.equal(a[1, 2], b[1, 2])  # the padding layer is never redrawn
    cond = encode_prompts(model, PROMPTS)
    clean = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(9))
    lock = Lock.layers(clean, [0, 1])
    c = _sample(model, cond, steps=4, lock=lock, mask_axis=empty_axis, empty_layer_retries=1)
    assert torch.equal(c[:, :2], clean[:, :2])
    assert not torch.equal(c[:, 2], _sample(model, cond, steps=4, lock=lock)[:, 2])  # only the free layer redrawn
    # restyling (strength < 1) starts from the given latents: nothing to redraw
    init = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_sample(model, cond, steps=4, init_latents=init, strength=0.5, mask_axis=empty_axis,
                               empty_layer_retries=2),
                       _sample(model, cond, steps=4, init_latents=init, strength=0.5))


def test_empty_layer_retry_arguments(trained_like_tiny_model):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    with pytest.raises(LayerDiffError, match="empty_layer_retries -1"):
        _sample(model, cond, empty_layer_retries=-1)
    with pytest.raises(LayerDiffError, match="empty_layer_check 1.5"):
        _sample(model, cond, empty_layer_retries=1, empty_layer_check=1.5)
    with pytest.raises(LayerDiffError, match="needs mask_axis"):
        sample(model.unet, cond, 8, 8, [0], steps=3, empty_layer_retries=1)
