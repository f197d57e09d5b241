"""Training settings: :class:`TrainConfig` (LayerDiff) and :class:`VaeTrainConfig` (the toy VAE),
the table of every setting's type and range, and the checks that refuse a bad value before
anything loads, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field

from layerdiff.errors import LayerDiffError


@dataclass
class TrainConfig:
    """Settings of :func:`layerdiff.training.loop.train`; every field checked against TRAIN_SETTINGS."""

    steps: int = 1000
    batch_size: int = 8  # per process and per micro-batch
    # micro-batches whose gradients are averaged into one optimizer step: a step sees
    # batch_size x gradient_accumulation_steps x processes samples (the global batch)
    gradient_accumulation_steps: int = 1
    lr_base: float = 1e-5  # SD weights (METHOD.md: 1e-5)
    lr_new: float = 1e-4  # new modules + conv_in/conv_out
    lr_text: float = 0.0  # text encoder (0 = frozen, as for SD 1.5)
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA
    # keep the EMA copy (fp32) in CPU memory instead of beside the weights on the GPU; each update
    # then copies the trained weights to the CPU
    ema_on_cpu: bool = False
    # recompute each UNet block's activations during the backward pass instead of keeping them
    # (diffusers' gradient checkpointing; the text encoder's too where it is trained): less memory,
    # about one more forward pass per step, the same gradients
    gradient_checkpointing: bool = False
    freeze_base: bool = False
    drop_all: float = 0.10  # CFG dropout: global and layer prompts together
    drop_layers: float = 0.05  # CFG dropout: layer prompts only
    layer_weights: dict = field(default_factory=lambda: {2: 1.0, 3: 2.0, 4: 3.0})
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    size: int = 512  # training resolution (pixels)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: no sample grids
    # the grids' prompts: [{"global": str, "layers": [background, foreground, ...]}, ...]; None takes
    # those of the first few validation (else training) samples
    sample_prompts: list | None = None
    num_workers: int = 2
    # encoded samples (the shards' PNG and JSON bytes) the streaming reader shuffles among; 0 = the
    # shards' own order (and no shard shuffling)
    shuffle_buffer: int = 256
    # held-out shards (a folder, a .tar file or a list of them), their loss every val_every steps and
    # at the end (0 = never), on the first val_samples of them with fixed timesteps and noise
    validation_data: str | list | None = None
    val_every: int = 0
    val_samples: int = 64
    cache_latents: bool = False  # encode the dataset once (small data sets, e.g. the toy world)
    bucket_layers: bool = True  # cached latents: every batch holds one layer count (no padded slots to compute)
    snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0 = plain epsilon MSE
    lr_schedule: str = "constant"  # constant | cosine (to 10% of the peak at the last step), after warm-up
    # A fresh run of a model trained from scratch (no SD weights to protect) may open the zero
    # gates of the intra-layer attention at the start, e.g. 1.0; None keeps them shut (SD fine-tuning).
    intra_gate_init: float | None = None
    # Offset noise (Guttenberg 2023): each layer's noise gets a constant per channel, drawn with
    # this spread, on top of the pixel-wise noise (0 = off, e.g. 0.1). Plain noise barely touches a
    # latent's per-channel mean even at the last timestep (16x16 positions average it down 16x), so
    # the model learns to read a layer's overall colour off x_t instead of the prompt; sampling from
    # pure noise then keeps the noise's near-zero mean: flat backgrounds come out grey.
    offset_noise: float = 0.0
    # Weight of the layout loss (0 = off): each foreground's layout-prior map, read from its prompt
    # alone, learns its mask (binary cross-entropy). Needs a model whose config has a layout prior.
    layout_weight: float = 0.0
    lr_layout: float | None = None  # the layout prior's weights (None: lr_new); its words are rare, e.g. 10x lr_new

    def __post_init__(self):
        check_settings({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, TRAIN_SETTINGS)
        self.layer_weights = {int(k): float(v) for k, v in self.layer_weights.items()}
        if self.size % 8:
            raise LayerDiffError(f"size {self.size} is not a multiple of 8: use e.g. {self.size // 8 * 8 or 8}")
        if self.drop_all + self.drop_layers > 1:
            raise LayerDiffError(f"drop_all {self.drop_all} + drop_layers {self.drop_layers} is above 1: they are "
                                 "shares of the batch, e.g. 0.1 and 0.05")
        if self.val_every and self.validation_data is None:
            raise LayerDiffError(f"val_every {self.val_every} needs held-out data: set validation_data to a folder of "
                                 'shards (e.g. "validation_data": "data/val") or val_every to 0')
        if isinstance(self.validation_data, tuple):
            self.validation_data = list(self.validation_data)
        if self.sample_prompts is not None:
            self.sample_prompts = [dict(p) for p in self.sample_prompts]

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> TrainConfig:
        """Settings from JSON: every key known, every value of its type and in its range (see
        TRAIN_SETTINGS); ``where`` prefixes the key in messages (e.g. "train.")."""
        if not isinstance(data, dict):
            raise LayerDiffError(f"{where.rstrip('.') or 'the training settings'} must be a JSON object of "
                                 f"settings, got {_show(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LayerDiffError(f"unknown training setting {where}{unknown[0]!r}{hint}: use some of {sorted(known)}")
        check_settings(data, TRAIN_SETTINGS, where)
        return cls(**data)

    def lr_scale(self, step: int) -> float:
        """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then constant or cosine."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.lr_schedule == "constant" or step < self.warmup_steps:
            return warm
        return cosine_scale((step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))


