"""Test helper: diffusers/transformers SD1.5 state dicts -> the original (CompVis/LDM) single-file layout.

Written independently of ``layerdiff.io._diffusers_compat`` (which maps the other way) so that a
round trip through both checks both. The tables follow diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` (string replacement over fixed
tables for the 4-block, 2-layer SD1.x UNet/VAE).

Also: files as ComfyUI's CheckpointSave and other tools save them (their extra tensors), and
real-size SD1.5 headers over an empty (sparse) data section.
"""

from __future__ import annotations

import json
import math
import struct
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
    extras: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.nn.Module]:
    """Write tiny random SD1.5-layout models as ONE original-layout safetensors file; return the modules.

    ``ema_offset``: also write a full ``model_ema.*`` copy of the UNet with ``offset`` added.
    ``models``: write these (from ``build_tiny_models``) instead of building new ones.
    ``extras``: more tensors to write (``trainer_leftovers()``), replacing any of the same name.
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
    sd.update(extras or {})
    save_safetensors_atomic(sd, path, metadata={"format": "pt"}, overwrite=True)
    return models


# ---------------------------------------------------------------------------------------------
# Files as other tools save them

# What ComfyUI's CheckpointSave writes for an SD1.5 model (comfy.sd.save_checkpoint ->
# BaseModel.state_dict_for_saving): the LDM UNet under model.diffusion_model., the LDM VAE under
# first_stage_model., and its CLIP (in memory clip_l.transformer.text_model.*, saved with clip_l.
# renamed to cond_stage_model.) in the nested transformers-4 layout. Besides those, by version:
#   "2023":    ComfyUI Aug 2023 - Feb 2024: cond_stage_model.text_projection (a bare matrix) and
#              cond_stage_model.logit_scale; before Dec 2023 its CLIP was transformers' CLIPTextModel,
#              whose position_ids buffer older transformers saved.
#   "2024-02": ComfyUI 25 Feb - 18 Mar 2024: cond_stage_model.transformer.text_projection.weight (a
#              Linear) and cond_stage_model.logit_scale.
#   "current": since 18 Mar 2024 those two are dropped before saving: nothing else.
COMFYUI_SAVERS = ("2023", "2024-02", "current")


def comfyui_saved_state_dict(
    models: dict[str, torch.nn.Module], saved_by: str = "current"
) -> dict[str, torch.Tensor]:
    """The tensors ComfyUI's CheckpointSave of ``saved_by`` (one of ``COMFYUI_SAVERS``) writes for ``models``."""
    if saved_by not in COMFYUI_SAVERS:
        raise ValueError(f"saved_by {saved_by!r}: use one of {COMFYUI_SAVERS}")
    text = models["text_encoder"]
    sd = unet_to_ldm(models["unet"].state_dict())
    sd.update(vae_to_ldm(models["vae"].state_dict()))
    clip = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    sd.update(clip_to_ldm(clip, text_model_prefix=True))
    hidden = text.config.hidden_size
    if saved_by == "2023":
        sd["cond_stage_model.text_projection"] = torch.eye(hidden)
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
            text.config.max_position_embeddings
        ).expand(1, -1)
    if saved_by == "2024-02":
        sd["cond_stage_model.transformer.text_projection.weight"] = torch.eye(hidden)
    if saved_by != "current":
        sd["cond_stage_model.logit_scale"] = torch.tensor(4.6055)
    return sd


def make_comfyui_saved_file(
    path: str | Path,
    models: dict[str, torch.nn.Module] | None = None,
    seed: int = 0,
    saved_by: str = "current",
) -> dict[str, torch.nn.Module]:
    """Write tiny SD1.5-layout models as ComfyUI's CheckpointSave would (its metadata too); return the modules."""
    models = models if models is not None else build_tiny_models(seed)
    metadata = {"prompt": json.dumps({"4": {"class_type": "CheckpointLoaderSimple"}}), "workflow": "{}"}
    save_safetensors_atomic(
        comfyui_saved_state_dict(models, saved_by), path, metadata=metadata, overwrite=True
    )
    return models


def trainer_leftovers(hidden: int = 32, steps: int = 1000) -> dict[str, torch.Tensor]:
    """Tensors A1111 merges, kohya and LDM training runs leave in SD1.5 files that no SD1.5 module uses.

    LDM's DDPM schedule buffers (from SD1.5's scaled-linear betas), its logvar, EMA bookkeeping, the
    autoencoder's training loss (LPIPS and discriminator), a broken float position_ids as some merges
    store it, and a stray SDXL-style ``conditioner.*`` tensor.
    """
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    schedule = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    extras = {k: v.float() for k, v in schedule.items()}
    extras["logvar"] = torch.zeros(steps)
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    extras["first_stage_model.loss.logvar"] = torch.zeros(())
    extras["first_stage_model.loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(4, 3, 3, 3)
    extras["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (
        torch.arange(77, dtype=torch.float32)[None] + 1e-4
    )
    extras["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(hidden)
    return extras


# ---------------------------------------------------------------------------------------------
# Real-size headers without the data

_ST_DTYPE = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}
_ST_BYTES = {"F16": 2, "F32": 4, "I64": 8, "I32": 4}


def sd15_full_size_header(dtype: torch.dtype = torch.float16) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of a real-size original-layout SD1.5 file (as the fp16 ~2 GB files)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from layerdiff.config import load_sd15_configs

    cfg = load_sd15_configs()
    with torch.device("meta"):  # shapes only, no memory
        models = {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        }
        sd = original_state_dict(models)
    return {
        k: (_ST_DTYPE[dtype] if v.is_floating_point() else _ST_DTYPE[v.dtype], tuple(v.shape))
        for k, v in sd.items()
    }


def write_header_only_file(
    path: str | Path, header: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> Path:
    """A valid safetensors file with ``header`` whose data section is a hole: its full size on paper,
    nearly no disk, all zeros if read."""
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in header.items():
        size = math.prod(shape) * _ST_BYTES[dtype]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path
