"""Presets and configuration: the one source of truth for model sizes and sampling defaults.

A :class:`LayerDiffConfig` describes a whole LayerDiff model: the base UNet (a diffusers
``UNet2DConditionModel`` config with 4 latent channels; the LayerDiff builder widens it to 8), the
VAE, the text encoder and tokenizer, the scheduler, and the layer modules. It is stored as JSON in
every LayerDiff checkpoint's metadata, so a checkpoint file describes itself.

Presets:

- ``sd15``: the real Stable Diffusion 1.5 configuration (UNet, VAE, CLIP ViT-L/14 text encoder,
  scheduler), read from small JSON files shipped in ``layerdiff/presets/sd15``.
- ``toy``: a small model for the procedural toy world, trainable on a 2-core CPU.
- ``tiny``: random weights for tests; a full forward pass takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from layerdiff.errors import LayerDiffError

CONFIG_VERSION = 1

# Scheduler shared by all presets: SD 1.5's training schedule (scaled-linear betas, epsilon).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# Words of the toy world's prompts (layerdiff.data.toy) plus a few style words; the toy and tiny
# presets tokenize by whole words, unknown words map to "[UNK]".
TOY_WORDS = (
    "a an and the in of on at with front behind left right top bottom centre center middle "
    "small large big tiny "
    "circle square triangle star heart cross "
    "red orange yellow green blue purple white black "
    "sky meadow beach wall floor field night sandy brick wooden snowy checkered grass sand snow "
    "style painting watercolor watercolour pixel art cartoon sketch neon pastel dark bright "
    "vivid muted flat glossy photo ,"
).split()
# Words of TOY_WORDS that no toy-world prompt uses: the tokenizer gives them ids, but a model trained on
# the toy world never saw them, so they steer nothing (a test checks this against the toy generator).
TOY_UNTRAINED_WORDS = frozenset(
    "an with behind center middle big tiny grass sand snow style painting watercolor watercolour pixel art "
    "cartoon sketch neon pastel dark bright vivid muted flat glossy photo".split()
)


def trained_words(config: LayerDiffConfig) -> frozenset[str] | None:
    """The words a word-level model was trained on (lower case), or None when every token carries meaning
    (CLIP BPE). A words tokenizer may list them as ``"trained_words"``; without that list it is the toy
    world's tokenizer, trained on TOY_WORDS less TOY_UNTRAINED_WORDS."""
    tok = config.tokenizer or {}
    if tok.get("type") != "words":
        return None
    if "trained_words" in tok:
        return frozenset(str(w).lower() for w in tok["trained_words"])
    return frozenset(w.lower() for w in tok.get("words", ())) - TOY_UNTRAINED_WORDS


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults for the sampler and the nodes' widgets (ranges live next to them)."""

    steps: int = 25
    cfg: float = 7.5
    background_cfg: float | None = None  # the background layer's guidance scale; None: the same as cfg
    mask_guidance: float = 0.75  # self-mask guidance scale s; 0 disables it
    mask_guidance_start: float = 0.25  # fraction of steps before SMG switches on
    mask_guidance_blur_sigma: float = 1.0  # Gaussian blur of x0 inside the predicted masks (latent px)
    # SMG degrades each mask's interior, the mask eroded by this many latent pixels (0: the whole
    # mask, METHOD.md's form). A property of the trained model and its guidance: guiding the outline
    # too grew the object in the layer image past its mask (the recipe's models: mask IoU -0.011; the
    # shipped toy model at foreground guidance 3: -0.005), while at guidance 7.5 the shipped model's
    # 4-layer shapes needed the whole mask; its file now carries 1 (README, Training)
    mask_guidance_erode: int = 0
    layout_cleanup: float = 1.0  # one object per foreground, no overlapping foregrounds (0..1; 0 off)
    layout_cleanup_start: float = 0.1  # fraction of steps before layout cleanup switches on
    # A foreground still empty after this fraction of the steps (no latent pixel of its predicted
    # mask above 0.5) gets new starting noise, and sampling starts again, at most this many times
    # (0 off): the prompt asked for that object. The built-in model left 1.7% of its 4-layer
    # foregrounds empty without it (README, Training)
    empty_layer_retries: int = 2
    empty_layer_check: float = 0.2
    scheduler: str = "ddim"
    eta: float = 0.0


