"""A LayerDiff file (full or adapter) on SD 1.5 weights a host application already holds.

ComfyUI users load their own checkpoint (often a fine-tune) and LoRAs with the stock loaders; the
node *Apply LayerDiff to Model* hands their weights here in the original (CompVis/LDM) layout:
``model.diffusion_model.*`` for the UNet, ``first_stage_model.*`` for the VAE and
``cond_stage_model.transformer.*`` for the CLIP text encoder. Nothing here imports the host.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from layerdiff.errors import CheckpointError
from layerdiff.io import _diffusers_compat as compat
from layerdiff.io.adapter import ADAPTER, BASE_WEIGHTS, base_shapes, split_names, unet_on_base
from layerdiff.io.checkpoint import check_layerdiff_file, check_memory, layerdiff_kind
from layerdiff.io.files import read_safetensors
from layerdiff.io.sd15 import load_sd15_state_dict
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.model.text import build_tokenizer

logger = logging.getLogger("layerdiff.io")

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = compat.UNET_PREFIX, compat.VAE_PREFIX, compat.CLIP_PREFIX


def _weight_bytes(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    return sum(t.numel() for t in tensors.values()) * itemsize


def diffusers_deltas(deltas: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """UNet weight changes under original names (``model.diffusion_model.*``) -> diffusers names
    (without ``unet.``) of the SD UNet of ``config``."""
    names = [k.removeprefix("unet.") for k in base_shapes(config)]
    to_diffusers = {ldm: key for key, ldm in compat.unet_ldm_names(names, config.unet).items()}
    out = {}
    for name, delta in deltas.items():
        key = to_diffusers.get(name)
        if key is None:
            raise CheckpointError(
                f"a weight patch targets {name!r}, which an SD 1.5 UNet does not have: the LoRA or patch was made "
                "for another architecture"
            )
        out[key] = delta
    return out


def load_on_weights(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    deltas: Mapping[str, torch.Tensor] | None = None,
    base_weights: str = "model",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "the MODEL",
    tokenizer_dirs: list[str] | None = None,
    text_layers: int | None = None,
    share: bool = False,
) -> LayerDiffModel:
    """The LayerDiff model of file ``path`` on SD 1.5 weights held in memory.

    ``tensors``: original-layout UNet, VAE and text-encoder weights (as a host has them, LoRAs
    applied). ``base_weights``: ``"model"`` runs the layer modules on those UNet weights (a
    fine-tune's look; adapters allow only this); ``"layerdiff"`` keeps a full file's own SD weights
    and adds ``deltas`` (original names -> weight change: what the host's LoRAs did). The VAE and
    text encoder always come from ``tensors``, which are never changed (copied unless ``share``).
    ``text_layers``: use only the first n layers of the text encoder (then its final layer norm), as
    a CLIP skip does. ``share``: weights of ``tensors`` that already have ``dtype`` are used as they
    are, not copied (the host's model and this one then share that memory; neither writes to it).
    """
    if base_weights not in BASE_WEIGHTS:
        raise CheckpointError(f"base_weights {base_weights!r} is unknown: choose {' or '.join(BASE_WEIGHTS)}")
    path = Path(path)
    config, meta, shapes = check_layerdiff_file(path)
    kind = layerdiff_kind(path)
    if (config.tokenizer or {}).get("type") != "clip_bpe":  # the toy models have their own UNet and vocabulary
        raise CheckpointError(
            f"{path.name} is a LayerDiff model of architecture {config.name!r} (its own UNet and tokenizer), not an "
            f"SD 1.5 LayerDiff: it cannot run on {source}; load it with Load LayerDiff instead"
        )
    if kind == ADAPTER and base_weights == "layerdiff":
        raise CheckpointError(
            f"{path.name} is an adapter (layer modules only) and has no SD weights of its own: set base_weights to 'model'"
        )
    unet_shapes = {k: tuple(v.shape) for k, v in meta["unet"].state_dict().items()}
    _, adapter_names = split_names({k: v for k, v in unet_shapes.items() if k.startswith("unet.")}, config)
    keep = adapter_names | {k for k in unet_shapes if not k.startswith("unet.")}
    wanted = sorted(keep if base_weights == "model" else unet_shapes)
    file_bytes = sum(math.prod(unet_shapes[k]) for k in wanted) * torch.empty((), dtype=dtype).element_size()
    copied = _weight_bytes({k: v for k, v in tensors.items() if not (share and v.dtype == dtype)}, dtype)
    check_memory(path, file_bytes + copied, dtype)  # the new modules; the file is read once
    components = ("unet", "vae", "text_encoder")
    text_config = dict(config.text_encoder)
    if text_layers is not None:
        total = int(text_config["num_hidden_layers"])
        if not 1 <= int(text_layers) <= total:
            raise CheckpointError(
                f"the text encoder has {total} layers; {text_layers} cannot be used: set the CLIP's last layer "
                f"between -{total} and -1"
            )
        text_config["num_hidden_layers"] = int(text_layers)
        skipped = tuple(f"{CLIP_PREFIX}text_model.encoder.layers.{i}." for i in range(int(text_layers), total))
        tensors = {k: v for k, v in tensors.items() if not k.startswith(skipped)} if skipped else tensors
    try:
        parts = load_sd15_state_dict(
            tensors, source=source, dtype=dtype, components=components,
            unet_config=config.unet, vae_config=config.vae, text_config=text_config, share=share,
        )  # fmt: skip
    except CheckpointError as exc:
        raise CheckpointError(
            f"{source} does not fit the SD 1.5 architecture {path.name} was built on ({exc}): use the checkpoint "
            "family the LayerDiff file was made for (SD 1.5 and its fine-tunes)"
        ) from None
    core, _ = read_safetensors(path, keys=[k for k in wanted if k in shapes], dtype=dtype)
    unet_deltas = diffusers_deltas(deltas, config) if deltas and base_weights == "layerdiff" else None
    unet = unet_on_base(parts["unet"], config, core, kind, base_weights, unet_deltas, source=str(path))
    tokenizer = build_tokenizer(config.tokenizer, tokenizer_dirs)
    model = LayerDiffModel(config, unet, parts["vae"], parts["text_encoder"], tokenizer, source=f"{path.name} on {source}")
    logger.info("LayerDiff %s (%s) on %s, SD weights from the %s", path.name, kind, source, base_weights)
    return model.to(device=device, dtype=dtype).eval()
