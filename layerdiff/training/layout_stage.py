"""The layout stage: a trained model's layout prior taught where each layer prompt puts its object.

The layout prior (:class:`layerdiff.model.enhancer.LayoutPrior`) reads only the layer prompts'
input word embeddings and nothing in the UNet reads it, so it can be trained after the UNet, on
the same cached latents, without touching any other weight: the binary cross-entropy of each
foreground's map against its mask read off the clean latent (the training loss's ``layout_weight``
term). Position words are rare (about one object in ten has one), so it needs a high learning
rate; it is cheap (no UNet runs). The toy recipe runs it between LayerDiff training and calibration.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.train")

LAYOUT_STAGE = {"steps": 1500, "batch_size": 32, "lr": 1e-2}
_KEYS = {"steps": (0, 1_000_000), "batch_size": (1, 4096), "lr": (0.0, 1.0)}


def layout_settings(value: dict) -> dict:
    """The recipe's ``"layout"`` setting, checked before any work: {"steps" (0 skips it), "batch_size", "lr"}."""
    if not isinstance(value, dict):
        raise LayerDiffError(f"the recipe's \"layout\" setting is {value!r:.40}, not an object of settings "
                             '(e.g. {"steps": 1500, "batch_size": 32, "lr": 0.01})')
    unknown = sorted(set(value) - set(_KEYS), key=str)
    if unknown:
        raise LayerDiffError(f"the recipe's \"layout\" setting has unknown key(s) {unknown}: use "
                             '"steps" (0 skips the stage), "batch_size" and "lr"')
    out = {**LAYOUT_STAGE, **value}
    for key, (lo, hi) in _KEYS.items():
        v = out[key]
        whole = key != "lr"
        ok = (type(v) is int if whole else type(v) in (int, float) and math.isfinite(v)) and lo <= v <= hi
        if not ok or (key == "lr" and v <= 0):
            raise LayerDiffError(f"the recipe's layout {key} {v!r:.40} is out of range: use "
                                 + (f"a whole number from {lo} to {hi}" if whole else "a learning rate above 0, at most 1"))
    out["lr"] = float(out["lr"])
    return out


def layout_parameters(model) -> list[torch.nn.Parameter]:
    prior = getattr(model.unet.prompt_enhancer, "layout", None)
    if prior is None:
        raise LayerDiffError("the layout stage needs a model with a layout prior: its config has layout_prior 0 "
                             "(set layout_prior, e.g. 16, in the model config)")
    return list(prior.parameters())


def train_layout_prior(model, cache, settings: dict, seed: int, log_every: int = 250) -> list[float]:
    """Train ``model``'s layout prior in place on a :class:`~layerdiff.training.latents.LatentCache`
    (draws weighted towards more layers, as training's); every other weight is left as it was.
    Deterministic for a seed. Returns the loss every ``log_every`` steps (and the last)."""
    from layerdiff.model.text import tokenize
    from layerdiff.training.objective import LayerDiffTrainModule

    params = layout_parameters(model)
    steps, batch_size, lr = settings["steps"], settings["batch_size"], settings["lr"]
    module = LayerDiffTrainModule(model, layout_weight=1.0)
    frozen = {p: p.requires_grad for p in module.parameters()}
    module.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    gen = torch.Generator().manual_seed(int(seed))
    n = model.config.layer_prompt_tokens or None
    losses = []
    try:
        for step in range(steps):
            latents, valid, _, layer_prompts = cache.batch(gen, batch_size, {2: 1.0, 3: 1.5, 4: 2.0}, bucket=True)
            B, L = valid.shape
            flat = [p for row in layer_prompts for p in list(row) + [""] * (L - len(row))]
            ids = tokenize(model.tokenizer, flat)[:, :n].to(model.device).unflatten(0, (B, L))
            loss = module.layout_loss(module.layer_words(ids), latents.to(model.device), valid.to(model.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % log_every == 0 or step == steps - 1:
                losses.append(round(loss.item(), 5))
                logger.info("layout step %d/%d: loss %.4f", step + 1, steps, losses[-1])
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses


def layout_stage(model, data, cache_path: Path, size: int, file: Path, settings: dict, seed: int) -> None:
    """One layout stage of the recipe: load its finished weights from ``file``, or train them (on the
    latent cache at ``cache_path``, built from ``data`` at ``size`` if missing) and save them there
    (atomically); ``model``'s layout prior ends up trained either way."""
    from layerdiff.io.files import read_safetensors, save_safetensors_atomic
    from layerdiff.training.latents import LatentCache

    prior = model.unet.prompt_enhancer.layout
    if file.is_file():
        tensors, _ = read_safetensors(file)
        try:
            prior.load_state_dict(tensors)
        except RuntimeError:
            raise LayerDiffError(f"{file} does not hold this model's layout prior (another rank or an older run): "
                                 "delete it to train the layout stage again") from None
        logger.warning("layout stage: loaded %s", file)
        return
    cache = LatentCache.build(model, data, size, cache_path, model.config.max_layers)  # loads an existing one
    train_layout_prior(model, cache, settings, seed)
    save_safetensors_atomic({k: v.detach().float().contiguous() for k, v in prior.state_dict().items()}, file,
                            {"format": "layerdiff-layout-prior"}, overwrite=True)
