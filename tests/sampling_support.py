"""Shared by the sampler tests: a prompt set and ``sample_with`` (the sampler's settings as keywords)."""

from __future__ import annotations

from dataclasses import fields

from layerdiff.conditioning import LayerPrompts
from layerdiff.sampling import sample
from layerdiff.settings import SamplerSettings

PROMPTS = LayerPrompts("a red star in front of a brick wall", ("a brick wall", "a red star", "a blue circle"))
SETTING_NAMES = {f.name for f in fields(SamplerSettings)}


def sample_with(model, cond, **kw):
    """``sample`` on 8x8 latents, 3 steps unless given; keywords naming a SamplerSettings field go into
    the settings (the rest of them: settings.PLAIN), ``scheduler`` may be an earlier combined name."""
    kw.setdefault("steps", 3)
    seeds = kw.pop("seeds", list(range(cond.batch_size)))
    kw.setdefault("mask_axis", model.mask_axis())
    if kw.get("scheduler") not in (None, "normal", "karras"):
        kw["sampler"] = kw.pop("scheduler")
    settings = SamplerSettings(**{k: kw.pop(k) for k in list(kw) if k in SETTING_NAMES})
    return sample(model.unet, cond, 8, 8, seeds, settings, scheduler_config=model.config.scheduler, **kw)
