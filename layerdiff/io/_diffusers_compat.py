"""Original (CompVis/LDM) SD1.5 tensor names for each diffusers/transformers parameter name.

This is the one place that knows both key layouts. It does NOT import diffusers'
``loaders.single_file_utils`` converters: they are private API and changed shape across the versions
this pack supports (in diffusers 0.27 ``convert_ldm_clip_checkpoint`` built a ``CLIPTextModel`` and
fetched ``openai/clip-vit-large-patch14`` from the Hub; from 0.28 it returns a dict), and their
substring matching silently returns ``None`` for absent keys. Instead the map is derived here from
the model config and the target model's own parameter names ("pull" direction), so every name the
model needs gets exactly one source name and nothing is guessed. The tables follow diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py``; ``diffusers_reference_converters``
exposes diffusers' own converters so a test can check this map against them where they exist.

transformers 5 flattened ``CLIPTextModel`` (its names lost the ``text_model.`` prefix that 4.x
has); ``clip_ldm_names`` accepts either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch

from layerdiff.errors import CheckpointError

logger = logging.getLogger("layerdiff.io")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."

# diffusers name -> LDM name of the parts inside one block.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names of diffusers < 0.15 models, kept for models that still use them
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}

# (diffusers module prefix, LDM module prefix, renames of the parts inside it)
PrefixTable = list[tuple[str, str, Mapping[str, str]]]


def _layers_per_block(config: Mapping) -> int:
    n = config.get("layers_per_block", 2)
    if not isinstance(n, int):
        raise CheckpointError(
            f"UNet config layers_per_block {n!r} is per-block; an SD1.5 UNet uses one int (2)"
        )
    return n


def unet_prefix_table(config: Mapping) -> PrefixTable:
    """Module prefixes of an SD-style UNet2DConditionModel; the LDM numbering follows the config."""
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    n_blocks, n_layers = len(down_types), _layers_per_block(config)
    table: PrefixTable = [
        ("conv_in", "input_blocks.0.0", {}),
        ("time_embedding.linear_1", "time_embed.0", {}),
        ("time_embedding.linear_2", "time_embed.2", {}),
        ("conv_norm_out", "out.0", {}),
        ("conv_out", "out.2", {}),
        ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", {}),
        ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    ldm = 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(down_types):
        for j in range(n_layers):
            table.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{ldm}.0", _UNET_RESNET))
            if "CrossAttn" in kind:
                table.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{ldm}.1", {}))
            ldm += 1
        if i < n_blocks - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{ldm}.0.op", {}))
            ldm += 1
    ldm = 0
    for i, kind in enumerate(up_types):
        cross = "CrossAttn" in kind
        for j in range(n_layers + 1):
            table.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{ldm}.0", _UNET_RESNET))
            if cross:
                table.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{ldm}.1", {}))
            ldm += 1
        if i < n_blocks - 1:
            # the upsampler sits after the resnet (.1) or after resnet + attention (.2)
            table.append(
                (f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{ldm - 1}.{2 if cross else 1}.conv", {})
            )
    return table


def vae_prefix_table(config: Mapping) -> PrefixTable:
    """Module prefixes of an SD AutoencoderKL; LDM numbers decoder blocks in reverse."""
    n_blocks, n_layers = len(config["down_block_types"]), _layers_per_block(config)
    table: PrefixTable = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.conv_in", f"{part}.conv_in", {}),
            (f"{part}.conv_out", f"{part}.conv_out", {}),
            (f"{part}.conv_norm_out", f"{part}.norm_out", {}),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION),
        ]
    for i in range(n_blocks):
        for j in range(n_layers):
            table.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < n_blocks - 1:
            table.append(
                (f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {})
            )
        ldm = n_blocks - 1 - i
        for j in range(n_layers + 1):
            table.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm}.block.{j}", _VAE_RESNET))
        if i < n_blocks - 1:
            table.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm}.upsample.conv", {}))
    return table


def _rename(key: str, table: PrefixTable) -> str | None:
    for d_prefix, l_prefix, parts in table:
        if key.startswith(d_prefix + "."):
            rest = key[len(d_prefix) + 1 :]
            for d_part, l_part in parts.items():
                if rest.startswith(d_part + "."):
                    rest = l_part + rest[len(d_part) :]
                    break
            return f"{l_prefix}.{rest}"
    return None


def _map_all(keys: Iterable[str], table: PrefixTable, prefix: str, what: str) -> dict[str, str]:
    # Longest prefix first, so "mid_block.resnets.1" never shadows a longer name.
    table = sorted(table, key=lambda row: len(row[0]), reverse=True)
    names = {}
    for key in keys:
        ldm = _rename(key, table)
        if ldm is None:
            raise CheckpointError(
                f"{what} parameter {key!r} has no Stable Diffusion 1.5 original-layout name: "
                "the config is not an SD1.5-style architecture"
            )
        names[key] = prefix + ldm
    return names


def unet_ldm_names(keys: Iterable[str], config: Mapping) -> dict[str, str]:
    """diffusers UNet parameter name -> full original name (``model.diffusion_model.*``)."""
    return _map_all(keys, unet_prefix_table(config), UNET_PREFIX, "UNet")


def vae_ldm_names(keys: Iterable[str], config: Mapping) -> dict[str, str]:
    """diffusers VAE parameter name -> full original name (``first_stage_model.*``)."""
    return _map_all(keys, vae_prefix_table(config), VAE_PREFIX, "VAE")


def clip_ldm_names(keys: Iterable[str], text_model_prefix: bool) -> dict[str, str]:
    """CLIPTextModel parameter name -> ``cond_stage_model.transformer[.text_model].*`` name.

    ``text_model_prefix``: whether the file uses the transformers >= 4.x nesting
    (``...transformer.text_model.encoder...``) or the older flat one (``...transformer.encoder...``).
    """
    head = CLIP_PREFIX + ("text_model." if text_model_prefix else "")
    return {k: head + k.removeprefix("text_model.") for k in keys}


def ema_name(ldm_name: str) -> str:
    """LDM's LitEma buffer name of a UNet weight: ``model_ema.`` + the name after ``model.`` without dots."""
    return EMA_PREFIX + ldm_name.removeprefix("model.").replace(".", "")


def fit_to_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """LDM's VAE attention uses 1x1 convs where diffusers uses linears: drop the trailing 1s."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if tensor.numel() == torch.Size(shape).numel() and tuple(tensor.shape[: len(shape)]) == tuple(shape):
        if all(d == 1 for d in tensor.shape[len(shape) :]):
            return tensor.reshape(shape)
    raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}")


def diffusers_reference_converters():
    """diffusers' own (private) LDM converters ``(unet, vae)`` where present with the >= 0.28 API, else None.

    Only tests use this, to check the tables above against diffusers.
    """
    try:
        from diffusers.loaders import single_file_utils as sfu
    except ImportError:
        return None
    unet = getattr(sfu, "convert_ldm_unet_checkpoint", None)
    vae = getattr(sfu, "convert_ldm_vae_checkpoint", None)
    if unet is None or vae is None or not hasattr(sfu, "DIFFUSERS_TO_LDM_MAPPING"):
        return None
    return unet, vae
