"""The layout prior of the transformer blocks: a bilinear map of the cell's position features and
the pooled layer prompt. An exact no-op at the start, a gradient from the first step (the reason it
exists: an attention's query and key would each wait for the other), a map that depends on both the
prompt and the place once trained, the config field, old files, and checkpoints."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from layerdiff.config import LayerDiffConfig, get_preset
from layerdiff.errors import LayerDiffError
from layerdiff.io.checkpoint import build_random_model, load_layerdiff, save_layerdiff
from layerdiff.model import LayerDiffUNet
from layerdiff.model.layers import LayoutPrior, position_features


def _layered(rank: int, frequencies: int = 2):
    config = get_preset("tiny").replace(position_features=frequencies, layout_prior=rank)
    torch.manual_seed(0)
    return LayerDiffUNet.from_base(UNet2DConditionModel(**config.unet), config).eval()


def _inputs(seed=0, layers=3, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, layers, 8, h, w, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g),
            torch.randn(2, layers, 5, 32, generator=g))


def test_untrained_layout_prior_is_an_exact_no_op_and_old_weights_load():
    plain, with_prior = _layered(0), _layered(8)
    keys = [k for k in with_prior.state_dict() if ".layout." in k]
    assert keys and all(with_prior.state_dict()[k].abs().sum() == 0 for k in keys if ".layout.out." in k)
    missing, unexpected = with_prior.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(keys) and not unexpected
    with torch.no_grad():
        x, t, glob, lay = _inputs()
        assert torch.equal(with_prior(x, t, glob, lay), plain(x, t, glob, lay))
        # without layer prompts there is nothing to place: the prior is skipped, not an error
        assert with_prior(x, t, glob, None).shape == x.shape


def test_the_output_projection_gets_a_gradient_at_the_first_step():
    model = _layered(8).train()
    x, t, glob, lay = _inputs()
    model(x, t, glob, lay).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".layout.out.weight" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_a_trained_prior_depends_on_the_prompt_and_the_place():
    torch.manual_seed(0)
    prior = LayoutPrior(dim=6, context_dim=32, feature_dim=8, rank=4)
    with torch.no_grad():
        prior.out.weight.normal_(0, 1)
    features = position_features(4, 4, 2)
    tokens = torch.randn(2, 5, 32)
    out = prior(features, tokens)  # (2 prompts, 16 cells, 6)
    assert out.shape == (2, 16, 6)
    assert not torch.allclose(out[0], out[1])  # another prompt, another map
    assert not torch.allclose(out[0, 0], out[0, 15])  # another cell, another value
    # one prompt's map is a function of its own tokens only (no mixing across the batch of layers)
    assert torch.allclose(prior(features, tokens[1:]), out[1:], atol=1e-6)


def test_config_field_is_checked_and_old_configs_have_none():
    assert get_preset("sd15").layout_prior == 0
    data = get_preset("tiny").replace(position_features=2).to_dict()
    data.pop("layout_prior")
    assert LayerDiffConfig.from_dict(data).layout_prior == 0  # files written before the field
    for bad in (-1, 257, 2.5, "3"):
        with pytest.raises(LayerDiffError, match="layout_prior"):
            LayerDiffConfig.from_dict({**data, "layout_prior": bad})
    with pytest.raises(LayerDiffError, match="layout_prior = 8 needs position features"):
        LayerDiffConfig.from_dict({**data, "position_features": 0, "layout_prior": 8})
    with pytest.raises(LayerDiffError, match="layout_prior 8 needs position features"):
        get_preset("tiny").replace(layout_prior=8)


def test_checkpoint_round_trip_keeps_the_prior(tmp_path):
    model = build_random_model(get_preset("tiny").replace(position_features=2, layout_prior=4), seed=1)
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


def test_layout_loss_supervises_the_prior_and_the_text_encoder():
    from layerdiff.training.objective import LayerDiffTrainModule

    model = build_random_model(get_preset("tiny").replace(position_features=2, layout_prior=4), seed=0)
    batch = _toy_batch(model)
    assert "clean" in batch
    with_layout = LayerDiffTrainModule(model, layout_weight=0.5).requires_grad_(True)
    plain = LayerDiffTrainModule(model)
    loss = with_layout(**batch)
    denoise = plain(**batch)  # the same denoising loss, without the layout term
    layout = with_layout.layout_loss(
        model.unet.enhance(*_encoded(with_layout, batch)), batch["clean"], batch["valid"])
    assert layout > 0 and torch.allclose(loss, denoise + 0.5 * layout, rtol=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in with_layout.named_parameters()}
    assert any(".layout.readout." in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any(n.startswith("text_encoder.") and g is not None and g.abs().sum() > 0 for n, g in grads.items())


def _encoded(module, batch):
    B, L = batch["ids_layers"].shape[:2]
    glob = module.text_encoder(batch["ids_global"])[0]
    n = module.layer_prompt_tokens or None  # the truncation of the module's own forward
    lay = module.text_encoder(batch["ids_layers"].flatten(0, 1)[:, :n])[0].unflatten(0, (B, L))
    return glob, lay


def test_a_few_steps_on_the_layout_loss_lower_it():
    from layerdiff.training.objective import LayerDiffTrainModule

    model = build_random_model(get_preset("tiny").replace(position_features=2, layout_prior=4), seed=0)
    batch = _toy_batch(model)
    module = LayerDiffTrainModule(model, layout_weight=1.0).requires_grad_(True)
    params = [p for n, p in module.named_parameters() if ".layout." in n]
    opt = torch.optim.Adam(params, lr=3e-2)

    def layout_loss():
        return module.layout_loss(model.unet.enhance(*_encoded(module, batch)), batch["clean"], batch["valid"])

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
    model = build_random_model(get_preset("tiny").replace(position_features=2, layout_prior=rank), seed=0)
    if trained:  # a readout that prefers the left of the image for any prompt
        with torch.no_grad():
            for name, p in model.unet.named_parameters():
                if ".layout." in name and not name.endswith("out.weight") and not name.endswith("out.bias"):
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


def test_the_start_hook_moves_only_foreground_mask_channels_by_the_centred_map():
    from layerdiff.sampling.layout_prior import LayoutPriorStart

    cover = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    white, black = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([-1.0, 0.0, 0.0, 1.0])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    hook = LayoutPriorStart(2.0, cover, (white, black), valid, a_first=0.25, init_sigma=3.0)
    noise = torch.randn(2, 3, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    x = hook.start(noise * 3.0, noise)
    delta = x - noise * 3.0
    assert delta[:, 0].abs().max() == 0 and delta[:, :, :4].abs().max() == 0  # background and image channels
    assert delta[1, 2].abs().max() == 0  # a padding slot
    expected = 2.0 * 0.5 * 3.0 * (cover[0, 0] - cover[0, 0].mean())[None] * (white - black)[:, None, None]
    assert torch.allclose(delta[0, 1, 4:], expected, atol=1e-6)
    assert torch.allclose(delta[:, 1:, 4:].mean((-1, -2)), torch.zeros(2, 2, 4), atol=1e-6)  # centred


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
