"""Widget specs shared by the nodes. Sampling defaults are the built-in model's own settings (a
``SamplerSettings`` read from its file), edit defaults come from layerdiff.edit; the ranges from
layerdiff.limits, the table the library and the command line check too, so VALIDATE_INPUTS refuses
what the library would, with the library's words."""

from __future__ import annotations

from layerdiff import limits
from layerdiff.config import LayerDiffConfig, get_preset
from layerdiff.edit import REGENERATE
from layerdiff.errors import LayerDiffError
from layerdiff.io.checkpoint import DEFAULT_MODEL, model_file, read_layerdiff_header
from layerdiff.pipeline import check_size
from layerdiff.settings import SAMPLERS, SCHEDULERS, SamplerSettings, sampler_choice


def _builtin_sampling() -> SamplerSettings:
    """The built-in model's sampling settings, from its file's header (the toy preset's without it)."""
    try:
        return read_layerdiff_header(model_file(DEFAULT_MODEL)).sampling
    except (LayerDiffError, OSError):
        return get_preset("toy").sampling


SAMPLING = _builtin_sampling()
MAX_LAYERS = limits.LAYERS_MAX  # a model's own limit is checked when it runs
SIZE_MIN, SIZE_MAX, SIZE_STEP = limits.RANGES["width"].low, limits.SIZE_MAX, limits.SIZE_MULTIPLE
# Default size: the built-in default model (layerdiff-toy, a "toy" preset model) is trained at
# this size; SD 1.5 models use LayerDiffConfig.image_size (512).
DEFAULT_SIZE = get_preset("toy").image_size
SD_SIZE = LayerDiffConfig.__dataclass_fields__["image_size"].default
SEED_MAX = limits.SEED_MAX
STEPS_MAX = limits.RANGES["steps"].high


def ranged(key: str, **options) -> dict:
    """Widget options with min/max from limits.RANGES[key]."""
    return {**options, **limits.RANGES[key].widget()}


def seed(tooltip: str = "Random seed; sample b of a batch uses seed + b. Same seed, same result.") -> tuple:
    return ("INT", ranged("seed", default=0, control_after_generate=True, tooltip=tooltip))


def steps(default: int = SAMPLING.steps) -> tuple:
    return ("INT", ranged("steps", default=default, tooltip="Denoising steps. More is slower and usually cleaner."))


def cfg(default: float = SAMPLING.cfg) -> tuple:
    return ("FLOAT", {"default": default, **limits.RANGES["cfg"].widget(), "step": 0.1, "round": 0.01,
                      "tooltip": "Classifier-free guidance scale of the foreground layers over the global and layer "
                                 f"prompts; 1 turns it off. The built-in model's own setting: {SAMPLING.cfg:g}; SD 1.5 "
                                 "models: about 7.5."})


def mask_guidance() -> tuple:
    return ("FLOAT", {"default": SAMPLING.mask_guidance, **limits.RANGES["mask_guidance"].widget(), "step": 0.05,
                      "round": 0.01,
                      "tooltip": "Self-mask guidance scale: sharpens each layer inside its own predicted mask. "
                                 "0 turns it off (faster: one model pass fewer per step)."})


def mask_guidance_start() -> tuple:
    return ("FLOAT", {"default": SAMPLING.mask_guidance_start, **limits.RANGES["mask_guidance_start"].widget(),
                      "step": 0.01,
                      "tooltip": "Fraction of the steps before self-mask guidance switches on (early masks "
                                 "are noise)."})


def background_cfg() -> tuple:
    return ("FLOAT", {"default": 0.0, **limits.RANGES["background_cfg"].widget(), "step": 0.1, "round": 0.01,
                      "tooltip": "Guidance scale of the background layer alone. 0 = the model's own setting (the "
                                 f"built-in model: {SAMPLING.background_cfg or SAMPLING.cfg:g}, picked on validation "
                                 "scenes when it was trained; a model without one: the cfg above)."})