@dataclass(frozen=True)
class LayerDiffConfig:
    """Everything needed to build a LayerDiff model (weights come from a checkpoint)."""

    name: str
    unet: dict[str, Any]  # diffusers UNet2DConditionModel config of the *base* (4-channel) UNet
    vae: dict[str, Any]  # diffusers AutoencoderKL config
    text_encoder: dict[str, Any]  # transformers CLIPTextConfig kwargs
    tokenizer: dict[str, Any]  # {"type": "clip_bpe"} or {"type": "words", "words": [...], "max_length": n}
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULER))
    max_layers: int = 4  # background + 3 foregrounds
    layer_head_dim: int = 64  # head width of inter-layer attention
    # Cost of the layer modules (issue 3, METHOD.md section 2). The defaults are the paper's full
    # layout, which files written before these fields existed use; the presets choose the cheaper one.
    inter_layer_width: float = 1.0  # inner width of inter-layer attention, a fraction of the block's
    intra_layer_mode: str = "separate"  # "separate" own q/out projections, or "shared" with SD's cross-attention
    # Layer prompts are short phrases: keep only their first N token states (0 = all of them). The
    # text encoder is causal, so this equals encoding them at length N; it makes intra-layer
    # attention and the prompt enhancer cheaper.
    layer_prompt_tokens: int = 0
    enhancer_blocks: int = 2
    enhancer_head_dim: int = 64
    image_size: int = 512  # default generation size (pixels)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    description: str = ""

    def __post_init__(self):
        if not 1 <= int(self.max_layers) <= 64:
            raise LayerDiffError(f"max_layers {self.max_layers} is out of range: use 1..64 (default 4)")
        if not 0 < float(self.inter_layer_width) <= 1:
            raise LayerDiffError(f"inter_layer_width {self.inter_layer_width} is out of range: use a fraction in (0, 1]")
        if int(self.layer_prompt_tokens) < 0 or 0 < int(self.layer_prompt_tokens) < 2:
            raise LayerDiffError(f"layer_prompt_tokens {self.layer_prompt_tokens} is out of range: use 0 (all) or 2 or more")
        if self.intra_layer_mode not in ("separate", "shared"):
            raise LayerDiffError(f"intra_layer_mode {self.intra_layer_mode!r} is not known: use 'separate' or 'shared'")
        if self.unet.get("in_channels", 4) != 4 or self.unet.get("out_channels", 4) != 4:
            raise LayerDiffError(
                "config.unet describes the base UNet and must have in_channels = out_channels = 4, got "
                f"{self.unet.get('in_channels')}/{self.unet.get('out_channels')}: LayerDiff widens it to 8 itself"
            )

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [0] * 4)) - 1)

    def replace(self, **changes) -> LayerDiffConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config_version"] = CONFIG_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerDiffConfig:
        """A config from JSON data, checked against :func:`check_config_dict` before anything uses it."""
        check_config_dict(data)
        data = dict(data)
        data.pop("config_version", None)
        if isinstance(data.get("sampling"), dict):
            data["sampling"] = SamplingDefaults(**data["sampling"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> LayerDiffConfig:
        if not isinstance(text, str) or len(text) > MAX_CONFIG_CHARS:
            size = f"{len(text):,} characters" if isinstance(text, str) else f"a {type(text).__name__}"
            raise LayerDiffError(f"LayerDiff config is {size}: a config is JSON text of at most {MAX_CONFIG_CHARS:,}")
        try:
            data = parse_json(text, max_depth=CONFIG_MAX_DEPTH)
        except ValueError as exc:
            raise LayerDiffError(f"LayerDiff config is not valid JSON ({_one_line(exc)})") from None
        return cls.from_dict(data)


def _words_tokenizer(max_length: int) -> dict[str, Any]:
    return {"type": "words", "words": list(TOY_WORDS), "max_length": max_length}


def _tiny() -> LayerDiffConfig:
    words = _words_tokenizer(16)
    return LayerDiffConfig(
        name="tiny",
        unet={
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 8, 8, 8],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 4,
            "sample_size": 64,
            "scaling_factor": 1.0,
        },
        text_encoder={
            "vocab_size": len(words["words"]) + 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "hidden_act": "quick_gelu",
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        tokenizer=words,
        layer_head_dim=16,
        inter_layer_width=0.5,
        intra_layer_mode="shared",
        layer_prompt_tokens=8,
        enhancer_head_dim=16,
        image_size=64,
        sampling=SamplingDefaults(steps=4),
        description="random-weight test model (64x64 images, 8x8 latents)",
    )


def _toy() -> LayerDiffConfig:
    words = _words_tokenizer(32)  # the longest toy prompt has 29 words and commas
    return LayerDiffConfig(
        name="toy",
        # Attention (self, text, inter-layer) only at 8x8: at 16x16 it doubled the step time and, at
        # equal steps, gave worse colours, masks and backgrounds (measured, README "Training").
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [48, 96, 96],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 128,
            "attention_head_dim": 4,
            "norm_num_groups": 16,
        },
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [16, 32, 32, 64],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 128,
            "scaling_factor": 1.0,
            # no self-attention in the mid block: the VAE trains on crops and runs on whole images
            "mid_block_add_attention": False,
        },
        text_encoder={
            "vocab_size": len(words["words"]) + 4,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "hidden_act": "quick_gelu",
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        tokenizer=words,
        layer_head_dim=32,
        inter_layer_width=0.5,
        intra_layer_mode="shared",
        layer_prompt_tokens=16,  # the longest toy layer prompt is 7 words (9 tokens)
        enhancer_head_dim=32,
        image_size=128,
        # foreground guidance 3: what `calibrate` picked for the built-in model (mask IoU 0.900 against
        # 0.863 at 7.5; the recipe calibrates each model it trains; README, Training)
        sampling=SamplingDefaults(steps=20, cfg=3.0, background_cfg=20.0, mask_guidance_erode=1),
        description="toy-world model: 128x128 images, 16x16 latents, word-level tokenizer",
    )


def _sd15() -> LayerDiffConfig:
    from layerdiff.io.sd15 import load_sd15_configs

    cfg = load_sd15_configs()
    return LayerDiffConfig(
        name="sd15",
        unet=cfg["unet"],
        vae=cfg["vae"],
        text_encoder=cfg["text_encoder"],
        tokenizer={"type": "clip_bpe"},
        scheduler=cfg["scheduler"],
        layer_head_dim=64,
        inter_layer_width=0.5,
        intra_layer_mode="shared",
        enhancer_head_dim=64,
        image_size=512,
        description="Stable Diffusion 1.5 architecture (CLIP ViT-L/14 text encoder, 64x64 latents at 512 px)",
    )


PRESETS = {"tiny": _tiny, "toy": _toy, "sd15": _sd15}


def get_preset(name: str, **overrides) -> LayerDiffConfig:
    """A named preset, optionally with fields replaced (e.g. ``max_layers=8``)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise LayerDiffError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}") from None
    config = factory()
    return config.replace(**overrides) if overrides else config


# ---------------------------------------------------------------------------- schema of stored configs
# A model file's config is untrusted input: every field is checked for its type and range before anything
# is built from it, so that a file which only changes numbers cannot make the loader allocate without
# limit. The bounds are generous for this architecture (sd15 is the largest preset; SDXL-sized parts fit)
# but finite; the tensors of a file must then also match the model its config builds
# (layerdiff.io.checkpoint), which pins every size to what the file really holds.
MAX_CONFIG_CHARS = 1_000_000  # the presets' configs, word lists included, are a few KB
CONFIG_MAX_DEPTH = 4  # {"unet": {"block_out_channels": [...]}} is 3 deep; one more gives better messages
MAX_LAYERS_LIMIT = 64  # layer slots (nodes/_widgets.MAX_LAYERS and the CLI's prompt check use the same)
HEAD_DIM_MAX = 512
CHANNELS_MAX = 4096  # UNet/VAE block widths, text width, cross-attention width (SD 1.5: 1280, 512, 768)
FEED_FORWARD_MAX = 16384  # text encoder MLP width (SD 1.5: 3072)
LEVELS_MAX = 6  # UNet and VAE resolution levels (SD 1.5: 4)
LAYERS_PER_BLOCK_MAX = 4  # resnets per level (SD 1.5: 2)
TRANSFORMER_DEPTH_MAX = 10  # transformer layers per attention block (SDXL's deepest: 10)
TRANSFORMER_BLOCKS_MAX = 128  # all transformer blocks of the UNet (SD 1.5: 16, SDXL: 70)
TEXT_LAYERS_MAX = 48  # text encoder layers (CLIP ViT-L: 12, OpenCLIP bigG: 32)
TEXT_HEADS_MAX = 64
VOCAB_MAX = 262_144  # CLIP: 49408
TOKENS_MAX = 512  # tokenizer max length and position embeddings (CLIP: 77)
ENHANCER_BLOCKS_MAX = 16  # prompt enhancer blocks (presets: 2)
IMAGE_SIZE_MAX = 2048  # default generation size in pixels (SD 1.5: 512)
LATENT_SIZE_MAX = 512  # the UNet's nominal latent size (SD 1.5: 64)
NORM_GROUPS_MAX = 256  # GroupNorm groups (SD 1.5: 32)
WORDS_MAX, WORD_CHARS_MAX = 65_536, 64  # a word-level tokenizer's vocabulary (toy: under 100 words)
TIMESTEPS_MAX = 10_000  # scheduler training timesteps (SD: 1000)
NAME_CHARS_MAX, DESCRIPTION_CHARS_MAX = 100, 1000

ACTIVATIONS = ("silu", "swish", "mish", "gelu")
TEXT_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")

_MISSING = object()
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")  # control characters and lone surrogates


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --- JSON with bounds: json.loads recurses once per nesting level (RecursionError on deep input),
# accepts NaN/Infinity and turns a 10**6-digit integer into minutes of work; this parser does none of that.
# a string literal, or an unterminated one up to the end (so no quote is scanned twice: linear time)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_JSON_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_JSON_PAIR = re.compile(r"[\[{][\]}]")
_JSON_INT_DIGITS = 40  # safetensors offsets need 20


def _json_depth_exceeds(text: str, max_depth: int) -> bool:
    """True when the brackets outside strings nest deeper than ``max_depth`` (or do not balance)."""
    brackets = _JSON_NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(max_depth):  # each pass removes the innermost pairs
        brackets, n = _JSON_PAIR.subn("", brackets)
        if not n:
            break
    return bool(brackets)


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} overflows a float")
    return value


def _json_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {_show(key)} appears twice in one object")
        out[key] = value
    return out


def parse_json(text: str, max_depth: int) -> Any:
    """``json.loads`` for untrusted text: refuses nesting deeper than ``max_depth`` (checked before
    parsing), NaN/Infinity, overflowing numbers, integers of more than 40 digits and repeated keys.
    Raises ValueError with a one-line reason."""
    if _json_depth_exceeds(text, max_depth):
        raise ValueError(f"brackets nested deeper than {max_depth} levels, or unbalanced")
    return json.loads(
        text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant,
        object_pairs_hook=_json_object,
    )


# --- field checks: each failure names the field's path, its value and the allowed values
def _show(value: Any, limit: int = 40) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass: true/false are not sizes


def _is_number(value: Any) -> bool:
    return type(value) is int or (type(value) is float and math.isfinite(value))


class _Fields:
    """The fields of one JSON object of the config, read through typed, range-checked getters."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            shown = "" if data is None else f" {_show(data)}"
            raise LayerDiffError(f"{where or 'the config'} must be a JSON object, got {_kind(data)}{shown}")
        self.data, self.where, self.read = data, where, set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, value: Any, rule: str):
        raise LayerDiffError(f"{self.path(key)} = {_show(value)} {rule}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        self.read.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise LayerDiffError(f"{self.path(key)} is missing: every LayerDiff file's config has it")
        return default

    def int(self, key: str, lo: int, hi: int, default: Any = _MISSING, nullable: bool = False) -> int | None:
        value = self.get(key, default)
        if value is None and nullable:
            return None
        return self.check_int(key, value, lo, hi)

    def check_int(self, key: str, value: Any, lo: int, hi: int) -> int:
        if not _is_int(value):
            self.fail(key, value, f"must be an integer in {lo}..{hi}, not {_kind(value)}")
        if not lo <= value <= hi:
            self.fail(key, value, f"is out of range: use {lo}..{hi}")
        return value

    def number(self, key: str, lo: float, hi: float, default: Any = _MISSING, nullable: bool = False,
               above: bool = False) -> float | None:
        """A finite number in [lo, hi] ((lo, hi] with ``above``)."""
        value = self.get(key, default)
        if value is None and nullable:
            return None
        span = f"{'(' if above else '['}{lo}, {hi}]"
        if not _is_number(value):
            got = "" if type(value) is float else f", not {_kind(value)}"
            self.fail(key, value, f"must be a finite number in {span}{got}")
        if not (lo < value if above else lo <= value) or value > hi:
            self.fail(key, value, f"is out of range: use a number in {span}")
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if type(value) is not bool:
            self.fail(key, value, f"must be true or false, not {_kind(value)}")
        return value

    def choice(self, key: str, choices: tuple, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if not isinstance(value, (str, type(None))) or value not in choices:
            self.fail(key, value, f"is not supported: use one of {', '.join(_show(c) for c in choices)}")
        return value

    def text(self, key: str, max_chars: int, default: Any = _MISSING, min_chars: int = 0) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            self.fail(key, value, f"must be a string, not {_kind(value)}")
        if not min_chars <= len(value) <= max_chars or _CONTROL.search(value):
            self.fail(key, value, f"must be {min_chars}..{max_chars} printable characters on one line")
        return value

    def int_list(self, key: str, lo: int, hi: int, length: int | tuple[int, int], default: Any = _MISSING,
                 scalar: bool = False) -> list[int]:
        """A list of integers in lo..hi of ``length`` (a count, or a (min, max) range); with ``scalar`` a
        single integer stands for the whole list, as diffusers allows."""
        value = self.get(key, default)
        lengths = (length, length) if isinstance(length, int) else length
        if scalar and _is_int(value):
            return [self.check_int(key, value, lo, hi)] * lengths[0]
        self.check_list(key, value, lengths)
        return [self.check_int(f"{key}[{i}]", v, lo, hi) for i, v in enumerate(value)]

    def check_list(self, key: str, value: Any, lengths: tuple[int, int]) -> list:
        lo, hi = lengths
        count = f"{lo}" if lo == hi else f"{lo}..{hi}"
        if not isinstance(value, list):
            self.fail(key, value, f"must be a list of {count} entries, not {_kind(value)}")
        if not lo <= len(value) <= hi:
            self.fail(key, value, f"has {len(value)} entries: use {count}")
        return value

    def number_list(self, key: str, length: int, positive: bool = False) -> list[float] | None:
        value = self.get(key, None)
        if value is None:
            return None
        self.check_list(key, value, (length, length))
        for i, v in enumerate(value):
            if not _is_number(v) or (positive and v <= 0):
                self.fail(f"{key}[{i}]", v, f"must be a finite{' positive' if positive else ''} number")
        return value

    def const(self, key: str, expected: Any, why: str) -> None:
        value = self.get(key, expected)
        if value != expected or type(value) is not type(expected):
            self.fail(key, value, f"is not supported: {why} ({_show(expected)})")

    def finish(self, library: str | None = None) -> None:
        """Refuse keys not read above, except those the ``library`` class knows and that hold its default."""
        for key in self.data:
            if key in self.read:
                continue
            defaults = _library_defaults(library) if library else {}
            if key in defaults and _same_json(self.data[key], defaults[key]):
                continue
            if key in defaults:
                self.fail(key, self.data[key], f"is not supported by LayerDiff: leave it at {_show(defaults[key])}")
            known = sorted(self.read | set(defaults))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {_show(close[0])}?" if close else f"expected some of {', '.join(known[:12])}"
            raise LayerDiffError(f"unknown key {_show(key)} in {self.where or 'the config'}: {hint}")


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality of a file's value and a library default (tuples are lists; true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if type(a) in (int, float) and type(b) in (int, float):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        a, b = {str(k): v for k, v in a.items()}, {str(k): v for k, v in b.items()}
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@functools.cache
def _library_defaults(kind: str) -> dict[str, Any]:
    """Constructor defaults of the library class that a config section feeds (empty when it cannot be
    imported): a key written by that library at its default value is harmless."""
    import inspect

    try:
        if kind == "text_encoder":
            from transformers import CLIPTextConfig

            return CLIPTextConfig().to_dict()
        import diffusers

        cls = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "DDIMScheduler"}[kind]
        params = inspect.signature(getattr(diffusers, cls).__init__).parameters.values()
    except Exception:  # a broken library install only makes the check stricter (every key is then unknown)
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _check_unet(f: _Fields) -> dict[str, Any]:
    f.const("in_channels", 4, "config.unet describes the 4-channel base UNet; LayerDiff widens it to 8 itself")
    f.const("out_channels", 4, "config.unet describes the 4-channel base UNet; LayerDiff widens it to 8 itself")
    down = f.get("down_block_types")
    n = len(f.check_list("down_block_types", down, (1, LEVELS_MAX)))
    for i, name in enumerate(down):
        if name not in DOWN_BLOCKS:
            f.fail(f"down_block_types[{i}]", name, f"is not supported: use {' or '.join(DOWN_BLOCKS)}")
    up = f.check_list("up_block_types", f.get("up_block_types"), (n, n))
    for i, name in enumerate(up):
        if name not in UP_BLOCKS:
            f.fail(f"up_block_types[{i}]", name, f"is not supported: use {' or '.join(UP_BLOCKS)}")
    groups = f.int("norm_num_groups", 1, NORM_GROUPS_MAX)
    widths = f.int_list("block_out_channels", 1, CHANNELS_MAX, n)
    heads = f.int_list("attention_head_dim", 1, HEAD_DIM_MAX, n, scalar=True)
    for i, (w, h) in enumerate(zip(widths, heads)):
        if w % groups:
            f.fail(f"block_out_channels[{i}]", w, f"is not a multiple of norm_num_groups {groups}")
        if w % h:
            f.fail(f"block_out_channels[{i}]", w, f"is not a multiple of its attention heads {h} (attention_head_dim)")
    per_block = f.int_list("layers_per_block", 1, LAYERS_PER_BLOCK_MAX, n, scalar=True)
    depth = f.int_list("transformer_layers_per_block", 1, TRANSFORMER_DEPTH_MAX, n, default=1, scalar=True)
    blocks = depth[-1] + sum(  # the mid block, the down levels and the up levels (one more layer each)
        d * (k + (level == "up")) for kinds, level in ((down, "down"), (up[::-1], "up"))
        for kind, d, k in zip(kinds, depth, per_block) if kind.startswith("CrossAttn")
    )
    if blocks > TRANSFORMER_BLOCKS_MAX:
        raise LayerDiffError(
            f"{f.path('transformer_layers_per_block')}: the UNet would have {blocks} transformer blocks; "
            f"LayerDiff supports at most {TRANSFORMER_BLOCKS_MAX}"
        )
    f.int("cross_attention_dim", 1, CHANNELS_MAX)
    f.int("sample_size", 1, LATENT_SIZE_MAX, default=None, nullable=True)
    for key in ("center_input_sample", "flip_sin_to_cos", "use_linear_projection", "upcast_attention"):
        f.bool(key, default=False)
    f.int("freq_shift", 0, 1, default=0)
    f.int("downsample_padding", 0, 2, default=1)
    f.number("mid_block_scale_factor", 0, 10, default=1)
    f.choice("act_fn", ACTIVATIONS, default="silu")
    f.number("norm_eps", 0, 1, default=1e-5, above=True)
    f.number("dropout", 0, 1, default=0.0)
    f.finish("unet")
    return {"levels": n}


def _check_vae(f: _Fields) -> dict[str, Any]:
    f.const("in_channels", 3, "LayerDiff images are RGB")
    f.const("out_channels", 3, "LayerDiff images are RGB")
    latent = f.int("latent_channels", 4, 4, default=4)
    n = len(f.check_list("down_block_types", f.get("down_block_types"), (1, LEVELS_MAX)))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for i, name in enumerate(f.check_list(key, f.get(key), (n, n))):
            if name != kind:
                f.fail(f"{key}[{i}]", name, f"is not supported: use {kind!r}")
    groups = f.int("norm_num_groups", 1, NORM_GROUPS_MAX)
    for i, w in enumerate(f.int_list("block_out_channels", 1, CHANNELS_MAX, n)):
        if w % groups:
            f.fail(f"block_out_channels[{i}]", w, f"is not a multiple of norm_num_groups {groups}")
    f.int("layers_per_block", 1, LAYERS_PER_BLOCK_MAX)
    f.choice("act_fn", ACTIVATIONS, default="silu")
    f.int_list("sample_size", 1, IMAGE_SIZE_MAX * 2, 2, default=512, scalar=True)
    f.number("scaling_factor", 0, 100, default=0.18215, above=True)
    f.number("shift_factor", -100, 100, default=None, nullable=True)
    f.number_list("latents_mean", latent)
    f.number_list("latents_std", latent, positive=True)
    for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        f.bool(key, default=True)
    f.finish("vae")
    return {"levels": n}


def _check_text_encoder(f: _Fields) -> dict[str, Any]:
    vocab = f.int("vocab_size", 1, VOCAB_MAX)
    width = f.int("hidden_size", 1, CHANNELS_MAX)
    f.int("intermediate_size", 1, FEED_FORWARD_MAX)
    f.int("projection_dim", 1, CHANNELS_MAX, default=512)
    f.int("num_hidden_layers", 1, TEXT_LAYERS_MAX)
    heads = f.int("num_attention_heads", 1, TEXT_HEADS_MAX)
    if width % heads:
        f.fail("hidden_size", width, f"is not a multiple of num_attention_heads {heads}")
    positions = f.int("max_position_embeddings", 1, TOKENS_MAX)
    f.choice("hidden_act", TEXT_ACTIVATIONS, default="quick_gelu")
    f.number("layer_norm_eps", 0, 1, default=1e-5, above=True)
    f.number("attention_dropout", 0, 1, default=0.0)
    f.number("initializer_range", 0, 10, default=0.02)
    f.number("initializer_factor", 0, 100, default=1.0)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        f.int(key, 0, vocab - 1, default=None, nullable=True)
    f.choice("model_type", ("clip_text_model",), default="clip_text_model")
    for key in ("dtype", "torch_dtype"):
        f.choice(key, (None, *FLOAT_DTYPE_NAMES), default=None)
    architectures = f.get("architectures", None)
    if architectures is not None:
        for i, name in enumerate(f.check_list("architectures", architectures, (0, 4))):
            if not isinstance(name, str) or len(name) > 100:
                f.fail(f"architectures[{i}]", name, "must be a class name")
    f.text("transformers_version", 32, default="")
    f.finish("text_encoder")
    return {"vocab_size": vocab, "hidden_size": width, "positions": positions}


def _check_tokenizer(f: _Fields, text: dict[str, Any]) -> None:
    kind = f.choice("type", ("words", "clip_bpe"))
    if kind == "clip_bpe":
        from layerdiff.io.clip_tokenizer import MAX_LENGTH, VOCAB_SIZE

        if text["vocab_size"] < VOCAB_SIZE or text["positions"] < MAX_LENGTH:
            raise LayerDiffError(
                f"text_encoder has vocab_size {text['vocab_size']} and max_position_embeddings {text['positions']}: "
                f"the CLIP tokenizer needs at least {VOCAB_SIZE} and {MAX_LENGTH}"
            )
        f.finish()  # no "path": a model file does not choose files for the loader to read
        return
    words = f.check_list("words", f.get("words"), (1, WORDS_MAX))
    for i, word in enumerate(words):
        if not isinstance(word, str) or not 1 <= len(word) <= WORD_CHARS_MAX:
            f.fail(f"words[{i}]", word, f"must be a string of 1..{WORD_CHARS_MAX} characters")
    f.int("max_length", 2, min(TOKENS_MAX, text["positions"]))
    ids = 4 + len({w.lower() for w in words})  # [PAD] [BOS] [EOS] [UNK] and one id per distinct word
    if ids > text["vocab_size"]:
        raise LayerDiffError(
            f"tokenizer.words gives {ids} token ids but text_encoder.vocab_size is {text['vocab_size']}: "
            "the text encoder needs an embedding for every id"
        )
    f.finish()


def _check_scheduler(f: _Fields) -> None:
    timesteps = f.int("num_train_timesteps", 2, TIMESTEPS_MAX, default=1000)
    start = f.number("beta_start", 0, 1, default=0.0001, above=True)
    end = f.number("beta_end", 0, 1, default=0.02, above=True)
    if start >= 1 or end >= 1 or start > end:
        raise LayerDiffError(f"scheduler betas {start}..{end} are not a noise schedule: use 0 < beta_start <= beta_end < 1")
    f.choice("beta_schedule", BETA_SCHEDULES, default="linear")
    betas = f.get("trained_betas", None)
    if betas is not None:
        for i, b in enumerate(f.check_list("trained_betas", betas, (timesteps, timesteps))):
            if not _is_number(b) or not 0 < b < 1:
                f.fail(f"trained_betas[{i}]", b, "must be a number in (0, 1)")
    f.int("steps_offset", 0, min(timesteps - 1, 1000), default=0)
    for key in ("set_alpha_to_one", "clip_sample", "skip_prk_steps", "thresholding", "rescale_betas_zero_snr"):
        f.bool(key, default=False)
    f.number("clip_sample_range", 0, 100, default=1.0, above=True)
    f.number("sample_max_value", 0, 100, default=1.0, above=True)
    f.number("dynamic_thresholding_ratio", 0, 1, default=0.995, above=True)
    f.choice("prediction_type", ("epsilon",), default="epsilon")
    f.choice("timestep_spacing", TIMESTEP_SPACINGS, default="leading")
    f.finish("scheduler")


def _check_sampling(f: _Fields) -> None:
    """A model's sampling defaults, in the same ranges as the nodes, the command line and the library."""
    from layerdiff.limits import RANGES
    from layerdiff.sampling import SCHEDULERS

    def bounds(key: str) -> tuple:
        return RANGES[key].low, RANGES[key].high

    d = SamplingDefaults()
    f.int("steps", *bounds("steps"), default=d.steps)
    f.number("cfg", *bounds("cfg"), default=d.cfg)
    f.number("background_cfg", *bounds("background_cfg"), default=None, nullable=True)
    f.number("mask_guidance", *bounds("mask_guidance"), default=d.mask_guidance)
    f.number("mask_guidance_blur_sigma", *bounds("mask_guidance_blur"), default=d.mask_guidance_blur_sigma)
    f.int("mask_guidance_erode", *bounds("mask_guidance_erode"), default=d.mask_guidance_erode)
    for key in ("mask_guidance_start", "layout_cleanup", "layout_cleanup_start", "eta"):
        f.number(key, *bounds(key), default=getattr(d, key))
    check = f.number("empty_layer_check", *bounds("empty_layer_check"), default=d.empty_layer_check)
    if check == RANGES["empty_layer_check"].high:
        f.fail("empty_layer_check", check, "is out of range: use a fraction of the steps below 1")
    f.int("empty_layer_retries", *bounds("empty_layer_retries"), default=d.empty_layer_retries)
    f.choice("scheduler", tuple(SCHEDULERS), default=d.scheduler)
    f.finish()


def check_config_dict(data: Any) -> None:
    """Check a LayerDiff config read from JSON: exact types, every size within the bounds above, the
    parts consistent with each other. Raises LayerDiffError naming the field, its value and the range."""
    top = _Fields(data, "")
    version = top.get("config_version", CONFIG_VERSION)
    if not _is_int(version) or version < 1:
        top.fail("config_version", version, f"must be an integer from 1 to {CONFIG_VERSION}")
    if version > CONFIG_VERSION:
        raise LayerDiffError(
            f"config_version {version} is newer than this LayerDiff understands ({CONFIG_VERSION}): "
            "update the LayerDiff package"
        )
    top.text("name", NAME_CHARS_MAX, min_chars=1)
    top.text("description", DESCRIPTION_CHARS_MAX, default="")
    unet = _check_unet(_Fields(top.get("unet"), "unet"))
    vae = _check_vae(_Fields(top.get("vae"), "vae"))
    text = _check_text_encoder(_Fields(top.get("text_encoder"), "text_encoder"))
    _check_tokenizer(_Fields(top.get("tokenizer"), "tokenizer"), text)
    if "scheduler" in data:
        _check_scheduler(_Fields(top.get("scheduler"), "scheduler"))
    if "sampling" in data:
        _check_sampling(_Fields(top.get("sampling"), "sampling"))
    cross = data["unet"]["cross_attention_dim"]
    if cross != text["hidden_size"]:
        top.fail("unet.cross_attention_dim", cross, f"must equal text_encoder.hidden_size {text['hidden_size']}")
    top.int("max_layers", 1, MAX_LAYERS_LIMIT, default=4)
    top.int("layer_head_dim", 1, HEAD_DIM_MAX, default=64)
    top.number("inter_layer_width", 0, 1, default=1.0, above=True)
    top.choice("intra_layer_mode", ("separate", "shared"), default="separate")
    tokens = top.int("layer_prompt_tokens", 0, TOKENS_MAX, default=0)
    if tokens == 1:
        top.fail("layer_prompt_tokens", tokens, "is out of range: use 0 (all tokens) or 2 or more")
    top.int("enhancer_blocks", 0, ENHANCER_BLOCKS_MAX, default=2)
    top.int("enhancer_head_dim", 1, HEAD_DIM_MAX, default=64)
    factor = 2 ** (vae["levels"] - 1) * 2 ** (unet["levels"] - 1)  # LayerDiffModel.latent_factor
    size = top.int("image_size", factor, IMAGE_SIZE_MAX, default=512)
    if size % factor:
        top.fail("image_size", size, f"is not a multiple of {factor}, the model's latent factor")
    top.finish()
