"""What a run writes besides its checkpoints: the final one-file model (EMA weights where EMA ran)
and sample grids (and where their prompts come from).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from layerdiff.errors import LayerDiffError
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.training.settings import TrainConfig, check_sample_prompts

logger = logging.getLogger("layerdiff.train")

PROMPTS_FROM_DATA = 4  # sample grid rows taken from the data when train.json names no prompts


def swap_in_ema(ema: dict | None, trained: dict):
    """Context: EMA weights in the live parameters (for sampling and export), then back."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if not ema:
            yield
            return
        saved = {n: p.detach().clone() for n, p in trained.items()}
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(ema[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in trained.items():
                    p.copy_(saved[n])

    return cm()


def export(model: LayerDiffModel, ema, trained, path: Path, dtype=None) -> Path:
    """The final one-file LayerDiff checkpoint (EMA weights where EMA ran)."""
    from layerdiff.io.checkpoint import save_layerdiff

    with swap_in_ema(ema, trained):
        return save_layerdiff(model, path, include_vae_and_text_encoder=True, overwrite=True, dtype=dtype)


def grid_prompts(model: LayerDiffModel, data, config: TrainConfig) -> list:
    """The sample grids' prompts (``LayerPrompts``): ``config.sample_prompts``, checked against the
    model's layer count; without them (and with ``sample_every``), those of the first few samples of
    ``validation_data``, else of ``data``, that have a prompt for the scene and every layer."""
    from layerdiff.conditioning import LayerPrompts

    max_layers = model.config.max_layers
    if config.sample_prompts is not None:
        check_sample_prompts(config.sample_prompts, "sample_prompts", max_layers)
        prompts = []
        for i, p in enumerate(config.sample_prompts):
            try:
                prompts.append(LayerPrompts(p["global"], tuple(p["layers"])))
            except LayerDiffError as exc:
                raise LayerDiffError(f"sample_prompts[{i}]: {exc}") from None
        return prompts
    if not config.sample_every:
        return []
    from layerdiff.data.reader import first_records

    source = config.validation_data if config.validation_data is not None else data
    _, metas, _ = first_records(source, 4 * PROMPTS_FROM_DATA, max_layers)
    prompts = []
    for meta in metas:
        layers = (meta.get("background_prompt", ""), *meta.get("foreground_prompts", []))
        glob = meta.get("global_prompt", "")
        if glob.strip() and all(isinstance(p, str) and p.strip() for p in layers):
            try:
                prompts.append(LayerPrompts(glob, layers))
            except LayerDiffError:  # a text the sampler refuses (e.g. control characters): the next sample
                continue
        if len(prompts) == PROMPTS_FROM_DATA:
            break
    if prompts:
        logger.info("sample grids: the prompts of %d samples of %s (set sample_prompts to choose them)",
                    len(prompts), source)
    else:
        logger.warning("sample_every %d: no sample among the first of %s has a prompt for the scene and every "
                       "layer, so no sample grids: set sample_prompts", config.sample_every, source)
    return prompts


@torch.no_grad()
def sample_grid(model, ema, trained, prompts, path: Path, config: TrainConfig):
    """One sample per prompt (EMA weights where EMA ran), saved as a grid at ``path``; the model
    goes back to training mode."""
    if not prompts:
        return
    from layerdiff.pipeline import generate
    from layerdiff.settings import SamplerSettings

    model.unet.eval()
    model.text_encoder.eval()
    try:
        with swap_in_ema(ema, trained):
            rows = [generate(model, p, SamplerSettings(steps=20, mask_guidance=0.0), seed=i) for i, p in enumerate(prompts)]
    finally:
        model.unet.train()
        model.text_encoder.train(config.lr_text > 0)
    save_grid(rows, path)


def save_grid(stacks: list, path: Path) -> Path:
    """Rows of composite | layers | masks for a list of one-sample stacks, as one PNG."""
    import numpy as np

    from layerdiff.io.writing import atomic_write, png_bytes

    Lmax = max(s.num_layers for s in stacks)
    rows = []
    for s in stacks:
        H, W = s.height, s.width
        tiles = [s.composite()[0]] + [s.images[0, i] for i in range(s.num_layers)]
        tiles += [s.masks[0, k, :, :, None].expand(H, W, 3) for k in range(s.num_foregrounds)]
        blank = torch.full((H, W, 3), 1.0)
        tiles += [blank] * (1 + Lmax + (Lmax - 1) - len(tiles))
        rows.append(torch.cat(tiles, dim=1))
    grid = (torch.cat(rows, dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, png_bytes(np.ascontiguousarray(grid)))
    return path
