"""Sampler settings: the one object that carries every sampling knob.

:class:`SamplerSettings` is frozen; a field left ``None`` means "the model's default", and
:meth:`SamplerSettings.resolve` fills those from a model's ``config.sampling`` (itself a resolved
:class:`SamplerSettings`) or, without a model, from :data:`DEFAULTS`. The library
(:func:`layerdiff.pipeline.run`, the edits), every node, the command line and ``meta.json`` use it;
its field names are the table keys of :data:`layerdiff.limits.RANGES`.

Sampler and scheduler are separate choices, as in ComfyUI: ``sampler`` is the solver
(:data:`SAMPLERS`), ``scheduler`` the spacing of its noise levels (:data:`SCHEDULERS`). The combined
names of earlier versions ("dpmpp_2m_karras", "unipc") are still read: :func:`split_sampler`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from layerdiff import limits
from layerdiff.errors import LayerDiffError

SAMPLERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "uni_pc")  # ComfyUI's names
SCHEDULERS = ("normal", "karras")
# earlier combined sampler names -> (sampler, scheduler)
LEGACY_SAMPLERS = {"unipc": ("uni_pc", "normal"), "dpmpp_2m_karras": ("dpmpp_2m", "karras")}
KARRAS_SAMPLERS = ("euler", "dpmpp_2m", "uni_pc")  # the diffusers schedulers with Karras sigmas


def split_sampler(name: str, scheduler: str | None = None) -> tuple[str, str | None]:
    """(sampler, scheduler) from a sampler name, reading the combined names of earlier versions:
    "dpmpp_2m_karras" -> ("dpmpp_2m", "karras"). An explicit ``scheduler`` other than None wins
    over the one a combined name implies, except that "normal" never undoes "_karras" (old
    workflows carry "normal" as the default of the scheduler widget they did not have)."""
    if name in LEGACY_SAMPLERS:
        sampler, implied = LEGACY_SAMPLERS[name]
        return sampler, implied if scheduler in (None, "normal") else scheduler
    return name, scheduler


def sampler_choice(sampler: str | None, scheduler: str | None) -> tuple[str | None, str | None]:
    """(sampler, scheduler) from a sampler and a scheduler input that may hold earlier versions'
    values: a sampler name in ``scheduler`` (their one combined input) is the sampler, and a combined
    name anywhere is split. Unknown values pass through, for the settings' check to name them."""
    if isinstance(scheduler, str) and scheduler not in SCHEDULERS and scheduler in SAMPLERS + tuple(LEGACY_SAMPLERS):
        sampler, scheduler = split_sampler(scheduler)
        return sampler, scheduler or "normal"
    if isinstance(sampler, str):
        return split_sampler(sampler, scheduler)
    return sampler, scheduler


