"""Widget specs shared by the nodes. Defaults come from layerdiff.config / layerdiff.edit; the
ranges are UI limits (the library checks what it can run)."""

from __future__ import annotations

from layerdiff.config import LayerDiffConfig, SamplingDefaults, get_preset
from layerdiff.edit import REGENERATE
from layerdiff.pipeline import check_size
from layerdiff.sampling import SCHEDULERS

SAMPLING = SamplingDefaults()
MAX_LAYERS = 64  # LayerDiffConfig.max_layers limit; a model's own limit is checked when it runs
SIZE_MIN, SIZE_MAX, SIZE_STEP = 64, 4096, 8
# Default size: the built-in default model (layerdiff-toy, a "toy" preset model) is trained at
# this size; SD 1.5 models use LayerDiffConfig.image_size (512).
DEFAULT_SIZE = get_preset("toy").image_size
# ... and draws its best masks at this foreground guidance (the Layered KSampler's default; the edit
# nodes keep SamplingDefaults' 7.5, unmeasured at 3)
BUILTIN_CFG = get_preset("toy").sampling.cfg
SD_SIZE = LayerDiffConfig.__dataclass_fields__["image_size"].default
SEED_MAX = 0xFFFFFFFFFFFFFFFF
# DDIM with SD's schedule (steps_offset 1) indexes past the 1000 training timesteps at 1000 steps
STEPS_MAX = 500


def seed(tooltip: str = "Random seed; sample b of a batch uses seed + b. Same seed, same result.") -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True, "tooltip": tooltip})


def steps(default: int = SAMPLING.steps) -> tuple:
    return ("INT", {"default": default, "min": 1, "max": STEPS_MAX,
                    "tooltip": "Denoising steps. More is slower and usually cleaner."})


def cfg(default: float = SAMPLING.cfg) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                      "tooltip": "Classifier-free guidance scale over the global and layer prompts; 1 turns it off. The "
                                 f"built-in model draws its best masks at {BUILTIN_CFG:g} (its calibrated setting); "
                                 "SD 1.5 models: about 7.5."})


def mask_guidance() -> tuple:
    return ("FLOAT", {"default": SAMPLING.mask_guidance, "min": 0.0, "max": 5.0, "step": 0.05, "round": 0.01,
                      "tooltip": "Self-mask guidance scale: sharpens each layer inside its own predicted mask. "
                                 "0 turns it off (faster: one model pass fewer per step)."})


def mask_guidance_start() -> tuple:
    return ("FLOAT", {"default": SAMPLING.mask_guidance_start, "min": 0.0, "max": 1.0, "step": 0.01,
                      "tooltip": "Fraction of the steps before self-mask guidance switches on (early masks "
                                 "are noise)."})


def background_cfg() -> tuple:
    return ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                      "tooltip": "Guidance scale of the background layer alone. 0 = the model's own setting (the "
                                 "built-in model: 7.5, picked on validation scenes when it was trained; a "
                                 "model without one: the cfg above)."})


def layout_cleanup() -> tuple:
    return ("FLOAT", {"default": SAMPLING.layout_cleanup, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.01,
                      "tooltip": "Layout cleanup while sampling: each foreground layer keeps one object and "
                                 "foregrounds stay apart (no overlaps). 1 = full, 0 turns it off (e.g. for a layer "
                                 "that should hold several things)."})


def scheduler() -> tuple:
    return (list(SCHEDULERS), {"default": SAMPLING.scheduler,
                               "tooltip": "Sampler/scheduler. ddim is the paper's sampler."})


def size(name: str) -> tuple:
    return ("INT", {"default": DEFAULT_SIZE, "min": SIZE_MIN, "max": SIZE_MAX, "step": SIZE_STEP,
                    "tooltip": f"Image {name} in pixels, a multiple of {SIZE_STEP}. The built-in toy model is "
                               f"trained at {DEFAULT_SIZE}, SD 1.5 models at {SD_SIZE}."})


def layer_index(default: int = 1, minimum: int = 0, what: str = "The layer") -> tuple:
    return ("INT", {"default": default, "min": minimum, "max": MAX_LAYERS - 1,
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


def validate_size(width, height) -> bool | str:
    """VALIDATE_INPUTS helper: range and multiple of 8 (None = a linked input, checked at run)."""
    for name, v in (("width", width), ("height", height)):
        if v is not None and not SIZE_MIN <= int(v) <= SIZE_MAX:
            return f"{name} {v} is outside {SIZE_MIN}..{SIZE_MAX}: use a size in that range"
    try:
        check_size(int(width or SIZE_MIN), int(height or SIZE_MIN), SIZE_STEP)
    except ValueError as exc:
        return str(exc)
    return True


def validate_strength(value, name: str = "strength") -> bool | str:
    if value is not None and not 0.0 <= float(value) <= 1.0:
        return f"{name} {value} is outside 0..1: 0 keeps the layers unchanged, 1 regenerates them from noise"
    return True

