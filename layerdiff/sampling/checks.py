"""The sampler's argument checks: every bad argument is refused, by name, before any work."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch

from layerdiff import limits
from layerdiff.conditioning import LayerConditioning
from layerdiff.config import LAYER_CHANNELS
from layerdiff.errors import LayerDiffError
from layerdiff.sampling.locks import Lock
from layerdiff.settings import PLAIN, SamplerSettings


def check_sample_args(unet, cond, height, width, seeds, settings, scheduler_config, mask_axis, empty_latent, lock,
                      init_latents, strength, callback, max_batch) -> tuple[list[int], SamplerSettings]:
    """Checked seeds, and the settings with every None taken from :data:`layerdiff.settings.PLAIN`."""
    if not isinstance(cond, LayerConditioning):
        raise LayerDiffError(f"cond {limits.show(cond)} is not a LayerConditioning: give the output of "
                             "layerdiff.conditioning.encode_prompts")
    B, L = cond.batch_size, cond.num_layers
    for name, value in (("height", height), ("width", width)):  # latent sizes
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= limits.SIZE_MAX:
            raise LayerDiffError(f"{name} {limits.show(value)} must be a whole number of latent pixels in "
                                 f"1..{limits.SIZE_MAX} (the image size divided by the VAE's factor)")
    if isinstance(seeds, (str, bytes, dict)) or not isinstance(seeds, Iterable) or not hasattr(seeds, "__len__"):
        raise LayerDiffError(f"seeds {limits.show(seeds)} is not a list: give one seed per sample, e.g. [0, 1]")
    if len(seeds) != B:
        raise LayerDiffError(f"got {len(seeds)} seeds for a batch of {B}: give one seed per sample")
    seeds = [limits.check_int(s, f"seeds[{b}]", "seed") for b, s in enumerate(seeds)]
    if settings is not None and not isinstance(settings, SamplerSettings):
        raise LayerDiffError(f"settings {limits.show(settings)} is not a SamplerSettings: give "
                             "layerdiff.settings.SamplerSettings(...), or None")
    s = (settings or SamplerSettings()).over(PLAIN)
    limits.check_float(strength, "strength")
    limits.check_int(max_batch, "max_batch", optional=True)
    if scheduler_config is not None and not isinstance(scheduler_config, dict):
        raise LayerDiffError(f"scheduler_config {limits.show(scheduler_config)} is not a dict: give the model's "
                             "config.scheduler, or None")
    limits.check_callback(callback)
    if lock is not None and not isinstance(lock, Lock):
        raise LayerDiffError(f"lock {limits.show(lock)} is not a Lock: give Lock(latents, mask), or None")
    if init_latents is not None and not isinstance(init_latents, torch.Tensor):
        raise LayerDiffError(f"init_latents {limits.show(init_latents)} is not a tensor (B, L, 8, h, w), or None")
    config = getattr(unet, "config", None)
    if hasattr(config, "unet") and hasattr(unet, "device"):
        limits.check_memory(limits.sampling_bytes(config, B, L, height, width, unet.dtype), unet.device,
                            f"sampling {L} layers x {B} image(s) at latent size {width}x{height}")
    if s.mask_guidance and mask_axis is None:
        raise LayerDiffError("self-mask guidance needs mask_axis (the model bundle's mask_axis())")
    if s.layout_prior and mask_axis is None:
        raise LayerDiffError("the layout prior needs mask_axis (the model bundle's mask_axis())")
    if s.empty_layer_retries and mask_axis is None:
        raise LayerDiffError("redrawing empty foregrounds needs mask_axis (the model bundle's mask_axis())")
    if s.layout_cleanup and (mask_axis is None or empty_latent is None):
        raise LayerDiffError("layout cleanup needs mask_axis and empty_latent (the model bundle's mask_axis() and "
                             "empty_layer_latent())")
    shape = (B, L, LAYER_CHANNELS, height, width)
    for name, t in (("lock.latents", lock.latents if lock else None), ("init_latents", init_latents)):
        if t is not None and tuple(t.shape) != shape:
            raise LayerDiffError(f"{name} has shape {tuple(t.shape)}: expected {shape} for this batch")
    return seeds, s
