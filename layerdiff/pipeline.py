"""The one orchestration: prompts or conditioning + settings -> LayerStack (or latents).

:func:`run` does it in numbered steps (check, resolve the settings, encode, sample, decode) for
every caller: :func:`generate`, the edits (with locks), evaluation and calibration, the nodes and
the command line. METHOD.md sections 1 and 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layerdiff import limits
from layerdiff.conditioning import (
    PROMPTS_EXAMPLE,
    LayerConditioning,
    LayerPrompts,
    check_model,
    check_prompt_sets,
    encode_prompts,
)
from layerdiff.errors import LayerDiffError
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.sampling import Callback, Lock, sample
from layerdiff.settings import SamplerSettings
from layerdiff.stack import LayerStack


def check_size(width: int, height: int, multiple: int = 8) -> None:
    """Whole numbers of pixels, multiples of ``multiple``, within limits.RANGES (8..4096)."""
    limits.check_size(width, height, multiple)


def check_settings(settings) -> SamplerSettings:
    if settings is None:
        return SamplerSettings()
    if not isinstance(settings, SamplerSettings):
        raise LayerDiffError(f"settings {limits.show(settings)} is not a SamplerSettings: give e.g. "
                             "SamplerSettings(steps=20, cfg=5.0), or None for the model's defaults")
    return settings


@torch.no_grad()
def decode_stack(
    model: LayerDiffModel,
    latents: torch.Tensor,
    prompts: tuple[str, ...] = (),
    names: tuple[str, ...] = (),
    global_prompt: str = "",
    seeds: tuple[int | None, ...] = (),
    binarize: bool = True,
) -> LayerStack:
    """Latents (B, L, 8, h, w) -> LayerStack; masks binarised with overlaps resolved front-first."""
    images, masks = model.decode_layers(latents)
    stack = LayerStack(
        images=images.float().cpu(),
        masks=masks.float().cpu(),
        latents=latents.float().cpu(),
        names=tuple(names),
        prompts=tuple(prompts),
        global_prompt=global_prompt,
        seeds=tuple(seeds),
    )
    return stack.binarized() if binarize else stack


def _conditioning(model, source, batch: int) -> LayerConditioning:
    """Encoded prompts for ``batch`` samples: LayerPrompts / a list of them are encoded, a
    LayerConditioning is taken as it is; one prompt set is repeated over the batch."""
    cond = source if isinstance(source, LayerConditioning) else encode_prompts(model, source)  # checks the prompts
    if cond.batch_size == 1 and batch > 1:
        cond = cond.repeat(batch)
    elif cond.batch_size != batch:
        raise LayerDiffError(f"conditioning holds {cond.batch_size} prompt sets but there are {batch} seeds")
    return cond


def run(
    model: LayerDiffModel,
    source: LayerPrompts | Sequence[LayerPrompts] | LayerConditioning,
    settings: SamplerSettings | None = None,
    *,
    seeds: Sequence[int],
    width: int | None = None,
    height: int | None = None,
    lock: Lock | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    callback: Callback | None = None,
    decode: bool = True,
    binarize: bool = True,
) -> LayerStack | torch.Tensor:
    """Generate one composable image per seed from prompts (one set for all, or one per seed) or
    from their conditioning; returns a LayerStack (``decode``) or the latents (B, L, 8, h, w).
    ``settings``: None fields take the model's defaults. ``lock``, ``init_latents`` and
    ``strength`` are the sampler's (editing, restyling). Everything is checked before any work."""
    # 1. check what was given
    check_model(model)
    s = check_settings(settings).resolve(model)
    width = model.config.image_size if width is None else width
    height = model.config.image_size if height is None else height
    check_size(width, height, model.vae_scale_factor)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise LayerDiffError(f"seeds {limits.show(seeds)} is not a list: give one seed per image, e.g. [0, 1]")
    seeds = [limits.check_int(seed, f"seeds[{b}]", "seed") for b, seed in enumerate(seeds)]
    limits.check_float(strength, "strength")
    limits.check_callback(callback)
    layers = source.num_layers if isinstance(source, LayerConditioning) else max(
        len(p.layers) for p in check_prompt_sets(source))
    limits.check_run_size(width, height, layers, len(seeds))
    limits.check_run_memory(model.config, len(seeds), layers, height, width, model.dtype, model.device)
    # 2. encode the prompts
    cond = _conditioning(model, source, len(seeds))
    # 3. sample
    f = model.vae_scale_factor
    reads_masks = s.mask_guidance or s.layout_cleanup or s.empty_layer_retries or s.layout_prior
    latents = sample(
        model.unet, cond, height // f, width // f, seeds, s, scheduler_config=model.config.scheduler,
        mask_axis=model.mask_axis() if reads_masks else None,
        empty_latent=model.empty_layer_latent() if s.layout_cleanup else None,
        lock=lock, init_latents=init_latents, strength=strength, callback=callback,
    )
    if not decode:
        return latents
    # 4. decode layers and masks
    prompts = cond.layer_prompts[0] if cond.layer_prompts else ()
    names = cond.layer_names[0] if cond.layer_names else ()
    glob = cond.global_prompts[0] if cond.global_prompts else ""
    return decode_stack(model, latents, prompts=prompts, names=names, global_prompt=glob,
                        seeds=tuple([seeds[0]] * len(prompts)), binarize=binarize)


def generate(
    model: LayerDiffModel,
    prompts: LayerPrompts | LayerConditioning,
    settings: SamplerSettings | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    seed: int = 0,
    batch: int = 1,
    callback: Callback | None = None,
) -> LayerStack:
    """Generate ``batch`` composable images from one prompt set (or its conditioning); sample b uses
    seed ``seed + b`` (mod 2**64). ``settings``: None fields take the model's defaults
    (``model.config.sampling``). A run that cannot fit the device's memory is refused before sampling."""
    check_model(model)
    if not isinstance(prompts, (LayerPrompts, LayerConditioning)):
        raise LayerDiffError(f"prompts {limits.show(prompts)} is not a LayerPrompts: give e.g. {PROMPTS_EXAMPLE}")
    seed = limits.check_int(seed, "seed")
    batch = limits.check_int(batch, "batch")
    return run(model, prompts, settings, seeds=limits.batch_seeds(seed, batch), width=width, height=height,
               callback=callback)
