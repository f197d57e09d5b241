"""The layout prior: where each layer prompt puts its object, a bilinear map of a grid cell's position
and the prompt's input word embeddings, in the prompt enhancer. It changes nothing the UNet computes,
its map depends on both the prompt and the place, its loss moves only its own weights (never the text
encoder), the recipe's layout stage trains it alone, the sampler writes it into the starting noise,
and the config field, old files and checkpoints."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from layerdiff.config import LayerDiffConfig, get_preset
from layerdiff.errors import LayerDiffError
from layerdiff.io.checkpoint import build_random_model, load_layerdiff, save_layerdiff
from layerdiff.model import LayerDiffUNet
from layerdiff.model.enhancer import LayoutPrior


def _layered(rank: int):
    config = get_preset("tiny").replace(layout_prior=rank)
    torch.manual_seed(0)
    return LayerDiffUNet.from_base(UNet2DConditionModel(**config.unet), config).eval()


def _inputs(seed=0, layers=3, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, layers, 8, h, w, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g),
            torch.randn(2, layers, 5, 32, generator=g))


def test_the_prior_changes_nothing_the_unet_computes_and_old_weights_load():
    plain, with_prior = _layered(0), _layered(8)
    keys = [k for k in with_prior.state_dict() if ".layout." in k]
    assert keys and all(k.startswith("prompt_enhancer.layout.") for k in keys)
    missing, unexpected = with_prior.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(keys) and not unexpected
    with torch.no_grad():
        x, t, glob, lay = _inputs()
        assert torch.equal(with_prior(x, t, glob, lay), plain(x, t, glob, lay))
        assert torch.equal(with_prior.enhance(glob, lay), plain.enhance(glob, lay))
        logits = with_prior.layout_logits(torch.randn(2, 3, 5, 32), (6, 4))
    assert logits.shape == (2, 3, 6, 4) and plain.layout_logits(torch.randn(2, 3, 5, 32), (6, 4)) is None


def test_a_prior_map_depends_on_the_prompt_and_the_place_and_one_word_is_not_averaged_away():
    torch.manual_seed(0)
    prior = LayoutPrior(dim=32, rank=4)
    words = torch.randn(2, 5, 32)
    out = prior(words, (4, 4))  # (2 prompts, 4, 4)
    assert out.shape == (2, 4, 4)
    assert not torch.allclose(out[0], out[1])  # another prompt, another map
    assert not torch.allclose(out[0, 0, 0], out[0, 3, 3])  # another cell, another value
    # one prompt's map is a function of its own words only (no mixing across the batch of layers)
    assert torch.allclose(prior(words[1:], (4, 4)), out[1:], atol=1e-6)
    # max pooling: one word changed among many padding words still changes the map as much as alone
    padded = torch.cat([words[:, :2], torch.zeros(2, 60, 32)], 1)
    changed = padded.clone()
    changed[:, 1] = torch.randn(32, generator=torch.Generator().manual_seed(1))  # another word
    assert (prior(changed, (4, 4)) - prior(padded, (4, 4))).abs().max() > 1e-2


def test_config_field_is_checked_and_old_configs_have_none():
    assert get_preset("sd15").layout_prior == 0
    assert get_preset("toy").layout_prior == 16
    data = get_preset("tiny").to_dict()
    data.pop("layout_prior")
    assert LayerDiffConfig.from_dict(data).layout_prior == 0  # files written before the field
    for bad in (-1, 257, 2.5, "3"):
        with pytest.raises(LayerDiffError, match="layout_prior"):
            LayerDiffConfig.from_dict({**data, "layout_prior": bad})
    # no position features needed: the prior has its own
    assert LayerDiffConfig.from_dict({**data, "position_features": 0, "layout_prior": 8}).layout_prior == 8


def test_checkpoint_round_trip_keeps_the_prior(tmp_path):
    model = build_random_model(get_preset("tiny").replace(layout_prior=4), seed=1)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if ".layout." in name:
                p.normal_(0, 0.1)
    loaded = load_layerdiff(save_layerdiff(model, tmp_path / "m.safetensors"))
    assert loaded.config.layout_prior == 4
    a = {k: v for k, v in model.unet.state_dict().items() if ".layout." in k}
    b = {k: v for k, v in loaded.unet.state_dict().items() if ".layout." in k}
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _toy_batch(model, seed=0):
    """A real batch of two toy scenes (background + one object each), encoded by the model's VAE."""
    import numpy as np

    from layerdiff.data.toy import render_sample
    from layerdiff.training.objective import NoiseSchedule, make_batch
    from layerdiff.training.settings import TrainConfig

    samples = [render_sample(seed, i, 64, num_layers=2) for i in range(2)]
    images = torch.stack([torch.stack([torch.from_numpy(np.array(s.background)),
                                       torch.from_numpy(np.array(s.foregrounds[0]))]) for s in samples]).float() / 255
    masks = torch.stack([torch.from_numpy(np.array(s.masks[0])).float()[None] / 255 for s in samples])
    with torch.no_grad():
        latents = model.encode_layers(images, masks)
    config = TrainConfig(layout_weight=0.5, drop_all=0.0, drop_layers=0.0)
    batch = make_batch(latents, torch.ones(2, 2, dtype=torch.bool), [s.global_prompt for s in samples],
                       [list(s.layer_prompts) for s in samples], model.tokenizer, NoiseSchedule(model.config.scheduler),
                       config, torch.Generator().manual_seed(seed))
    return batch