LR_SCHEDULES = ("constant", "cosine")
MAX_SEED = 2**32 - 1  # accelerate's set_seed seeds numpy, which takes 32 bits
MAX_STEPS = 100_000_000
MAX_PATHS = 10_000  # shard folders or files in one data setting
MAX_SAMPLE_PROMPTS = 64
MAX_PROMPT_CHARS = 1000


@dataclass(frozen=True)
class Setting:
    """The type and range of one training setting; ``hint`` says what the value means."""

    kind: str  # "int" | "float" | "bool" | "choice" | "weights" | "ints" | "paths" | "prompts"
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    hint: str = ""
    optional: bool = False  # None allowed


def _show(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value) if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _number_ok(value, kind: str) -> bool:
    if kind == "int":
        return type(value) is int  # true/false are not counts
    return type(value) in (int, float) and math.isfinite(value)


def _limit(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_setting(key: str, value, rule: Setting, where: str = "") -> None:
    """Raise LayerDiffError naming ``where + key``, the value and what is allowed."""
    name = f"{where}{key} {_show(value)}"
    hint = f" ({rule.hint})" if rule.hint else ""
    span = f"{_limit(rule.lo)} to {_limit(rule.hi)}" if rule.lo is not None else ""
    if value is None and rule.optional:
        return
    if rule.kind == "bool":
        if type(value) is not bool:
            raise LayerDiffError(f"{name} must be true or false{hint}")
    elif rule.kind == "choice":
        if value not in rule.choices or not isinstance(value, str):
            raise LayerDiffError(f"{name} is not known: use {' or '.join(rule.choices)}{hint}")
    elif rule.kind in ("int", "float"):
        extra = f"; {rule.hint}" if rule.hint else ""
        if not _number_ok(value, rule.kind):
            what = "an integer" if rule.kind == "int" else "a finite number"
            raise LayerDiffError(f"{name} must be {what} from {span}{hint}")
        if value < rule.lo:
            raise LayerDiffError(f"{name} must be {_limit(rule.lo)} or more ({span}{extra})")
        if value > rule.hi:
            raise LayerDiffError(f"{name} must be {_limit(rule.hi)} or less ({span}{extra})")
    elif rule.kind == "ints":
        if not (isinstance(value, (list, tuple)) and len(value) <= 16
                and all(type(v) is int and rule.lo <= v <= rule.hi for v in value)):
            raise LayerDiffError(f"{name} must be a list of up to 16 integers from {span}{hint}")
    elif rule.kind == "weights":
        def layer_count(k) -> bool:
            digits = isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 3
            return (type(k) is int or digits) and rule.lo <= int(k) <= rule.hi

        if not (isinstance(value, dict) and value and all(layer_count(k) for k in value)
                and all(_number_ok(v, "float") and 0 <= v <= 100 for v in value.values())):
            raise LayerDiffError(f"{name} must map layer counts {span} to weights from 0 to 100{hint}")
    elif rule.kind == "paths":
        items = [value] if isinstance(value, str) else value
        if not (isinstance(items, (list, tuple)) and 1 <= len(items) <= MAX_PATHS
                and all(isinstance(p, str) and p and "\0" not in p for p in items)):
            raise LayerDiffError(f"{name} must be a folder of .tar shards, one .tar shard or a list of up to "
                                 f"{MAX_PATHS} of them{hint}")
    elif rule.kind == "prompts":
        check_sample_prompts(value, f"{where}{key}")


def check_sample_prompts(value, name: str = "sample_prompts", max_layers: int | None = None) -> None:
    """A list of prompt sets ``{"global": str, "layers": [background, foreground, ...]}``; the
    message names the entry at fault (``name[i]``) and shows the form."""
    example = '[{"global": "a red star in front of a brick wall", "layers": ["a brick wall", "a red star"]}]'
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_SAMPLE_PROMPTS:
        raise LayerDiffError(f"{name} {_show(value)} must be a list of 1 to {MAX_SAMPLE_PROMPTS} prompt sets, "
                             f"e.g. {example}")
    for i, entry in enumerate(value):
        at = f"{name}[{i}] {_show(entry)}"
        if not isinstance(entry, dict) or set(entry) != {"global", "layers"}:
            raise LayerDiffError(f'{at} must be an object with exactly the keys "global" and "layers", e.g. '
                                 f"{example[1:-1]}")
        glob, layers = entry["global"], entry["layers"]
        if not isinstance(glob, str) or not glob.strip() or len(glob) > MAX_PROMPT_CHARS:
            raise LayerDiffError(f'{at}: "global" must be a non-empty text of at most {MAX_PROMPT_CHARS} characters '
                                 "describing the whole scene, e.g. \"a red star in front of a brick wall\"")
        if not isinstance(layers, (list, tuple)) or not layers:
            raise LayerDiffError(f'{at}: "layers" must be a list of layer prompts, the background first, e.g. '
                                 '["a brick wall", "a red star"]')
        for j, text in enumerate(layers):
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_PROMPT_CHARS:
                what = "the background" if j == 0 else f"foreground {j}"
                raise LayerDiffError(f'{at}: "layers"[{j}] {_show(text)} ({what}) must be a non-empty text of at '
                                     f"most {MAX_PROMPT_CHARS} characters describing that layer")
        if max_layers is not None and len(layers) > max_layers:
            raise LayerDiffError(f'{at}: {len(layers)} layers but this model makes at most {max_layers} (the '
                                 f"background and {max_layers - 1} foregrounds): remove {len(layers) - max_layers} "
                                 "layer prompt(s)")


def check_settings(values: dict, rules: dict[str, Setting], where: str = "") -> None:
    """:func:`check_setting` for every key of ``values`` that ``rules`` knows."""
    for key, value in values.items():
        if key in rules:
            check_setting(key, value, rules[key], where)


# The range of every TrainConfig field: wide enough for any sensible run, narrow enough that a typo
# (a sign, a few digits too many, a string) is refused before anything loads.
TRAIN_SETTINGS = {
    "steps": Setting("int", 1, MAX_STEPS, hint="optimizer steps"),
    "batch_size": Setting("int", 1, 1024, hint="samples per process and micro-batch"),
    "gradient_accumulation_steps": Setting("int", 1, 1024, hint="micro-batches per optimizer step, e.g. 4"),
    "lr_base": Setting("float", 0.0, 1.0, hint="learning rate of the SD weights, e.g. 1e-5"),
    "lr_new": Setting("float", 0.0, 1.0, hint="learning rate of the new modules, e.g. 1e-4"),
    "lr_text": Setting("float", 0.0, 1.0, hint="learning rate of the text encoder; 0 = frozen"),
    "warmup_steps": Setting("int", 0, MAX_STEPS),
    "weight_decay": Setting("float", 0.0, 10.0, hint="e.g. 0.01"),
    "grad_clip": Setting("float", 0.0, 1e6, hint="0 = off, e.g. 1"),
    "ema_decay": Setting("float", 0.0, 0.999999, hint="0 = off, e.g. 0.999"),
    "ema_on_cpu": Setting("bool"),
    "gradient_checkpointing": Setting("bool", hint="recompute activations in the backward pass: less memory"),
    "freeze_base": Setting("bool"),
    "drop_all": Setting("float", 0.0, 1.0, hint="share of samples with all prompts dropped, e.g. 0.1"),
    "drop_layers": Setting("float", 0.0, 1.0, hint="share of samples with layer prompts dropped, e.g. 0.05"),
    "layer_weights": Setting("weights", 1, 16, hint='e.g. {"2": 1, "3": 2, "4": 3}'),
    "mixed_precision": Setting("choice", choices=("no", "fp16", "bf16")),
    "size": Setting("int", 8, 2048, hint="training resolution in pixels, a multiple of 8"),
    "seed": Setting("int", 0, MAX_SEED),
    "log_every": Setting("int", 1, MAX_STEPS),
    "checkpoint_every": Setting("int", 1, MAX_STEPS),
    "keep_checkpoints": Setting("int", 1, 1000),
    "sample_every": Setting("int", 0, MAX_STEPS, hint="0 = no sample grids"),
    "sample_prompts": Setting("prompts", optional=True),
    "num_workers": Setting("int", 0, 64, hint="data loader processes"),
    "shuffle_buffer": Setting("int", 0, 1_000_000, hint="encoded samples shuffled among; 0 = no shuffling, e.g. 256"),
    "validation_data": Setting("paths", hint='e.g. "data/val" or ["val/a.tar", "val/b.tar"]', optional=True),
    "val_every": Setting("int", 0, MAX_STEPS, hint="0 = no validation, e.g. 1000"),
    "val_samples": Setting("int", 1, 100_000, hint="validation samples, e.g. 64"),
    "cache_latents": Setting("bool"),
    "bucket_layers": Setting("bool"),
    "snr_gamma": Setting("float", 0.0, 1000.0, hint="0 = off, e.g. 5"),
    "lr_schedule": Setting("choice", choices=LR_SCHEDULES),
    "intra_gate_init": Setting("float", -10.0, 10.0, hint="null keeps the gates shut, e.g. 1.0", optional=True),
    "offset_noise": Setting("float", 0.0, 10.0, hint="0 = off, e.g. 0.1"),
    "layout_weight": Setting("float", 0.0, 100.0, hint="0 = off, e.g. 0.5 (a model with layout_prior)"),
    "lr_layout": Setting("float", 0.0, 1.0, hint="null = lr_new, e.g. 3e-3", optional=True),
}


def cosine_scale(frac: float) -> float:
    """Cosine decay from 1 (``frac`` 0) to 0.1 (``frac`` 1 and beyond)."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@dataclass
class VaeTrainConfig:
    """Settings of :func:`layerdiff.training.vae.train_vae` (a full VAE stage, or the decoder alone)."""

    steps: int = 1500
    batch_size: int = 16
    crop: int = 64
    lr: float = 5e-4
    kl_weight: float = 1e-6
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50
    images: int = 2000  # data-set images (layers and masks) held in memory for crops
    # Probability that a crop of a foreground or mask image is centred (with jitter) on its object:
    # objects cover a small part of their layer, and random crops would mostly show the grey fill.
    focus: float = 0.75
    # Loss weight of a foreground layer's object pixels (1 = uniform): objects are a few percent of
    # the pixels but carry the colour the model is judged on.
    object_weight: float = 1.0
    # Extra loss weight of the pixels on an object's outline (one pixel either side of the edge) in
    # foreground layers and mask images (1 = off): a blurred outline moves the object's edge in the
    # decoded layer away from its mask's, and small shapes lose their corners.
    edge_weight: float = 1.0
    # False: decode the posterior mean (a plain autoencoder with a small KL pull on the means),
    # which learns exact colours much faster than decoding noisy posterior samples.
    sample_posterior: bool = True
    lr_schedule: str = "constant"  # constant | cosine (to 10% of lr at the last step)
    # Decoder fine-tuning (after the VAE is trained): the encoder is frozen, so latents cached from
    # it stay valid, and the decoder learns to decode latents perturbed by Gaussian noise of up to
    # ``latent_noise`` (in units of the scaled latents, per sample uniform in [0, latent_noise]) to
    # the clean image: a diffusion model's samples are never exactly on the encoder's manifold.
    # In a full VAE stage the unit is the batch's latent spread over all channels: the encoder
    # then cannot outgrow the noise by scaling up, and a channel kept far below the others' spread
    # (as colour channels drift to) is drowned, as the diffusion noise would drown it.
    decoder_only: bool = False
    latent_noise: float = 0.0
    # How the trained VAE's latents are scaled for the UNet (set at the end of a full VAE run):
    # "global" = one scaling_factor, 1 / std of all latents (SD 1.5's form); "channel" = each
    # channel shifted by its mean and divided by its std (diffusers' latents_mean / latents_std), so
    # every channel reaches the UNet with unit spread. A VAE is free to put most of its variance in
    # one channel; under one global scale its other channels, which carry colour, sit far below the
    # diffusion noise. The toy recipe keeps "global".
    latent_stats: str = "global"
    # Scale-equivariance regularisation (Skorokhodov et al. 2025, "Improving the Diffusability of
    # Autoencoders"): the latents average-pooled 2x2 must decode to the image average-pooled 2x2,
    # with this loss weight (0 = off). It takes out of the latents the high-frequency detail that the
    # image itself does not have. The toy recipe uses weight 1 at 2x2 and 4x4.
    scale_equivariance: float = 0.0
    # The pooling factors it is taught at (the loss is their mean); a factor as large as the
    # crop's latent size pools to one latent pixel, whose decoding must be the crop's mean colour.
    scale_equivariance_factors: tuple[int, ...] = (2,)
    # Texture statistics loss weight (0 = off): the decoded image's local detail energy (mean
    # absolute difference of neighbouring pixels, at full and half resolution, per 8x8 patch) must
    # match the image's. A pixel loss alone decodes a random texture (grass blades, stars, mortar)
    # to its blurred mean; this asks for detail of the right amount where the image has it, without
    # asking for its exact phase.
    texture_weight: float = 0.0
    # Weight, within the texture loss, of the same match over the whole crop (0 = per patch only).
    # A sparse texture (stars, snow flakes) leaves most 8x8 patches empty, so a per-patch L1 match,
    # whose optimum for an unknown phase is the median patch, asks for no dots at all; over the whole
    # crop the amount of detail is nearly the same from crop to crop, and the decoder is asked to
    # draw it.
    texture_crop_weight: float = 0.0
    # Weight of a sharpness match (0 = off), on background images only: each crop's mean magnitude
    # of the Laplacian (second differences) must match the image's. First differences are met as
    # well by soft blobs as by the one-pixel dots and lines of stars, snow flakes and grain; the
    # Laplacian tells them apart. Foreground layers and masks are left out: their crops are flat
    # grey or black and white, and the decoder would meet it there with speckles and mask noise.
    texture_sharpness_weight: float = 0.0

    def __post_init__(self):
        check_settings({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, VAE_SETTINGS, "VAE ")
        if self.crop % 8:
            raise LayerDiffError(f"VAE crop {self.crop} is not a multiple of 8: use e.g. {self.crop // 8 * 8 or 8}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "vae.", **fixed) -> VaeTrainConfig:
        """Settings from JSON (the recipe's "vae" or "decoder"): every key known, every value of its
        type and in its range; ``fixed`` adds settings that are not the user's (the seed)."""
        if not isinstance(data, dict):
            raise LayerDiffError(f"{where.rstrip('.')} must be a JSON object of VAE settings, got {json.dumps(data)[:40]}")
        known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown and unknown[0] in fixed:
            raise LayerDiffError(f"{where}{unknown[0]} cannot be set here: the command line sets it (--{unknown[0]})")
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LayerDiffError(f"unknown VAE setting {where}{unknown[0]!r}{hint}: use some of {sorted(known)}")
        check_settings(data, VAE_SETTINGS, where)
        return cls(**data, **fixed)


VAE_SETTINGS = {
    "steps": Setting("int", 1, MAX_STEPS, hint="optimizer steps"),
    "batch_size": Setting("int", 1, 1024, hint="crops per step"),
    "crop": Setting("int", 8, 2048, hint="crop side in pixels, a multiple of 8"),
    "lr": Setting("float", 0.0, 1.0, hint="e.g. 5e-4"),
    "kl_weight": Setting("float", 0.0, 1000.0, hint="e.g. 1e-6"),
    "seed": Setting("int", 0, MAX_SEED),
    "checkpoint_every": Setting("int", 1, MAX_STEPS),
    "log_every": Setting("int", 1, MAX_STEPS),
    "images": Setting("int", 1, 50_000, hint="data-set images held in memory for crops"),
    "focus": Setting("float", 0.0, 1.0, hint="chance a crop is centred on an object"),
    "object_weight": Setting("float", 0.0, 10_000.0, hint="1 = no extra weight"),
    "edge_weight": Setting("float", 0.0, 10_000.0, hint="1 = no extra weight"),
    "sample_posterior": Setting("bool"),
    "lr_schedule": Setting("choice", choices=LR_SCHEDULES),
    "decoder_only": Setting("bool"),
    "latent_noise": Setting("float", 0.0, 100.0, hint="0 = off, e.g. 0.6"),
    "texture_weight": Setting("float", 0.0, 1000.0, hint="0 = off, e.g. 1"),
    "texture_crop_weight": Setting("float", 0.0, 1000.0, hint="0 = per 8x8 patch only, e.g. 1"),
    "texture_sharpness_weight": Setting("float", 0.0, 1000.0, hint="0 = off, e.g. 10"),
    "latent_stats": Setting("choice", choices=("global", "channel")),
    "scale_equivariance": Setting("float", 0.0, 10_000.0, hint="0 = off, e.g. 1"),
    "scale_equivariance_factors": Setting("ints", 1, 1024, hint="pooling factors, e.g. [2, 4]"),
}
