"""The two layouts of the layer modules: the paper's full one ("separate", full-width inter-layer
attention) and the cheaper one the presets use ("shared" intra-layer attention, half-width
inter-layer attention). Both start as exact no-ops; the fused path equals the plain one."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from layerdiff.config import LayerDiffConfig, get_preset
from layerdiff.errors import LayerDiffError
from layerdiff.model import LayerDiffUNet
from layerdiff.model.layers import LayerContext, LayeredTransformerBlock


def _layouts():
    tiny = get_preset("tiny")
    return {
        "shared-half": tiny,
        "separate-full": tiny.replace(inter_layer_width=1.0, intra_layer_mode="separate"),
    }


@pytest.mark.parametrize("layout", ["shared-half", "separate-full"])
def test_each_layout_starts_as_the_base_unet(layout):
    config = _layouts()[layout]
    torch.manual_seed(0)
    base = UNet2DConditionModel(**config.unet).eval()
    ref = copy.deepcopy(base)
    layered = LayerDiffUNet.from_base(base, config).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, 8, generator=g)
    glob = torch.randn(2, 6, 32, generator=g)
    lay = torch.randn(2, 3, 5, 32, generator=g)
    t = torch.tensor([5, 900])
    with torch.no_grad():
        out = layered(x, t, glob, layered.enhance(glob, lay))
        for b in range(2):
            expected = ref(x[b, :, :4], t[b : b + 1].expand(3), encoder_hidden_states=glob[b : b + 1].expand(3, -1, -1))
            torch.testing.assert_close(out[b, :, :4], expected.sample, atol=2e-5, rtol=1e-4)


def test_layout_sizes_and_parameters():
    layouts = _layouts()
    cheap, full = (LayerDiffUNet.from_config(layouts[k]) for k in ("shared-half", "separate-full"))
    block = next(m for m in cheap.modules() if isinstance(m, LayeredTransformerBlock))
    dim = block.norm1.normalized_shape[0]
    assert block.inter_layer_attn.to_q.out_features == round(dim * 0.5)
    assert block.inter_layer_attn.to_out.in_features == round(dim * 0.5)
    assert not hasattr(block.intra_layer_attn, "to_q") and not hasattr(block.intra_layer_attn, "to_out")
    full_block = next(m for m in full.modules() if isinstance(m, LayeredTransformerBlock))
    assert full_block.inter_layer_attn.to_q.out_features == dim
    assert hasattr(full_block.intra_layer_attn, "to_q")
    n_cheap = sum(p.numel() for p in cheap.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert n_cheap < n_full


def test_files_without_the_layout_fields_keep_the_papers_layout():
    """Checkpoints written before the fields existed describe the full layout (the defaults)."""
    data = get_preset("toy").to_dict()
    del data["inter_layer_width"], data["intra_layer_mode"]
    config = LayerDiffConfig.from_dict(data)
    assert config.inter_layer_width == 1.0 and config.intra_layer_mode == "separate"


@pytest.mark.parametrize("field,value,needle", [
    ("inter_layer_width", 0.0, "inter_layer_width 0.0"),
    ("inter_layer_width", 1.5, "inter_layer_width 1.5"),
    ("intra_layer_mode", "fused", "intra_layer_mode 'fused'"),
])
def test_bad_layout_fields_are_named(field, value, needle):
    with pytest.raises(LayerDiffError, match=needle):
        get_preset("tiny", **{field: value})


def test_shared_fused_path_equals_the_processor_path():
    """With a trained (non-zero) gate, the fused cross-attention equals diffusers' attn2 plus the
    layer attention computed separately (the path taken when an attention mask is passed)."""
    config = get_preset("tiny")
    torch.manual_seed(0)
    unet = LayerDiffUNet.from_config(config).eval()
    block = next(m for m in unet.modules() if isinstance(m, LayeredTransformerBlock))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        block.intra_layer_attn.gate.fill_(0.7)
        for p in block.intra_layer_attn.to_k.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        dim = block.norm1.normalized_shape[0]
        h = torch.randn(2 * 3, 16, dim, generator=g)
        glob = torch.randn(6, 5, 32, generator=g)
        tokens = torch.randn(6, 4, 32, generator=g)
        ctx = LayerContext(num_layers=3, valid=torch.ones(2, 3, dtype=torch.bool), layer_tokens=tokens, all_valid=True)
        fused = block(h, encoder_hidden_states=glob, cross_attention_kwargs={"layerdiff": ctx})
        keep_all = torch.ones(6, 1, 5, dtype=torch.bool)  # a mask that masks nothing takes the other path
        plain = block(h, encoder_hidden_states=glob, encoder_attention_mask=keep_all,
                      cross_attention_kwargs={"layerdiff": ctx})
        block.intra_layer_attn.gate.zero_()
        no_layers = block(h, encoder_hidden_states=glob, cross_attention_kwargs={"layerdiff": ctx})
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    assert (fused - no_layers).abs().max() > 1e-3  # the layer prompt really acts once the gate opens


def test_layer_prompts_keep_their_first_tokens_as_if_encoded_short(tiny_model):
    """Truncating the (causal) text encoder's states equals encoding the truncated ids: training
    (which encodes short ids) and sampling (which slices the states) see the same tokens."""
    from layerdiff.conditioning import LayerPrompts, encode_prompts
    from layerdiff.model.text import tokenize

    n = tiny_model.config.layer_prompt_tokens
    assert 2 <= n < tiny_model.tokenizer.model_max_length
    texts = ["a large red star on the left", "a blue sky"]
    ids = tokenize(tiny_model.tokenizer, texts)
    with torch.no_grad():
        full = tiny_model.text_encoder(ids)[0]
        short = tiny_model.text_encoder(ids[:, :n])[0]
    torch.testing.assert_close(full[:, :n], short, atol=1e-5, rtol=1e-5)
    cond = encode_prompts(tiny_model, LayerPrompts("a red star in front of a blue sky", ("a blue sky", "a red star")))
    assert cond.layer_tokens.shape[2] == n and cond.uncond_layer_tokens.shape[2] == n
    assert cond.global_tokens.shape[1] == tiny_model.tokenizer.model_max_length


def test_bad_layer_prompt_tokens_is_named():
    with pytest.raises(LayerDiffError, match="layer_prompt_tokens 1"):
        get_preset("tiny", layer_prompt_tokens=1)