def _check_choice(value, name: str, choices: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    if not isinstance(value, str) or value not in choices + extra:
        raise LayerDiffError(f"{name} {limits.show(value)} is unknown: choose one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class SamplerSettings:
    """Every sampling knob; None: the model's default (:meth:`resolve`).

    steps, cfg (the foregrounds' classifier-free guidance scale), background_cfg (the background
    layer's; None after resolving: the same as cfg), sampler and scheduler, self-mask guidance
    (scale, start as a fraction of the steps, blur sigma and erosion in latent pixels), layout
    cleanup (strength 0..1 and start), empty-layer retries (count, and when the check runs), eta
    (DDIM noise), and the layout prior's strength in the starting noise (models with a layout prior).
    """

    steps: int | None = None
    cfg: float | None = None
    background_cfg: float | None = None
    sampler: str | None = None
    scheduler: str | None = None
    mask_guidance: float | None = None
    mask_guidance_start: float | None = None
    mask_guidance_blur: float | None = None
    mask_guidance_erode: int | None = None
    layout_cleanup: float | None = None
    layout_cleanup_start: float | None = None
    empty_layer_retries: int | None = None
    empty_layer_check: float | None = None
    eta: float | None = None
    layout_prior: float | None = None

    def __post_init__(self):
        for f in fields(self):  # numbers become plain int / float, checked against limits.RANGES
            if f.name not in ("sampler", "scheduler"):
                object.__setattr__(self, f.name, limits.check_number(getattr(self, f.name), f.name, optional=True))
        if self.sampler is not None:
            _check_choice(self.sampler, "sampler", SAMPLERS, tuple(LEGACY_SAMPLERS))
        if self.scheduler is not None:
            _check_choice(self.scheduler, "scheduler", SCHEDULERS)
        if self.sampler in LEGACY_SAMPLERS:
            sampler, scheduler = split_sampler(self.sampler, self.scheduler)
            object.__setattr__(self, "sampler", sampler)
            object.__setattr__(self, "scheduler", scheduler)
        if self.scheduler == "karras" and self.sampler is not None and self.sampler not in KARRAS_SAMPLERS:
            raise LayerDiffError(f"sampler {self.sampler!r} has no karras schedule: use scheduler 'normal', or one of "
                                 f"{', '.join(KARRAS_SAMPLERS)}")

    def replace(self, **changes) -> SamplerSettings:
        return dataclasses.replace(self, **changes)

    def over(self, defaults: SamplerSettings) -> SamplerSettings:
        """These settings, each None taken from ``defaults``."""
        mine = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return defaults.replace(**mine)

    def resolve(self, model=None) -> SamplerSettings:
        """Every None filled: from ``model.config.sampling`` (a model bundle or a config), then from
        :data:`DEFAULTS`. background_cfg may stay None (the same as cfg)."""
        config = getattr(model, "config", model)
        defaults = getattr(config, "sampling", None) if config is not None else None
        if defaults is not None and not isinstance(defaults, SamplerSettings):
            defaults = SamplerSettings.from_dict(dataclasses.asdict(defaults))
        base = DEFAULTS if defaults is None else defaults.over(DEFAULTS)
        out = self.over(base)
        if out.scheduler == "karras" and out.sampler not in KARRAS_SAMPLERS:
            raise LayerDiffError(f"sampler {out.sampler!r} has no karras schedule: use scheduler 'normal', or one of "
                                 f"{', '.join(KARRAS_SAMPLERS)}")
        return out

    @property
    def resolved(self) -> bool:
        return all(getattr(self, f.name) is not None for f in fields(self) if f.name != "background_cfg")

    def to_dict(self) -> dict[str, Any]:
        """JSON values by field name (meta.json, a model file's sampling defaults)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplerSettings:
        """From :meth:`to_dict`'s form, also reading the keys of earlier versions: "scheduler" holding a
        sampler name, "mask_guidance_blur_sigma"."""
        data = dict(data)
        if "mask_guidance_blur_sigma" in data:
            data.setdefault("mask_guidance_blur", data.pop("mask_guidance_blur_sigma"))
        scheduler = data.get("scheduler")
        if "sampler" not in data and scheduler is not None and scheduler not in SCHEDULERS:
            data["sampler"], data["scheduler"] = split_sampler(scheduler)
            if data["scheduler"] is None:
                data["scheduler"] = "normal"
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise LayerDiffError(f"unknown sampler setting(s) {', '.join(unknown)}: the settings are "
                                 f"{', '.join(f.name for f in fields(cls))}")
        return cls(**data)


# The library's defaults, under every model's own (LayerDiffConfig.sampling).
DEFAULTS = SamplerSettings(
    steps=25,
    cfg=7.5,
    background_cfg=None,  # the same as cfg
    sampler="ddim",  # the paper's sampler
    scheduler="normal",
    mask_guidance=0.75,
    mask_guidance_start=0.25,
    mask_guidance_blur=1.0,
    # self-mask guidance degrades each mask's interior, the mask eroded by this many latent pixels
    # (0: the whole mask, METHOD.md's form); a property of a trained model, set in its file
    mask_guidance_erode=0,
    layout_cleanup=1.0,
    layout_cleanup_start=0.1,
    # a foreground still empty after this fraction of the steps gets new starting noise, and
    # sampling starts again, at most this many times (0 off)
    empty_layer_retries=2,
    empty_layer_check=0.2,
    eta=0.0,
    # where each foreground's prompt puts its object, added to the starting noise (a model with a
    # layout prior; 0 off). A property of a trained model, set in its file.
    layout_prior=0.0,
)

# Plain classifier-free guidance: DEFAULTS with self-mask guidance, layout cleanup, retries and the
# layout prior off.
PLAIN = DEFAULTS.replace(mask_guidance=0.0, layout_cleanup=0.0, empty_layer_retries=0, layout_prior=0.0)
