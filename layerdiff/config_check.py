"""The schema of a stored LayerDiff config: a model file's config is untrusted input.

:func:`check_config_dict` checks every field of a config read from JSON for its type and range
before anything is built from it (:meth:`layerdiff.config.LayerDiffConfig.from_dict` calls it; the
text itself is read by :func:`layerdiff.safe_json.parse_json`). Every failure is one
:class:`LayerDiffError` naming the field, its value and the allowed values.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from typing import Any

from layerdiff.errors import LayerDiffError
from layerdiff.safe_json import show_json
from layerdiff.settings import DEFAULTS

CONFIG_VERSION = 1

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
MAX_LAYOUT_PRIOR = 256  # rank of the blocks' prompt-conditioned layout path (toy: 16)
MAX_POSITION_FEATURES = 16  # Fourier frequencies per axis of the blocks' position features (toy: 3)
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
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts: the noise, or v (Salimans & Ho 2022)
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")

_MISSING = object()
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")  # control characters and lone surrogates


# --- field checks: each failure names the field's path, its value and the allowed values
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
            shown = "" if data is None else f" {show_json(data)}"
            raise LayerDiffError(f"{where or 'the config'} must be a JSON object, got {_kind(data)}{shown}")
        self.data, self.where, self.read = data, where, set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, value: Any, rule: str):
        raise LayerDiffError(f"{self.path(key)} = {show_json(value)} {rule}")

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
            self.fail(key, value, f"is not supported: use one of {', '.join(show_json(c) for c in choices)}")
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
            self.fail(key, value, f"is not supported: {why} ({show_json(expected)})")

    def finish(self, library: str | None = None) -> None:
        """Refuse keys not read above, except those the ``library`` class knows and that hold its default."""
        for key in self.data:
            if key in self.read:
                continue
            defaults = _library_defaults(library) if library else {}
            if key in defaults and _same_json(self.data[key], defaults[key]):
                continue
            if key in defaults:
                self.fail(key, self.data[key], f"is not supported by LayerDiff: leave it at {show_json(defaults[key])}")
            known = sorted(self.read | set(defaults))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {show_json(close[0])}?" if close else f"expected some of {', '.join(known[:12])}"
            raise LayerDiffError(f"unknown key {show_json(key)} in {self.where or 'the config'}: {hint}")


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
        from layerdiff.model.clip_tokenizer import MAX_LENGTH, VOCAB_SIZE

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
    f.choice("prediction_type", PREDICTION_TYPES, default="epsilon")
    f.choice("timestep_spacing", TIMESTEP_SPACINGS, default="leading")
    f.finish("scheduler")


def _check_sampling(f: _Fields) -> None:
    """A model's sampling defaults, in the same ranges as the nodes, the command line and the library."""
    from layerdiff.limits import RANGES
    from layerdiff.settings import LEGACY_SAMPLERS, SAMPLERS, SCHEDULERS

    def bounds(key: str) -> tuple:
        return RANGES[key].low, RANGES[key].high

    d = DEFAULTS
    f.int("steps", *bounds("steps"), default=d.steps)
    f.number("cfg", *bounds("cfg"), default=d.cfg)
    f.number("background_cfg", *bounds("background_cfg"), default=None, nullable=True)
    f.number("mask_guidance", *bounds("mask_guidance"), default=d.mask_guidance)
    for key in ("mask_guidance_blur", "mask_guidance_blur_sigma"):  # the second: files of earlier versions
        f.number(key, *bounds("mask_guidance_blur"), default=d.mask_guidance_blur)
    f.int("mask_guidance_erode", *bounds("mask_guidance_erode"), default=d.mask_guidance_erode)
    for key in ("mask_guidance_start", "layout_cleanup", "layout_cleanup_start", "eta", "layout_prior"):
        f.number(key, *bounds(key), default=getattr(d, key))
    check = f.number("empty_layer_check", *bounds("empty_layer_check"), default=d.empty_layer_check)
    if check == RANGES["empty_layer_check"].high:
        f.fail("empty_layer_check", check, "is out of range: use a fraction of the steps below 1")
    f.int("empty_layer_retries", *bounds("empty_layer_retries"), default=d.empty_layer_retries)
    f.choice("sampler", SAMPLERS + tuple(LEGACY_SAMPLERS), default=d.sampler)
    # earlier versions kept the sampler under "scheduler"
    f.choice("scheduler", SCHEDULERS + SAMPLERS + tuple(LEGACY_SAMPLERS), default=d.scheduler)
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
    top.int("position_features", 0, MAX_POSITION_FEATURES, default=0)
    top.int("layout_prior", 0, MAX_LAYOUT_PRIOR, default=0)
    top.int("enhancer_blocks", 0, ENHANCER_BLOCKS_MAX, default=2)
    top.int("enhancer_head_dim", 1, HEAD_DIM_MAX, default=64)
    factor = 2 ** (vae["levels"] - 1) * 2 ** (unet["levels"] - 1)  # LayerDiffModel.latent_factor
    size = top.int("image_size", factor, IMAGE_SIZE_MAX, default=512)
    if size % factor:
        top.fail("image_size", size, f"is not a multiple of {factor}, the model's latent factor")
    top.finish()
