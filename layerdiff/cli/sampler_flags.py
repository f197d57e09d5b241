"""The sampler's flags, shared by the commands that sample, and the settings they give."""

from __future__ import annotations

from layerdiff.settings import LEGACY_SAMPLERS, SAMPLERS, SCHEDULERS, SamplerSettings, sampler_choice

# flag -> help; every default is the model's own (SamplerSettings.resolve)
HELP = {
    "steps": "denoising steps (default: the model's)",
    "cfg": "classifier-free guidance scale of the foreground layers (default: the model's)",
    "background_cfg": "guidance scale of the background layer (default: the model's, else --cfg)",
    "mask_guidance": "self-mask guidance scale; 0 disables it (default: the model's)",
    "mask_guidance_start": "fraction of steps before self-mask guidance starts (default: the model's)",
    "layout_cleanup": "0..1: keep one object per foreground layer and keep foregrounds apart; 0 disables it "
                      "(default: the model's)",
    "layout_cleanup_start": "fraction of steps before layout cleanup switches on (default: the model's)",
    "empty_layer_retries": "times a foreground still empty early in sampling gets new noise; 0 disables it "
                           "(default: the model's)",
    "layout_prior": "strength of the layer prompts' layout (\"on the left\", ...) in the starting noise, for "
                    "models with a layout prior; 0 disables it (default: the model's)",
}
TYPES = {"steps": int, "empty_layer_retries": int}


def add(parser, names=tuple(HELP), help_overrides: dict | None = None) -> None:
    """Add ``--steps``, ``--cfg``, ... (the ``names`` given) and ``--sampler`` / ``--scheduler``."""
    texts = {**HELP, **(help_overrides or {})}
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), type=TYPES.get(name, float), default=None, help=texts[name])
    parser.add_argument("--sampler", default=None, choices=SAMPLERS + tuple(LEGACY_SAMPLERS), metavar="{" + ",".join(SAMPLERS) + "}",
                        help="sampler (default: the model's)")
    parser.add_argument("--scheduler", default=None, choices=SCHEDULERS + SAMPLERS + tuple(LEGACY_SAMPLERS),
                        metavar="{" + ",".join(SCHEDULERS) + "}",
                        help="noise schedule: normal, or karras (euler, dpmpp_2m, uni_pc) (default: the model's); a "
                             "sampler name here, as earlier versions took it, sets --sampler")


def settings(args, **fixed) -> SamplerSettings:
    """SamplerSettings from the parsed flags (None: the model's), ``fixed`` on top."""
    values = {name: getattr(args, name) for name in HELP if hasattr(args, name)}
    sampler, scheduler = sampler_choice(args.sampler, args.scheduler)  # --scheduler dpmpp_2m_karras: a sampler
    return SamplerSettings(sampler=sampler, scheduler=scheduler, **{**values, **fixed})
