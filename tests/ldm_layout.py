"""Test helper: diffusers/transformers SD1.5 state dicts -> the original (CompVis/LDM) single-file layout.

Written independently of ``layerdiff.io._diffusers_compat`` (which maps the other way) so that a
round trip through both checks both. The tables follow diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` (string replacement over fixed
tables for the 4-block, 2-layer SD1.x UNet/VAE).
"""

from __future__ import annotations

from pathlib import Path

import torch

from layerdiff.io.files import save_safetensors_atomic

# ---------------------------------------------------------------------------------------------
# UNet: (original, diffusers) pairs, as in the diffusers script

_UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def _unet_layers() -> list[tuple[str, str]]:
    layers = []
    for i in range(4):
        for j in range(2):
            layers.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                layers.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layers.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                layers.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layers.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layers.append(
                (f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0.")
            )
    layers.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layers.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return layers


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel (SD1.x block layout) -> ``model.diffusion_model.*``."""
    out = {}
    layers = _unet_layers()
    for key, value in state.items():
        new = key
        for ldm, hf in _UNET_TOP:
            if new.startswith(hf):
                new = ldm + new[len(hf) :]
        if "resnets" in key:
            for ldm, hf in _UNET_RESNET:
                new = new.replace(hf, ldm)
        for ldm, hf in layers:
            new = new.replace(hf, ldm)
        out["model.diffusion_model." + new] = value
    return out


# ---------------------------------------------------------------------------------------------
# VAE


def _vae_map() -> list[tuple[str, str]]:
    pairs = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(4):
        for j in range(2):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            pairs.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return pairs


_VAE_ATTN = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL (SD layout) -> ``first_stage_model.*``; attention linears become 1x1 convs."""
    out = {}
    pairs = _vae_map()
    for key, value in state.items():
        new = key
        for ldm, hf in pairs:
            new = new.replace(hf, ldm)
        if "attentions" in key:
            for ldm, hf in _VAE_ATTN:
                new = new.replace(hf, ldm)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], text_model_prefix: bool = True) -> dict[str, torch.Tensor]:
    """CLIPTextModel (transformers 4 or 5 names) -> ``cond_stage_model.transformer[.text_model].*``."""
    head = "cond_stage_model.transformer." + ("text_model." if text_model_prefix else "")
    return {head + k.removeprefix("text_model."): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Tiny SD1.5-shaped models with the real block layout

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}
TINY_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
TINY_CONFIGS = {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT}


def build_tiny_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Random tiny UNet / VAE / CLIP text models (eval mode) after a fixed seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    # Zero-initialised layers would hide a swapped pair of tensors: give every tensor distinct values.
    with torch.no_grad():
        for model in (unet, vae, text):
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.05 + (0.1 if p.ndim == 1 else 0.0))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval()}


def original_state_dict(
    models: dict[str, torch.nn.Module], text_model_prefix: bool = True
) -> dict[str, torch.Tensor]:
    """The single-file original-layout state dict of ``models`` (with CLIP's position_ids, as real files have)."""
    sd: dict[str, torch.Tensor] = {}
    if "unet" in models:
        sd.update(unet_to_ldm(models["unet"].state_dict()))
    if "vae" in models:
        sd.update(vae_to_ldm(models["vae"].state_dict()))
    if "text_encoder" in models:
        text = models["text_encoder"]
        sd.update(clip_to_ldm(text.state_dict(), text_model_prefix))
        n = text.config.max_position_embeddings
        head = "cond_stage_model.transformer." + ("text_model." if text_model_prefix else "")
        sd[head + "embeddings.position_ids"] = torch.arange(n).expand(1, -1)
    return sd


def make_original_sd15_file(
    path: str | Path,
    width_scale: str = "tiny",
    seed: int = 0,
    *,
    text_model_prefix: bool = True,
    components: tuple[str, ...] = ("unet", "vae", "text_encoder"),
    ema_offset: float | None = None,
    models: dict[str, torch.nn.Module] | None = None,
) -> dict[str, torch.nn.Module]:
    """Write tiny random SD1.5-layout models as ONE original-layout safetensors file; return the modules.

    ``ema_offset``: also write a full ``model_ema.*`` copy of the UNet with ``offset`` added.
    ``models``: write these (from ``build_tiny_models``) instead of building new ones.
    """
    if width_scale != "tiny":
        raise ValueError(f"width_scale {width_scale!r}: only 'tiny' is built in tests")
    models = models if models is not None else build_tiny_models(seed)
    sd = original_state_dict({c: models[c] for c in components}, text_model_prefix)
    if ema_offset is not None:
        for k, v in list(sd.items()):
            if k.startswith("model.diffusion_model."):
                sd["model_ema." + k.removeprefix("model.").replace(".", "")] = v + ema_offset
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    save_safetensors_atomic(sd, path, metadata={"format": "pt"}, overwrite=True)
    return models
