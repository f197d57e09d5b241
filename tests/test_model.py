"""The layered UNet: zero-init equivalence with the base UNet, shapes, masks, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from layerdiff.config import get_preset
from layerdiff.errors import LayerDiffError
from layerdiff.model import LayerDiffUNet, PromptEnhancer


@pytest.fixture(scope="module")
def pair():
    config = get_preset("tiny")
    torch.manual_seed(0)
    base = UNet2DConditionModel(**config.unet).eval()
    # give the base non-trivial conv_out weights (diffusers inits are fine, but be explicit)
    ref = copy.deepcopy(base)
    layered = LayerDiffUNet.from_base(base, config).eval()
    return ref, layered, config


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_untrained_layerdiff_equals_base_unet_per_layer(pair, layers):
    ref, layered, _ = pair
    B, T, D = 2, 7, 32
    g = torch.Generator().manual_seed(layers)
    x = torch.randn(B, layers, 8, 8, 8, generator=g)
    glob = torch.randn(B, T, D, generator=g)
    lay = torch.randn(B, layers, 5, D, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        enhanced = layered.enhance(glob, lay)
        out = layered(x, t, glob, enhanced)
        assert torch.equal(enhanced, lay)  # zero-initialised enhancer: enhanced == layer prompt
        for b in range(B):
            for layer in range(layers):
                expected = ref(x[b : b + 1, layer, :4], t[b : b + 1], encoder_hidden_states=glob[b : b + 1]).sample
                torch.testing.assert_close(out[b, layer, :4], expected[0], atol=2e-5, rtol=1e-4)
    assert out.shape == x.shape


def test_odd_latent_sizes_are_accepted(pair):
    _, layered, _ = pair
    x = torch.randn(1, 2, 8, 9, 7)
    with torch.no_grad():
        out = layered(x, 5, torch.randn(1, 3, 32))
    assert out.shape == x.shape


def test_mixed_layer_counts_mask_empty_slots(pair):
    """Empty slots neither produce output nor influence valid layers (keys masked)."""
    _, layered, config = pair
    model = copy.deepcopy(layered)
    with torch.no_grad():  # make inter-layer attention non-trivial
        for name, p in model.named_parameters():
            if "inter_layer_attn.to_out" in name:
                p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 8, generator=g)
    glob = torch.randn(2, 3, 32, generator=g)
    with torch.no_grad():
        out = model(x, 50, glob, num_layers=[2, 4])
        assert torch.all(out[0, 2:] == 0)  # empty slots are zero
        x2 = x.clone()
        x2[0, 2:] = torch.randn(2, 8, 8, 8, generator=g)  # garbage in empty slots
        out2 = model(x2, 50, glob, num_layers=[2, 4])
        torch.testing.assert_close(out2[0, :2], out[0, :2])
        # the same sample alone with 2 layers gives the same result
        alone = model(x[:1, :2], 50, glob[:1])
        torch.testing.assert_close(alone[0], out[0, :2], atol=1e-5, rtol=1e-4)
        # and valid layers DO interact: changing layer 1 changes layer 0's prediction
        x3 = x.clone()
        x3[1, 1] += 1.0
        out3 = model(x3, 50, glob, num_layers=[2, 4])
        assert not torch.allclose(out3[1, 0], out[1, 0])


def test_max_layers_8_works():
    config = get_preset("tiny", max_layers=8)
    torch.manual_seed(0)
    model = LayerDiffUNet.from_config(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 8, 8, 8, 8), 3, torch.randn(1, 4, 32), torch.randn(1, 8, 4, 32))
    assert out.shape == (1, 8, 8, 8, 8)


@pytest.mark.parametrize(
    "shape, glob_shape, match",
    [
        ((1, 2, 4, 8, 8), (1, 3, 32), "expected \\(batch, layers, 8, h, w\\)"),
        ((1, 5, 8, 8, 8), (1, 3, 32), "1..4"),
        ((8, 8, 8, 8), (1, 3, 32), "sample has shape"),
        ((2, 2, 8, 8, 8), (1, 3, 32), "global_tokens has shape"),
        ((1, 2, 8, 8, 8), (1, 3, 16), "global_tokens has shape"),
    ],
)
def test_bad_shapes_raise_clear_errors(pair, shape, glob_shape, match):
    _, layered, _ = pair
    with pytest.raises(LayerDiffError, match=match):
        layered(torch.randn(*shape), 1, torch.randn(*glob_shape))


def test_bad_validity_and_layer_tokens(pair):
    _, layered, _ = pair
    x, glob = torch.randn(1, 2, 8, 8, 8), torch.randn(1, 3, 32)
    with pytest.raises(LayerDiffError, match="layer_tokens has shape"):
        layered(x, 1, glob, torch.randn(1, 3, 4, 32))
    with pytest.raises(LayerDiffError, match="num_layers"):
        layered(x, 1, glob, num_layers=[3])
    with pytest.raises(LayerDiffError, match="background"):
        layered(x, 1, glob, valid=torch.tensor([[False, True]]))
    with pytest.raises(LayerDiffError, match="timestep shape"):
        layered(x, torch.tensor([1, 2, 3]), glob)


def test_new_modules_are_zero_initialised_and_base_keys_unchanged(pair):
    ref, layered, _ = pair
    keys = set(layered.state_dict())
    base_keys = {f"unet.{k}" for k in ref.state_dict()}
    assert base_keys <= keys  # SD weights keep diffusers' names
    new = keys - base_keys
    assert any("inter_layer_attn" in k for k in new) and any("intra_layer_attn" in k for k in new)
    assert any(k.startswith("prompt_enhancer.") for k in new)
    sd = layered.state_dict()
    for k in new:
        if k.endswith("inter_layer_attn.to_out.weight") or k.endswith("intra_layer_attn.gate"):
            assert torch.all(sd[k] == 0), k
    w_in = sd["unet.conv_in.weight"]
    assert w_in.shape[1] == 8 and torch.all(w_in[:, 4:] == 0)
    torch.testing.assert_close(w_in[:, :4], ref.conv_in.weight)
    w_out = sd["unet.conv_out.weight"]
    assert w_out.shape[0] == 8 and torch.all(w_out[4:] == 0)


def test_prompt_enhancer_mixes_global_prompt_once_trained():
    enh = PromptEnhancer(32, max_layers=4, num_blocks=2, head_dim=16)
    with torch.no_grad():
        enh.proj_out.weight.normal_(0, 0.1)
    glob1, glob2 = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    lay = torch.randn(1, 3, 4, 32)
    a, b = enh(glob1, lay), enh(glob2, lay)
    assert a.shape == lay.shape
    assert not torch.allclose(a, b)  # layer tokens now depend on the global prompt
    assert not torch.allclose(a[0, 0], a[0, 1] - lay[0, 1] + lay[0, 0])  # and on the slot


def test_base_unet_with_wrong_channels_is_refused(tiny_config):
    cfg = dict(tiny_config.unet, in_channels=9)
    with pytest.raises(LayerDiffError, match="4-channel"):
        LayerDiffUNet.from_base(UNet2DConditionModel(**cfg), tiny_config)


def test_vae_calls_are_chunked_by_pixels_with_the_same_result(monkeypatch):
    """Large batches are encoded and decoded a few images at a time (bounded activation memory);
    the result is the one-call result."""
    import layerdiff.model.bundle as bundle
    from layerdiff.io.checkpoint import load_model

    model = load_model("tiny")
    g = torch.Generator().manual_seed(0)
    f = model.vae_scale_factor
    latents = torch.randn(5, 4, 4, 4, generator=g)
    images = torch.rand(5, 3, 4 * f, 4 * f, generator=g) * 2 - 1
    whole_dec, whole_enc = model.decode_images(latents), model.encode_images(images)
    calls = []
    decode = model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z: calls.append(z.shape[0]) or decode(z))
    monkeypatch.setattr(bundle, "VAE_CHUNK_PIXELS", 2 * (4 * f) ** 2)  # two images per call
    torch.testing.assert_close(model.decode_images(latents), whole_dec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_images(images), whole_enc, atol=1e-5, rtol=1e-5)
    assert calls == [2, 2, 1]


def test_a_closed_intra_layer_gate_skips_the_attention_and_an_opened_one_counts():
    """While a gate is exactly 0 the intra-layer attention is skipped (its output would be 0); the
    check follows in-place updates and new tensors, and works on inference tensors (ComfyUI)."""
    from layerdiff.io.checkpoint import load_model

    model = load_model("tiny")
    blocks = [m for m in model.unet.modules() if hasattr(m, "intra_layer_attn")]
    intra = blocks[0].intra_layer_attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 8, 8, 8, generator=g)
    ctx = torch.randn(1, 16, model.unet.unet.config.cross_attention_dim, generator=g)
    tokens = ctx[:, None].expand(-1, 2, -1, -1)
    with torch.no_grad():
        for b in blocks:
            b.intra_layer_attn.gate.zero_()
        closed = model.unet(x, 10, ctx, model.unet.enhance(ctx, tokens))
        assert intra.closed()
        intra.gate.fill_(0.5)  # in place: seen
        assert not intra.closed()
        opened = model.unet(x, 10, ctx, model.unet.enhance(ctx, tokens))
        assert not torch.allclose(opened, closed)
    with torch.inference_mode():
        intra.gate = torch.nn.Parameter(torch.zeros(1))
        assert intra.closed()