def layout_cleanup() -> tuple:
    return ("FLOAT", {"default": SAMPLING.layout_cleanup, **limits.RANGES["layout_cleanup"].widget(), "step": 0.05,
                      "round": 0.01,
                      "tooltip": "Layout cleanup while sampling: each foreground layer keeps one object and "
                                 "foregrounds stay apart (no overlaps). 1 = full, 0 turns it off (e.g. for a layer "
                                 "that should hold several things)."})


def sampler_name() -> tuple:
    return (list(SAMPLERS), {"default": SAMPLING.sampler, "tooltip": (
        "Sampler (the solver); ddim is the paper's. The combined names of earlier versions (dpmpp_2m_karras, "
        "unipc) still load, here or in the scheduler input.")})


def scheduler() -> tuple:
    return (list(SCHEDULERS), {"default": SAMPLING.scheduler, "tooltip": (
        "Scheduler: the spacing of the noise levels. karras works with euler, dpmpp_2m and uni_pc.")})


def sampler_settings(steps, cfg, sampler_name, scheduler="normal", **more) -> SamplerSettings:
    """The node's widgets as settings; 0 for background_cfg and None for the others: the model's own."""
    if more.get("background_cfg") == 0:
        more["background_cfg"] = None
    sampler, scheduler = sampler_choice(sampler_name, scheduler)  # values of earlier versions' workflows
    return SamplerSettings(steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, **more)


def size(name: str) -> tuple:
    return ("INT", {"default": DEFAULT_SIZE, "min": SIZE_MIN, "max": SIZE_MAX, "step": SIZE_STEP,
                    "tooltip": f"Image {name} in pixels, a multiple of {SIZE_STEP}. The built-in toy model is "
                               f"trained at {DEFAULT_SIZE}, SD 1.5 models at {SD_SIZE}."})


def layer_index(default: int = 1, minimum: int = 0, what: str = "The layer") -> tuple:
    return ("INT", {"default": default, **limits.RANGES["layer_index"].widget(), "min": minimum,
                    "tooltip": f"{what}: 0 is the background, 1, 2, ... the foregrounds back to front."})


def regenerate() -> tuple:
    return (list(REGENERATE), {"default": "image and mask",
                               "tooltip": "What of the layer is regenerated: a new object (image and mask), a new "
                                          "look with the same shape (image only), or a new shape (mask only). The "
                                          "background has no mask and always regenerates its image."})


def edit_prompt() -> tuple:
    return ("STRING", {"multiline": True, "default": "",
                       "tooltip": "What the edited layer should show, e.g. 'a green heart'."})


def optional_prompts() -> dict:
    return {
        "global_prompt": ("STRING", {"multiline": True, "default": "",
                                     "tooltip": "The whole scene after the edit. Empty: the layers' global prompt "
                                                "with the old layer prompt replaced by the new one."}),
        "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": "What to avoid (optional)."}),
    }


# input name -> limits.RANGES key, where they differ
_KEYS = {"batch_size": "batch"}


def validate(**values) -> bool | str:
    """VALIDATE_INPUTS helper: each value (None = a linked input, checked when the node runs) within its
    range of limits.RANGES, with the library's message; width and height also as a pair (multiple of 8,
    and width x height x batch within one run's pixels)."""
    try:
        for name, value in values.items():
            if value is None or name in ("width", "height", "sampler_name", "scheduler"):
                continue
            limits.check_number(value, name, _KEYS.get(name, name))
        if values.get("sampler_name") is not None or values.get("scheduler") is not None:
            sampler, scheduler = sampler_choice(values.get("sampler_name"), values.get("scheduler"))
            SamplerSettings(sampler=sampler, scheduler=scheduler)
        width, height = values.get("width"), values.get("height")
        if width is not None or height is not None:
            check_size(SIZE_MIN if width is None else width, SIZE_MIN if height is None else height, SIZE_STEP)
            if width is not None and height is not None and values.get("batch_size") is not None:
                limits.check_run_size(width, height, 1, values["batch_size"], names=("layers", "batch_size"))
    except LayerDiffError as exc:
        return str(exc)
    return True


def require(answer: bool | str) -> None:
    """A node's run refuses what its VALIDATE_INPUTS refuses (a linked input is not validated before it
    runs), before it asks ComfyUI to free memory for the work."""
    if answer is not True:
        raise LayerDiffError(answer)
