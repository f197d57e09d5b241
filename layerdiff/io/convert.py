"""An untrained LayerDiff file from a user's SD 1.5 checkpoint: ``python -m layerdiff convert``.

The base's UNet is widened to the layer latents and gets its layer modules
(:meth:`layerdiff.model.unet.LayerDiffUNet.from_base`); the file records the base's real
architecture, so it can be paired with the same base later.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layerdiff.config import IMAGE_CHANNELS, LayerDiffConfig, get_preset
from layerdiff.errors import CheckpointError
from layerdiff.io.checkpoint import save_layerdiff
from layerdiff.io.sd15 import load_base_components
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.model.unet import LayerDiffUNet


def convert_sd15(
    base: str | Path,
    out: str | Path,
    config: LayerDiffConfig | None = None,
    include_vae_and_text_encoder: bool = False,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    base_config: LayerDiffConfig | None = None,
    adapter: bool = False,
) -> Path:
    """Build an untrained LayerDiff from a user's SD 1.5 checkpoint (the start of training).

    ``adapter``: write only the (untrained) layer modules, which apply to any base of this architecture.

    ``base_config``: the architecture of ``base`` when it is not the real SD 1.5 (tests use
    reduced widths with the real key layout).
    """
    config = config or get_preset("sd15")
    out = Path(out)
    if out.exists() and not overwrite:  # before the (slow) load of the base
        raise CheckpointError(f"{out} already exists: pass --overwrite or choose another --out")
    parts = load_base_components(base, components=("unet", "vae", "text_encoder"), config=base_config)
    # record the base's real architecture, so the file can be paired with the same base later
    config = config.replace(
        unet=_diffusers_config(parts["unet"], in_out=IMAGE_CHANNELS),
        vae=_diffusers_config(parts["vae"]),
        text_encoder={k: v for k, v in parts["text_encoder"].config.to_diff_dict().items() if k != "transformers_version"},
    )
    unet = LayerDiffUNet.from_base(parts["unet"], config)
    if adapter:
        return save_layerdiff(unet, out, include_vae_and_text_encoder=False, overwrite=overwrite, dtype=dtype,
                              kind="adapter")
    if include_vae_and_text_encoder:
        model = LayerDiffModel(config, unet, parts["vae"], parts["text_encoder"], None, source=str(base))
        return save_layerdiff(model, out, include_vae_and_text_encoder=True, overwrite=overwrite, dtype=dtype)
    return save_layerdiff(unet, out, include_vae_and_text_encoder=False, overwrite=overwrite, dtype=dtype)


def write_adapter(source: str | Path, out: str | Path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """The adapter of a full LayerDiff file: its layer modules and widened convolutions, nothing of
    the SD UNet, VAE or text encoder (:mod:`layerdiff.io.adapter`). Reads only those tensors."""
    from layerdiff.io.adapter import ADAPTER, KIND_KEY, layerdiff_kind, split_names
    from layerdiff.io.checkpoint import CORE, check_layerdiff_file
    from layerdiff.io.files import read_safetensors, read_safetensors_header, save_safetensors_atomic

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists: pass --overwrite or choose another --out")
    config, _, shapes = check_layerdiff_file(source)
    if layerdiff_kind(source) == ADAPTER:
        raise CheckpointError(f"{source} is already an adapter: copy it, or give a full LayerDiff file")
    unet = {k: tuple(s) for k, (_, s) in shapes.items() if k.startswith("unet.")}
    _, keep = split_names(unet, config)
    names = [k for k in shapes if k in keep or (k.split(".", 1)[0] in CORE and not k.startswith("unet."))]
    tensors, _ = read_safetensors(source, keys=names)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    metadata = dict(read_safetensors_header(source)[1])
    metadata.update({KIND_KEY: ADAPTER, "components": ",".join(CORE)})
    return save_safetensors_atomic(tensors, out, metadata=metadata, overwrite=overwrite)


def _diffusers_config(module, in_out: int | None = None) -> dict:
    """A diffusers model's config as plain JSON (private keys dropped)."""
    cfg = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    if in_out is not None:
        cfg["in_channels"] = cfg["out_channels"] = in_out
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