def test_layout_loss_reaches_only_the_prior():
    from layerdiff.training.objective import LayerDiffTrainModule

    model = build_random_model(get_preset("tiny").replace(layout_prior=4), seed=0)
    batch = _toy_batch(model)
    assert "clean" in batch
    with_layout = LayerDiffTrainModule(model, layout_weight=0.5).requires_grad_(True)
    plain = LayerDiffTrainModule(model)
    loss = with_layout(**batch)
    denoise = plain(**batch)  # the same denoising loss, without the layout term
    layout = with_layout.layout_loss(with_layout.layer_words(batch["ids_layers"]), batch["clean"], batch["valid"])
    assert layout > 0 and torch.allclose(loss, denoise + 0.5 * layout, rtol=1e-5)
    with_layout.zero_grad()
    layout.backward()
    grads = {n: p.grad for n, p in with_layout.named_parameters()}
    assert any(".layout.readout." in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    moved = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0 and ".layout." not in n]
    assert not moved  # not the text encoder, the enhancer or the UNet


def test_a_few_steps_on_the_layout_loss_lower_it():
    from layerdiff.training.objective import LayerDiffTrainModule

    model = build_random_model(get_preset("tiny").replace(layout_prior=4), seed=0)
    batch = _toy_batch(model)
    module = LayerDiffTrainModule(model, layout_weight=1.0).requires_grad_(True)
    params = [p for n, p in module.named_parameters() if ".layout." in n]
    opt = torch.optim.Adam(params, lr=3e-2)

    def layout_loss():
        return module.layout_loss(module.layer_words(batch["ids_layers"]), batch["clean"], batch["valid"])

    first = layout_loss().item()
    for _ in range(20):
        opt.zero_grad()
        layout_loss().backward()
        opt.step()
    assert layout_loss().item() < 0.8 * first


def test_layout_weight_needs_a_model_with_a_prior():
    from layerdiff.training.objective import LayerDiffTrainModule

    model = build_random_model(get_preset("tiny"), seed=0)
    with pytest.raises(LayerDiffError, match="layout_weight 0.1 needs a model with a layout prior"):
        LayerDiffTrainModule(model, layout_weight=0.1)
    assert model.unet.layout_logits(torch.zeros(1, 2, 3, 32), (4, 4)) is None


# ------------------------------------------------------------------------- sampling


def _prior_model(rank=4, trained=True):
    model = build_random_model(get_preset("tiny").replace(layout_prior=rank), seed=0)
    if trained:  # a readout that prefers the left of the image for any prompt
        with torch.no_grad():
            for name, p in model.unet.named_parameters():
                if ".layout." in name:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


