"""Presets and configuration: the one source of truth for model sizes and sampling defaults.

A :class:`LayerDiffConfig` describes a whole LayerDiff model: the base UNet (a diffusers
``UNet2DConditionModel`` config with :data:`IMAGE_CHANNELS` latent channels; the LayerDiff builder
widens it to :data:`LAYER_CHANNELS`), the VAE, the text encoder and tokenizer, the scheduler, and the
layer modules. It is stored as JSON in every LayerDiff checkpoint's metadata, so a checkpoint file
describes itself.

Presets:

- ``sd15``: the real Stable Diffusion 1.5 configuration (UNet, VAE, CLIP ViT-L/14 text encoder,
  scheduler), read from small JSON files shipped in ``layerdiff/presets/sd15``.
- ``toy``: a small model for the procedural toy world, trainable on a 2-core CPU.
- ``tiny``: random weights for tests; a full forward pass takes milliseconds.

A config read back from a file is checked field by field first (:mod:`layerdiff.config_check`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerdiff.config_check import (
    CONFIG_MAX_DEPTH,
    CONFIG_VERSION,
    MAX_CONFIG_CHARS,
    MAX_LAYOUT_PRIOR,
    MAX_POSITION_FEATURES,
    check_config_dict,
)
from layerdiff.errors import LayerDiffError
from layerdiff.safe_json import parse_json
from layerdiff.settings import DEFAULTS, SamplerSettings

# Latent channels of one layer: the VAE's 4 image latent channels, then 4 of its mask encoded as an
# image (METHOD.md section 2). The base SD UNet takes IMAGE_CHANNELS; LayerDiff widens it to LAYER_CHANNELS.
IMAGE_CHANNELS = 4
LAYER_CHANNELS = 2 * IMAGE_CHANNELS

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

# A schedule for small latents: DDPM's linear betas (Ho et al. 2020, made for 32x32 images) with v
# prediction (Salimans & Ho 2022). SD's schedule, made for 64x64 latents, still shows a 16x16
# latent's layout at its noisiest training step (a small latent has fewer pixels to average the same
# per-pixel signal over); this one ends about 100x lower in signal-to-noise ratio, and v's loss weighs
# the clean latent's error at least 1x at every noise level, where a noise prediction's weighs it
# SNR. The toy recipe can train with it (its "scheduler" setting); the built-in model does not
# (why: docs/experiments.md).
LOW_RES_SCHEDULER = {**SD_SCHEDULER, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                     "prediction_type": "v_prediction"}

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
    # Cost of the layer modules (METHOD.md section 2). The defaults are the paper's full layout,
    # which files written before these fields existed use; the presets choose the cheaper one.
    inter_layer_width: float = 1.0  # inner width of inter-layer attention, a fraction of the block's
    intra_layer_mode: str = "separate"  # "separate" own q/out projections, or "shared" with SD's cross-attention
    # Layer prompts are short phrases: keep only their first N token states (0 = all of them). The
    # text encoder is causal, so this equals encoding them at length N; it makes intra-layer
    # attention and the prompt enhancer cheaper.
    layer_prompt_tokens: int = 0
    # Where an object goes ("on the left", "at the top"): each transformer block adds a learned
    # projection (zero at the start, so a no-op) of fixed 2D Fourier features of its grid cells'
    # positions to its input, at this many frequencies per axis (0 = none, as SD). Without them
    # a small UNet learns positions only from the zero padding of its convolutions.
    position_features: int = 0
    # Where each layer's prompt puts its object: a small bilinear map (of this rank) of a grid cell's
    # position and the prompt's word embeddings, in the prompt enhancer; the sampler writes it into the
    # foregrounds' starting noise (SamplerSettings.layout_prior). 0 = none.
    layout_prior: int = 0
    enhancer_blocks: int = 2
    enhancer_head_dim: int = 64
    image_size: int = 512  # default generation size (pixels)
    sampling: SamplerSettings = DEFAULTS  # resolved: every field set (background_cfg None: the same as cfg)
    description: str = ""

    def __post_init__(self):
        if not 1 <= int(self.max_layers) <= 64:
            raise LayerDiffError(f"max_layers {self.max_layers} is out of range: use 1..64 (default 4)")
        if not 0 < float(self.inter_layer_width) <= 1:
            raise LayerDiffError(f"inter_layer_width {self.inter_layer_width} is out of range: use a fraction in (0, 1]")
        if int(self.layer_prompt_tokens) < 0 or 0 < int(self.layer_prompt_tokens) < 2:
            raise LayerDiffError(f"layer_prompt_tokens {self.layer_prompt_tokens} is out of range: use 0 (all) or 2 or more")
        if not 0 <= int(self.position_features) <= MAX_POSITION_FEATURES:
            raise LayerDiffError(f"position_features {self.position_features} is out of range: use 0 (none) to "
                                 f"{MAX_POSITION_FEATURES} frequencies per axis")
        if not 0 <= int(self.layout_prior) <= MAX_LAYOUT_PRIOR:
            raise LayerDiffError(f"layout_prior {self.layout_prior} is out of range: use 0 (none) to {MAX_LAYOUT_PRIOR}")
        if self.intra_layer_mode not in ("separate", "shared"):
            raise LayerDiffError(f"intra_layer_mode {self.intra_layer_mode!r} is not known: use 'separate' or 'shared'")
        base = IMAGE_CHANNELS
        if self.unet.get("in_channels", base) != base or self.unet.get("out_channels", base) != base:
            raise LayerDiffError(
                f"config.unet describes the base UNet and must have in_channels = out_channels = {base}, got "
                f"{self.unet.get('in_channels')}/{self.unet.get('out_channels')}: LayerDiff widens it to "
                f"{LAYER_CHANNELS} itself"
            )

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", IMAGE_CHANNELS))

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
            data["sampling"] = SamplerSettings.from_dict(data["sampling"]).over(DEFAULTS)
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
        sampling=DEFAULTS.replace(steps=4),
        description="random-weight test model (64x64 images, 8x8 latents)",
    )


def _toy() -> LayerDiffConfig:
    words = _words_tokenizer(32)  # the longest toy prompt has 29 words and commas
    return LayerDiffConfig(
        name="toy",
        # Attention (self, text, inter-layer) only at the 8x8 level, none at 16x16.
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
        position_features=3,
        layout_prior=16,  # trained by the recipe's layout stage, written into the starting noise
        enhancer_head_dim=32,
        image_size=128,
        # the recipe's settings before calibration; the toy recipe's `calibrate` stage then picks both
        # guidance scales on validation scenes and writes them into the model file it ships. Self-mask
        # guidance is off: paired against plain CFG on this model it lowers mask IoU (docs/sampling.md);
        # a user who turns it on gets it on each mask's interior (erode 1)
        # The layout prior goes into the foregrounds' starting noise at strength 7 (where each object is
        # not, and a focus disk of its expected size where it is: docs/sampling.md, docs/experiments.md).
        sampling=DEFAULTS.replace(steps=20, cfg=3.0, background_cfg=20.0, mask_guidance=0.0, mask_guidance_erode=1,
                                  layout_prior=7.0),
        description="toy-world model: 128x128 images, 16x16 latents, word-level tokenizer",
    )


def _sd15() -> LayerDiffConfig:
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


SD15_PRESET_DIR = Path(__file__).resolve().parent / "presets" / "sd15"


def load_sd15_configs() -> dict[str, dict]:
    """Fresh copies of the SD1.5 configs: ``unet``, ``vae``, ``text_encoder``, ``scheduler``.

    Build the scheduler with ``DDIMScheduler.from_config(cfg)`` (or PNDM/Euler...): the file keeps
    keys of several scheduler classes, which ``from_config`` ignores where they do not apply.
    """
    return {
        name: json.loads((SD15_PRESET_DIR / f"{name}.json").read_text("utf-8"))
        for name in ("unet", "vae", "text_encoder", "scheduler")
    }
