"""What a run writes besides its checkpoints: the final one-file model (EMA weights where EMA ran)
and sample grids.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layerdiff.model.bundle import LayerDiffModel
from layerdiff.training.settings import TrainConfig


def _swap_in(ema: dict | None, trained: dict):
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

    with _swap_in(ema, trained):
        return save_layerdiff(model, path, include_vae_and_text_encoder=True, overwrite=True, dtype=dtype)


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
        with _swap_in(ema, trained):
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