def test_the_start_hook_moves_only_foreground_mask_channels_away_from_the_map_and_to_its_focus_disk():
    from layerdiff.sampling.layout_prior import FOCUS_SHARE, LayoutPriorStart, focus_disks

    cover = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    white, black = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([-1.0, 0.0, 0.0, 1.0])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    hook = LayoutPriorStart(2.0, cover, (white, black), valid, a_first=0.25, init_sigma=3.0)
    noise = torch.randn(2, 3, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    x = hook.start(noise * 3.0, noise)
    delta = x - noise * 3.0
    assert delta[:, 0].abs().max() == 0 and delta[:, :, :4].abs().max() == 0  # background and image channels
    assert delta[1, 2].abs().max() == 0  # a padding slot
    axis = white - black
    lean = torch.einsum("bkchw,c->bkhw", noise[:, 1:, 4:], axis / axis.norm())
    disk = focus_disks(cover, lean, valid[:, 1:])[0, 0]
    assert disk.sum() >= 5  # a disk of at least the minimum radius
    away = (cover[0, 0] - cover[0, 0].mean()).clamp(max=0)  # only where the object is not
    layout = away + FOCUS_SHARE * (disk - disk.mean())
    expected = 2.0 * 0.5 * 3.0 * layout[None] * axis[:, None, None]
    assert torch.allclose(delta[0, 1, 4:], expected, atol=1e-5)
    along = torch.einsum("bkchw,c->bkhw", delta[:, 1:, 4:], axis)
    assert (along[0, 0][disk == 0] <= 1e-6).all()  # off the disk: never towards a white mask
    assert torch.equal(hook.start(noise * 3.0, noise), x)  # the same noise, the same start


def _strip(h=16, w=16, cols=slice(0, 5), inside=0.3, outside=0.005):
    m = torch.full((h, w), outside)
    m[:, cols] = inside
    return m


def test_focus_disk_has_about_the_maps_expected_area_and_sits_where_the_map_is_high():
    import math

    from layerdiff.sampling.layout_prior import FOCUS_MIN_RADIUS, FOCUS_SHRINK, focus_disks

    left, right = _strip(cols=slice(0, 5)), _strip(cols=slice(11, 16))
    cover = torch.stack([left, right])[None]  # (1, 2, 16, 16)
    lean = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    disks = focus_disks(cover, lean, torch.ones(1, 2, dtype=torch.bool))
    assert set(disks.unique().tolist()) <= {0.0, 1.0}
    for k, cols in ((0, slice(0, 5)), (1, slice(11, 16))):
        d = disks[0, k]
        assert d[:, cols].sum() >= 0.8 * d.sum()  # (nearly) all of it inside the map's strip
        assert cols.start <= torch.nonzero(d)[:, 1].float().mean() < cols.stop
        radius = max(math.sqrt(float(cover[0, k].sum()) / math.pi) - FOCUS_SHRINK, FOCUS_MIN_RADIUS)
        assert abs(float(d.sum()) - math.pi * radius ** 2) <= 2 * math.pi * radius  # its area, to the rim
    small = focus_disks(cover * 0.25, lean, torch.ones(1, 2, dtype=torch.bool))
    assert small[0, 0].sum() < disks[0, 0].sum() / 2  # a smaller expected area, a smaller disk


def test_focus_disks_follow_the_noise_on_a_flat_map_and_keep_apart():
    from layerdiff.sampling.layout_prior import focus_disks

    flat = torch.full((1, 2, 16, 16), 0.05)
    lean = torch.zeros(1, 2, 16, 16)
    lean[:, :, 10:14, 2:6] = 2.0  # both layers' noise leans white at the same place
    disks = focus_disks(flat, lean, torch.ones(1, 2, dtype=torch.bool))
    ys, xs = torch.nonzero(disks[0, 0], as_tuple=True)
    assert 9 <= ys.float().mean() <= 14 and 1 <= xs.float().mean() <= 6  # the first where the noise leans
    assert (disks[0, 0] * disks[0, 1]).sum() == 0  # the second somewhere else
    one = focus_disks(flat, lean, torch.tensor([[True, False]]))
    assert one[0, 1].abs().max() == 0 and torch.equal(one[0, 0], disks[0, 0])  # a padding slot: no disk


def _blob(cy, cx, h=16, w=16, sigma=1.5, peak=0.8):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return peak * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2))


def test_map_spread_tells_a_pinned_map_from_a_band_and_a_flat_one():
    from layerdiff.sampling.layout_prior import FOCUS_PINNED, map_spread

    assert abs(map_spread(torch.full((16, 16), 0.05)) - (1 / 12) ** 0.5) < 0.01  # flat: a uniform's spread
    assert map_spread(_strip()) > FOCUS_PINNED  # "on the left": narrow in x, but spread along y
    assert map_spread(_strip().T) > FOCUS_PINNED  # "at the top"
    assert map_spread(_blob(7.5, 7.5)) < FOCUS_PINNED  # "in the centre"
    assert map_spread(torch.zeros(16, 16)) == map_spread(torch.ones(16, 16))  # no coverage at all: flat, not pinned


def test_a_pinned_map_gets_a_full_area_disk_at_its_peak_whatever_the_noise_leans():
    import math

    from layerdiff.sampling.layout_prior import FOCUS_SHRINK, focus_disks

    blob, strip = _blob(7.5, 7.5), _strip()
    lean = torch.zeros(1, 2, 16, 16)
    lean[:, :, 3:7, 9:13] = 3.0  # the noise leans white off the centre, for both layers
    disks = focus_disks(torch.stack([blob, strip])[None], lean, torch.ones(1, 2, dtype=torch.bool))
    ys, xs = torch.nonzero(disks[0, 0], as_tuple=True)
    assert abs(ys.float().mean() - 7.5) <= 0.5 and abs(xs.float().mean() - 7.5) <= 0.5  # the map's peak
    full = math.sqrt(float(blob.sum()) / math.pi)
    assert abs(float(disks[0, 0].sum()) - math.pi * full ** 2) <= 2 * math.pi * full  # not shrunk
    shrunk = math.pi * (full - FOCUS_SHRINK) ** 2
    assert disks[0, 0].sum() > shrunk  # larger than a band's disk of the same expected area
    # the band's disk still follows the noise inside its strip
    ys, xs = torch.nonzero(disks[0, 1], as_tuple=True)
    assert xs.float().mean() < 5


def test_the_most_pinned_layer_is_placed_first_so_a_free_layer_does_not_take_its_place():
    from layerdiff.sampling.layout_prior import focus_disks

    flat, blob = torch.full((16, 16), 0.08), _blob(7.5, 7.5)
    lean = torch.zeros(1, 2, 16, 16)
    lean[:, 0, 5:11, 5:11] = 3.0  # the free layer's noise leans white at the centre
    disks = focus_disks(torch.stack([flat, blob])[None], lean, torch.ones(1, 2, dtype=torch.bool))
    ys, xs = torch.nonzero(disks[0, 1], as_tuple=True)
    assert abs(ys.float().mean() - 7.5) <= 0.5 and abs(xs.float().mean() - 7.5) <= 0.5  # the centre layer: the centre
    fy, fx = torch.nonzero(disks[0, 0], as_tuple=True)  # the free layer: elsewhere, though its noise leant there
    assert (fy.float().mean() - 7.5) ** 2 + (fx.float().mean() - 7.5) ** 2 >= 4
    assert (disks[0, 0] * disks[0, 1]).sum() <= disks[0, 0].sum() / 4
    swapped = focus_disks(torch.stack([blob, flat])[None], lean.flip(1), torch.ones(1, 2, dtype=torch.bool))
    assert torch.equal(swapped.flip(1), disks)  # slot order does not matter


def _run(model, **settings):
    from layerdiff.conditioning import LayerPrompts
    from layerdiff.pipeline import run
    from layerdiff.settings import SamplerSettings

    prompts = [LayerPrompts("a red circle in front of a blue sky", ("a blue sky", "a red circle on the left"))]
    s = SamplerSettings(steps=3, cfg=2.0, mask_guidance=0.0, layout_cleanup=0.0, empty_layer_retries=0, **settings)
    return run(model, prompts, s, seeds=[7], width=64, height=64, decode=False)


def test_layout_prior_setting_changes_sampling_only_for_a_model_with_a_prior():
    with_prior = _prior_model()
    off, on = _run(with_prior, layout_prior=0.0), _run(with_prior, layout_prior=5.0)
    assert not torch.allclose(off, on)
    assert torch.equal(on, _run(with_prior, layout_prior=5.0))  # deterministic
    plain = build_random_model(get_preset("tiny"), seed=0)
    assert torch.equal(_run(plain, layout_prior=0.0), _run(plain, layout_prior=5.0))
    # the words reach the sampler through the conditioning; without them the setting does nothing
    from layerdiff.conditioning import LayerPrompts, encode_prompts

    cond = encode_prompts(with_prior, [LayerPrompts("x", ("a blue sky", "a red circle"))])
    assert cond.layer_words.shape[:2] == (1, 2) and cond.repeat(3).layer_words.shape[0] == 3
    assert encode_prompts(plain, [LayerPrompts("x", ("a blue sky", "a red circle"))]).layer_words is None


def test_layout_prior_setting_is_range_checked_and_read_from_files():
    from layerdiff.settings import DEFAULTS, PLAIN, SamplerSettings

    assert DEFAULTS.layout_prior == 0.0 and PLAIN.layout_prior == 0.0
    for bad in (-1.0, 51.0, float("nan")):
        with pytest.raises(LayerDiffError, match="layout_prior"):
            SamplerSettings(layout_prior=bad)
    data = get_preset("tiny").to_dict()
    data["sampling"] = {**data["sampling"], "layout_prior": 4.0}
    assert LayerDiffConfig.from_dict(data).sampling.layout_prior == 4.0
    data["sampling"].pop("layout_prior")  # files written before the setting
    assert LayerDiffConfig.from_dict(data).sampling.layout_prior == 0.0


# ------------------------------------------------------------------------- the recipe's layout stage


def _cache(model, n=6):
    import numpy as np

    from layerdiff.data.toy import render_sample
    from layerdiff.training.latents import LatentCache

    samples = [render_sample(3, i, 64, num_layers=2) for i in range(n)]
    images = torch.stack([torch.stack([torch.from_numpy(np.array(s.background)),
                                       torch.from_numpy(np.array(s.foregrounds[0]))]) for s in samples]).float() / 255
    masks = torch.stack([torch.from_numpy(np.array(s.masks[0])).float()[None] / 255 for s in samples])
    with torch.no_grad():
        latents = model.encode_layers(images, masks)
    return LatentCache(latents, torch.ones(n, 2, dtype=torch.bool), [s.global_prompt for s in samples],
                       [list(s.layer_prompts) for s in samples])


def test_layout_stage_trains_only_the_prior_deterministically_and_resumes(tmp_path):
    from layerdiff.training.layout_stage import layout_stage, train_layout_prior

    settings = {"steps": 12, "batch_size": 4, "lr": 1e-2}
    model = build_random_model(get_preset("tiny").replace(layout_prior=4), seed=0)
    cache = _cache(model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    losses = train_layout_prior(model, cache, settings, seed=5, log_every=11)
    assert len(losses) == 2 and losses[-1] < losses[0]
    after = model.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("prompt_enhancer.layout.") for k in changed)
    assert all(torch.equal(v, model.text_encoder.state_dict()[k]) for k, v in text_before.items())
    assert not any(p.requires_grad for p in model.unet.parameters())  # the flags are put back
    again = build_random_model(get_preset("tiny").replace(layout_prior=4), seed=0)
    train_layout_prior(again, cache, settings, seed=5)
    assert all(torch.equal(after[k], again.unet.state_dict()[k]) for k in changed)  # deterministic
    # the recipe's stage: trains and saves, then a rerun loads the same weights without training
    fresh = build_random_model(get_preset("tiny").replace(layout_prior=4), seed=0)
    fresh.unet.prompt_enhancer.layout.load_state_dict(again.unet.prompt_enhancer.layout.state_dict())
    file = tmp_path / "layout.safetensors"
    from layerdiff.io.files import save_safetensors_atomic

    save_safetensors_atomic(dict(fresh.unet.prompt_enhancer.layout.state_dict()), file)
    other = build_random_model(get_preset("tiny").replace(layout_prior=4), seed=0)
    layout_stage(other, None, tmp_path / "no-cache-needed.safetensors", 64, file, settings, seed=5)
    got = other.unet.prompt_enhancer.layout.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in fresh.unet.prompt_enhancer.layout.state_dict().items())
    wrong = build_random_model(get_preset("tiny").replace(layout_prior=8), seed=0)
    with pytest.raises(LayerDiffError, match="does not hold this model's layout prior"):
        layout_stage(wrong, None, tmp_path / "x.safetensors", 64, file, settings, seed=5)


def test_layout_stage_settings_and_models_without_a_prior_are_refused():
    from layerdiff.training.layout_stage import LAYOUT_STAGE, layout_settings, train_layout_prior

    assert layout_settings({}) == LAYOUT_STAGE and layout_settings({"steps": 0})["steps"] == 0
    for bad, word in (({"step": 3}, "unknown key"), ({"steps": -1}, "steps"), ({"steps": 2.5}, "steps"),
                      ({"lr": 0}, "lr"), ({"lr": float("nan")}, "lr"), ({"batch_size": 0}, "batch_size"), (3, "not an object")):
        with pytest.raises(LayerDiffError, match=word):
            layout_settings(bad)
    model = build_random_model(get_preset("tiny"), seed=0)
    with pytest.raises(LayerDiffError, match="needs a model with a layout prior"):
        train_layout_prior(model, None, LAYOUT_STAGE, seed=0)
