"""Training LayerDiff on accelerate (METHOD.md section 3).

One t per composable sample, independent noise per layer, epsilon MSE over all valid layers and all
8 channels (the background's mask channels excepted: its mask slot is a constant), CFG dropout of
prompts, mixed layer counts with oversampling, separate learning rates for base and new weights,
optional frozen base, gradient clipping, EMA, mixed precision where the device allows.

The same command runs on one CPU or, through ``accelerate launch``, on many GPUs and machines;
several CPU processes form a gloo group under ``torchrun --nproc_per_node N -m layerdiff train ...``
or ``accelerate launch --multi_gpu --num_processes N -m layerdiff train ...`` (``accelerate launch
--cpu`` starts only one process unless given an MPI host file).
Randomness is drawn per (seed, step, rank), so a resumed run continues bit-identically with
``cache_latents``; a streaming run (no cache) is exact up to its checkpoint, but after a resume its
reader starts a fresh order seeded by ``seed + step`` (skipping the consumed samples would decode
them all again), so only noise, timesteps and prompt dropout match an uninterrupted run.

Checkpoints are folders ``OUT/checkpoints/step-NNNNNN/`` holding ``state.safetensors`` (model,
EMA and optimizer tensors; the rest as JSON metadata): written to a temporary folder, then
renamed, so a killed run never leaves a half-written checkpoint; ``OUT/checkpoints/latest``
names the newest.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from layerdiff.errors import LayerDiffError
from layerdiff.io.files import read_safetensors, save_safetensors_atomic
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.model.text import tokenize

logger = logging.getLogger("layerdiff.train")

NEW_MODULE_KEYS = ("inter_layer_attn", "intra_layer_attn", "prompt_enhancer", "conv_in", "conv_out")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr_base: float = 1e-5  # SD weights (METHOD.md: 1e-5)
    lr_new: float = 1e-4  # new modules + conv_in/conv_out
    lr_text: float = 0.0  # text encoder (0 = frozen, as for SD 1.5)
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA
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
    num_workers: int = 2
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

    def __post_init__(self):
        check_settings({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, TRAIN_SETTINGS)
        self.layer_weights = {int(k): float(v) for k, v in self.layer_weights.items()}
        if self.size % 8:
            raise LayerDiffError(f"size {self.size} is not a multiple of 8: use e.g. {self.size // 8 * 8 or 8}")
        if self.drop_all + self.drop_layers > 1:
            raise LayerDiffError(f"drop_all {self.drop_all} + drop_layers {self.drop_layers} is above 1: they are "
                                 "shares of the batch, e.g. 0.1 and 0.05")

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


@dataclass(frozen=True)
class Setting:
    """The type and range of one training setting; ``hint`` says what the value means."""

    kind: str  # "int" | "float" | "bool" | "choice" | "weights" | "ints"
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


def check_settings(values: dict, rules: dict[str, Setting], where: str = "") -> None:
    """:func:`check_setting` for every key of ``values`` that ``rules`` knows."""
    for key, value in values.items():
        if key in rules:
            check_setting(key, value, rules[key], where)


# The range of every TrainConfig field: wide enough for any sensible run, narrow enough that a typo
# (a sign, a few digits too many, a string) is refused before anything loads.
TRAIN_SETTINGS = {
    "steps": Setting("int", 1, MAX_STEPS, hint="optimizer steps"),
    "batch_size": Setting("int", 1, 1024, hint="samples per step"),
    "lr_base": Setting("float", 0.0, 1.0, hint="learning rate of the SD weights, e.g. 1e-5"),
    "lr_new": Setting("float", 0.0, 1.0, hint="learning rate of the new modules, e.g. 1e-4"),
    "lr_text": Setting("float", 0.0, 1.0, hint="learning rate of the text encoder; 0 = frozen"),
    "warmup_steps": Setting("int", 0, MAX_STEPS),
    "weight_decay": Setting("float", 0.0, 10.0, hint="e.g. 0.01"),
    "grad_clip": Setting("float", 0.0, 1e6, hint="0 = off, e.g. 1"),
    "ema_decay": Setting("float", 0.0, 0.999999, hint="0 = off, e.g. 0.999"),
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
    "num_workers": Setting("int", 0, 64, hint="data loader processes"),
    "cache_latents": Setting("bool"),
    "bucket_layers": Setting("bool"),
    "snr_gamma": Setting("float", 0.0, 1000.0, hint="0 = off, e.g. 5"),
    "lr_schedule": Setting("choice", choices=LR_SCHEDULES),
    "intra_gate_init": Setting("float", -10.0, 10.0, hint="null keeps the gates shut, e.g. 1.0", optional=True),
    "offset_noise": Setting("float", 0.0, 10.0, hint="0 = off, e.g. 0.1"),
}


def cosine_scale(frac: float) -> float:
    """Cosine decay from 1 (``frac`` 0) to 0.1 (``frac`` 1 and beyond)."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


# ----------------------------------------------------------------------------- randomness
def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """Randomness of one (step, rank): a resumed run draws exactly what the first run drew."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + rank) * 8 + stream)


# ----------------------------------------------------------------------------- the trained module
class LayerDiffTrainModule(nn.Module):
    """UNet + text encoder under one module, so DDP syncs all trained weights; forward = loss."""

    def __init__(self, model: LayerDiffModel):
        super().__init__()
        self.unet = model.unet
        self.text_encoder = model.text_encoder
        self.layer_prompt_tokens = model.config.layer_prompt_tokens

    def forward(self, noisy, t, ids_global, ids_layers, valid, target, weight):
        # noisy/target (B, L, 8, h, w); ids_global (B, T); ids_layers (B, L, T); weight (B, L, 8, 1, 1)
        B, L = noisy.shape[:2]
        glob = self.text_encoder(ids_global)[0]  # (B, T, D)
        n = self.layer_prompt_tokens or None  # the same truncation as encode_prompts
        lay = self.text_encoder(ids_layers.flatten(0, 1)[:, :n])[0].unflatten(0, (B, L))  # (B, L, T', D)
        enhanced = self.unet.enhance(glob, lay)
        pred = self.unet(noisy, t, glob.to(noisy.dtype), enhanced.to(noisy.dtype), valid=valid)
        err = (pred.float() - target.float()) ** 2 * weight
        count = (weight > 0).to(err.dtype).expand_as(err).sum()  # loss weights scale, they do not renormalise
        return err.sum() / count.clamp(min=1)


def ema_update(ema: dict, params: dict, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place, for every trained weight (one fused
    multi-tensor op where the dtypes and device allow, instead of two small ops per weight)."""
    names = list(params)
    e = [ema[n] for n in names]
    p = [params[n].detach() for n in names]
    if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(e, p)):
        torch._foreach_lerp_(e, p, 1 - decay)
    else:
        for a, b in zip(e, p):
            a.lerp_(b.to(a.dtype), 1 - decay)


def loss_weights(valid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, L) validity -> (B, L, 8, 1, 1) loss weights: valid layers, all channels, except the
    background's mask channels (a constant white-image latent)."""
    weight = valid[:, :, None, None, None].float().expand(-1, -1, 8, 1, 1).clone()
    weight[:, 0, 4:] = 0
    return weight


class NoiseSchedule:
    """Forward process q(x_t | x_0) of the model's scheduler config (DDPM betas)."""

    def __init__(self, scheduler_config: dict):
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(scheduler_config)
        self.num_train_timesteps = sched.config.num_train_timesteps
        self.alphas_cumprod = sched.alphas_cumprod.float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def make_batch(
    latents: torch.Tensor,
    valid: torch.Tensor,
    global_prompts: list[str],
    layer_prompts: list[list[str]],
    tokenizer,
    schedule: NoiseSchedule,
    config: TrainConfig,
    gen: torch.Generator,
) -> dict:
    """Noise a batch of clean layer latents (B, L, 8, h, w) and apply prompt dropout."""
    B, L = latents.shape[:2]
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=gen)  # one t per composable sample
    noise = torch.randn(latents.shape, generator=gen)  # independent per layer
    u = torch.rand(B, generator=gen)
    if config.offset_noise > 0:  # drawn after the rest: offset 0 keeps the stream of earlier runs
        noise = noise + config.offset_noise * torch.randn(*latents.shape[:3], 1, 1, generator=gen)
    globs, lays = [], []
    for b in range(B):
        drop_all = u[b] < config.drop_all
        drop_layers = u[b] < config.drop_all + config.drop_layers
        globs.append("" if drop_all else global_prompts[b])
        lays.extend("" if drop_layers else p for p in layer_prompts[b])
    noisy = schedule.add_noise(latents.float(), noise, t)
    weight = loss_weights(valid, *latents.shape[-2:])
    if config.snr_gamma > 0:  # Min-SNR-gamma for epsilon prediction: min(SNR, gamma) / SNR
        a = schedule.alphas_cumprod[t]
        snr = a / (1 - a)
        weight = weight * (snr.clamp(max=config.snr_gamma) / snr).view(B, 1, 1, 1, 1)
    return {
        "noisy": noisy,
        "t": t,
        "ids_global": tokenize(tokenizer, globs),
        "ids_layers": tokenize(tokenizer, lays).view(B, L, -1),
        "valid": valid,
        "target": noise,
        "weight": weight,
    }


# ----------------------------------------------------------------------------- data
class LatentCache:
    """A whole (small) data set encoded once: latents (N, Lmax, 8, h, w) fp16 + prompts."""

    def __init__(self, latents, valid, global_prompts, layer_prompts):
        self.latents, self.valid = latents, valid
        self.global_prompts, self.layer_prompts = global_prompts, layer_prompts
        self.num_layers = valid.sum(1)

    def __len__(self):
        return self.latents.shape[0]

    @classmethod
    def build(cls, model: LayerDiffModel, data, size: int, path: Path, max_layers: int, batch_size: int = 32):
        from layerdiff.data.format import DamageCount, read_samples
        from layerdiff.data.reader import resolve_shards, sample_to_tensors

        if path.exists():
            return cls.load(path)
        lat_all, valid_all, gp, lp = [], [], [], []
        buf = []
        white = None  # the background's mask slot: one constant latent, encoded once

        def flush():
            # only real layers are encoded (no padded slots, no constant white masks): one VAE
            # call for the images of the buffered samples and one for their foreground masks
            nonlocal white
            if not buf:
                return
            nhwc = torch.channels_last
            imgs = torch.cat([item["images"] for item in buf])  # (sum L, 3, S, S) in [-1, 1]
            msks = torch.cat([item["masks"][1:] for item in buf])  # (sum (L-1), 1, S, S) in 0..1
            lat_img = model.encode_images(imgs.contiguous(memory_format=nhwc)).float()
            lat_msk = (model.encode_images((msks.expand(-1, 3, -1, -1) * 2 - 1).contiguous(memory_format=nhwc)).float()
                       if len(msks) else None)
            if white is None:
                white = model.encode_images(torch.ones_like(imgs[:1])).float()[0]
            lat = torch.zeros(len(buf), max_layers, 8, *lat_img.shape[-2:])
            valid = torch.zeros(len(buf), max_layers, dtype=torch.bool)
            oi = om = 0
            for b, item in enumerate(buf):
                n = item["num_layers"]
                lat[b, :n, :4] = lat_img[oi:oi + n]
                lat[b, 0, 4:] = white
                if n > 1:
                    lat[b, 1:n, 4:] = lat_msk[om:om + n - 1]
                valid[b, :n] = True
                oi, om = oi + n, om + n - 1
                gp.append(item["global_prompt"])
                lp.append(list(item["layer_prompts"]) + [""] * (max_layers - n))
            lat_all.append(lat.half())
            valid_all.append(valid)
            buf.clear()

        # the encoder's convolutions run about 1.5x faster in channels-last layout on CPU
        model.vae.to(memory_format=torch.channels_last)
        damage = DamageCount()  # damaged samples are skipped and counted, as the streaming reader does
        try:
            for sample in read_samples(resolve_shards(data), damage):
                if sample.num_layers > max_layers:
                    continue
                buf.append(sample_to_tensors(sample, size))
                if len(buf) == batch_size:
                    flush()
            flush()
        finally:
            model.vae.to(memory_format=torch.contiguous_format)
        if not lat_all:
            why = f"; {damage.describe()}" if damage else ""
            raise LayerDiffError(f"no sample of {max_layers} layers or fewer in {data}{why}: "
                                 "check the data with python -m layerdiff data inspect DIR")
        if damage:
            logger.warning("latent cache: %s", damage.describe())
        cache = cls(torch.cat(lat_all), torch.cat(valid_all), gp, lp)
        save_safetensors_atomic(
            {"latents": cache.latents, "valid": cache.valid.to(torch.uint8)},
            path,
            metadata={"prompts": json.dumps({"global": gp, "layers": lp})},
            overwrite=True,
        )
        logger.info("cached %d samples' latents in %s", len(cache), path)
        return cache

    @classmethod
    def load(cls, path: Path) -> LatentCache:
        tensors, meta = read_safetensors(path)
        prompts = json.loads(meta["prompts"])
        return cls(tensors["latents"], tensors["valid"].bool(), prompts["global"], prompts["layers"])

    def batch(self, gen: torch.Generator, batch_size: int, layer_weights: dict, bucket: bool = False) -> tuple:
        """Weighted draw with replacement (oversampling 3- and 4-layer samples); trims padding.

        With ``bucket``, the batch's layer count is drawn first (with the same overall odds) and
        all its samples have that count, so no compute goes to empty slots.
        """
        w = torch.tensor([float(layer_weights.get(int(n), 1.0)) for n in self.num_layers.tolist()])
        if bucket:
            counts = sorted(set(self.num_layers.tolist()))
            mass = torch.tensor([float(w[self.num_layers == c].sum()) for c in counts])
            chosen = counts[int(torch.multinomial(mass, 1, generator=gen))]
            w = w * (self.num_layers == chosen)
        idx = torch.multinomial(w, batch_size, replacement=True, generator=gen)
        L = int(self.num_layers[idx].max())
        return (
            self.latents[idx, :L].float(),
            self.valid[idx, :L],
            [self.global_prompts[i] for i in idx.tolist()],
            [self.layer_prompts[i][:L] for i in idx.tolist()],
        )


# ----------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {}
    scalars = {}
    for idx, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: str) -> dict:
    info = json.loads(meta)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in info["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": info["param_groups"]}


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_training_state(out: Path, step: int, module: nn.Module, optimizer, ema: dict | None, extra: dict, keep: int):
    """Atomic: write into a temporary folder, fsync, rename; then update ``latest``.

    A checkpoint folder ``step-NNNNNN`` exists complete or not at all. Temporary folders of
    earlier saves that were killed (whatever their process id) are removed first: only one
    process (the main one) saves into an output folder.
    """
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step-{step:06d}"
    for stale in [*ckdir.glob(".tmp-step-*"), *ckdir.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckdir / f".tmp-step-{step:06d}-{os.getpid()}"
    tensors = {f"model.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
    if ema:
        tensors.update({f"ema.{k}": v.cpu() for k, v in ema.items()})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update({k: v.cpu() for k, v in opt_tensors.items()})
    meta = {"step": str(step), "optimizer": opt_meta, "extra": json.dumps(extra)}
    save_safetensors_atomic(tensors, tmp / "state.safetensors", metadata=meta)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again: move the old folder aside in one rename, never half-delete it
        aside = ckdir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    latest_tmp = ckdir / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckdir / "latest")
    _fsync_dir(ckdir)
    old = sorted((p for p in ckdir.glob("step-*") if p.is_dir()), key=_step_of)  # by number, not by name
    for p in old[: max(0, len(old) - keep)]:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``latest`` names; if that pointer is missing or names no complete checkpoint,
    the complete ``step-*`` folder of the highest step (temporary folders are never used)."""
    ckdir = out / "checkpoints"
    pointer = ckdir / "latest"
    if pointer.is_file():
        path = ckdir / pointer.read_text().strip()
        if path.name.startswith("step-") and (path / "state.safetensors").is_file():
            return path
    complete = [p for p in ckdir.glob("step-*") if _step_of(p) >= 0 and (p / "state.safetensors").is_file()]
    if complete:
        path = max(complete, key=_step_of)
        logger.warning("%s names no complete checkpoint: resuming from %s", pointer, path)
        return path
    return None


def load_training_state(path: Path, module: nn.Module, optimizer, ema: dict | None) -> tuple[int, dict]:
    tensors, meta = read_safetensors(path / "state.safetensors")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    module.load_state_dict(model_sd, strict=True)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema.{k}"])
    return int(meta["step"]), json.loads(meta.get("extra", "{}"))


# ----------------------------------------------------------------------------- the loop
def param_groups(module: LayerDiffTrainModule, config: TrainConfig) -> list[dict]:
    new, base, text = [], [], []
    for name, p in module.named_parameters():
        if name.startswith("text_encoder."):
            p.requires_grad_(config.lr_text > 0)
            if config.lr_text > 0:
                text.append(p)
        elif any(k in name for k in NEW_MODULE_KEYS):
            new.append(p.requires_grad_(True))
        elif not config.freeze_base:
            base.append(p.requires_grad_(True))
        else:
            p.requires_grad_(False)
    groups = [{"params": new, "lr": config.lr_new, "name": "new"}]
    if base:
        groups.append({"params": base, "lr": config.lr_base, "name": "base"})
    if text:
        groups.append({"params": text, "lr": config.lr_text, "name": "text"})
    return groups


def make_adamw(groups: list[dict], weight_decay: float, device) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all weights instead of about ten small ops per weight) where
    torch offers it for the device: on the toy model's CPU step the per-weight loop took ~10% of
    the step time (README, Training). Same update rule; the state dict is the same either way, so a
    run resumes across the two."""
    kw = {"weight_decay": weight_decay, "betas": (0.9, 0.999)}
    if torch.device(device).type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError) as e:  # an older torch, or weights it cannot fuse
            logger.info("fused AdamW unavailable (%s); using the per-weight loop", e)
    return torch.optim.AdamW(groups, **kw)


def train(
    model: LayerDiffModel,
    data,
    out: str | Path,
    config: TrainConfig,
    sample_prompts: list | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train ``model`` (in place) on layered shards; return the exported LayerDiff file.

    Resumes from ``out/checkpoints/latest`` if present. ``stop_after`` ends the run after that
    many steps of this invocation (tests of resume).
    """
    try:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
    except ImportError as exc:
        raise LayerDiffError(
            f"training needs accelerate ({exc}): pip install -r requirements-train.txt "
            "(or pip install 'accelerate>=0.27.0'); generating does not need it"
        ) from None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision if config.mixed_precision != "no" else "no",
        cpu=_cpu_distributed(),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(config.seed)
    device = accelerator.device
    model.to(device=device)
    model.vae.requires_grad_(False).eval()
    module = LayerDiffTrainModule(model).train()
    groups = param_groups(module, config)
    optimizer = make_adamw(groups, config.weight_decay, device)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    if config.intra_gate_init is not None:  # a checkpoint, if resumed, overwrites it below
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n.endswith("intra_layer_attn.gate"):
                    p.fill_(config.intra_gate_init)
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    ema = {n: p.detach().clone().float() for n, p in trained.items()} if config.ema_decay > 0 else None
    start = 0
    ck = latest_checkpoint(out)
    if ck is not None:
        start, _ = load_training_state(ck, module, optimizer, ema)
        logger.info("resumed from %s (step %d)", ck, start)
    ddp_module, optimizer = accelerator.prepare(module, optimizer)
    schedule = NoiseSchedule(model.config.scheduler)

    cache = None
    stream = None
    if config.cache_latents:
        cache_path = out / f"latents-{config.size}.safetensors"
        if accelerator.is_main_process and not cache_path.exists():
            LatentCache.build(model, data, config.size, cache_path, model.config.max_layers)
        accelerator.wait_for_everyone()
        cache = LatentCache.load(cache_path)
    else:
        from layerdiff.data.reader import make_loader

        loader = make_loader(
            data, batch_size=config.batch_size, num_workers=config.num_workers, size=config.size,
            seed=config.seed + start, max_layers=model.config.max_layers, layer_weights=config.layer_weights,
            repeat=True, rank=rank, world_size=world,
        )
        stream = iter(loader)

    log = out / "train_log.jsonl"
    if start and accelerator.is_main_process:
        _truncate_log(log, start)  # steps after the checkpoint are trained (and logged) again
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="training", unit="step")
    losses, t0 = [], time.time()
    step = start
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    while step < end:
        gen = step_generator(config.seed, step, rank)
        if cache is not None:
            latents, valid, gp, lp = cache.batch(gen, config.batch_size, config.layer_weights, config.bucket_layers)
        else:
            b = next(stream)
            imgs = b["images"].permute(0, 1, 3, 4, 2) * 0.5 + 0.5
            latents = model.encode_layers(imgs.to(device), b["masks"][:, 1:, 0].to(device)).float()
            valid, gp, lp = b["valid"], b["global_prompt"], b["layer_prompts"]
        batch = make_batch(latents.cpu(), valid.cpu(), gp, lp, model.tokenizer, schedule, config, gen)
        batch = {k: v.to(device) for k, v in batch.items()}
        lr_scale = config.lr_scale(step)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
        with accelerator.autocast():
            loss = ddp_module(**batch)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            d = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                ema_update(ema, trained, d)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % config.log_every == 0 or step == end:
            mean = sum(losses) / len(losses)
            rate = len(losses) / max(1e-9, time.time() - t0)
            if accelerator.is_main_process:
                with open(log, "a") as f:
                    f.write(json.dumps({"step": step, "loss": round(mean, 5), "steps_per_s": round(rate, 3)}) + "\n")
            logger.info("step %d loss %.4f (%.2f steps/s)", step, mean, rate)
            losses, t0 = [], time.time()
        if step % config.checkpoint_every == 0 or step == end:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_training_state(out, step, module, optimizer.optimizer if hasattr(optimizer, "optimizer")
                                    else optimizer, ema, {"rank_count": world}, config.keep_checkpoints)
            accelerator.wait_for_everyone()
        if config.sample_every and step % config.sample_every == 0 and accelerator.is_main_process:
            _sample_grid(model, ema, trained, sample_prompts, out / "samples" / f"step-{step:06d}.png", config)
    if bar is not None:
        bar.close()
    accelerator.wait_for_everyone()
    final = out / "model.safetensors"
    if step >= config.steps and accelerator.is_main_process:
        export(model, ema, trained, final)
    accelerator.wait_for_everyone()
    return final


def _cpu_distributed() -> bool:
    """Several processes (torchrun, ``accelerate launch``) on a machine without a GPU.

    accelerate forms a gloo group of CPU processes only when asked for CPU (``cpu=True`` or
    ACCELERATE_USE_CPU); otherwise each process silently trains alone as rank 0 of 1, all of them
    writing into one output folder. One process (world size 1) keeps accelerate's own choice.
    """
    world = 1
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        try:
            world = max(world, int(os.environ.get(key, "1") or 1))
        except ValueError:
            pass
    if world <= 1:
        return False
    if torch.cuda.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def _truncate_log(log: Path, step: int) -> None:
    """Drop log lines of steps after ``step`` (a resumed run logs them again)."""
    if not log.is_file():
        return
    keep = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):
            continue
        keep.append(line)
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log)


def _swap_in(ema: dict | None, trained: dict):
    """Context: EMA weights in the live parameters (for sampling and export), then back."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if not ema:
            yield
            return
        saved = {n: p.detach().clone() for n, p in trained.items()}
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(ema[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in trained.items():
                    p.copy_(saved[n])

    return cm()


def export(model: LayerDiffModel, ema, trained, path: Path, dtype=None) -> Path:
    """The final one-file LayerDiff checkpoint (EMA weights where EMA ran)."""
    from layerdiff.io.checkpoint import save_layerdiff

    with _swap_in(ema, trained):
        return save_layerdiff(model, path, include_vae_and_text_encoder=True, overwrite=True, dtype=dtype)


@torch.no_grad()
def _sample_grid(model, ema, trained, prompts, path: Path, config: TrainConfig):
    if not prompts:
        return
    from layerdiff.pipeline import generate

    model.unet.eval()
    model.text_encoder.eval()
    try:
        with _swap_in(ema, trained):
            rows = [generate(model, p, seed=i, steps=20, mask_guidance=0.0) for i, p in enumerate(prompts)]
    finally:
        model.unet.train()
        model.text_encoder.train(config.lr_text > 0)
    save_grid(rows, path)


def save_grid(stacks: list, path: Path) -> Path:
    """Rows of composite | layers | masks for a list of one-sample stacks, as one PNG."""
    import numpy as np

    from layerdiff.io.export import atomic_write, png_bytes

    Lmax = max(s.num_layers for s in stacks)
    rows = []
    for s in stacks:
        H, W = s.height, s.width
        tiles = [s.composite()[0]] + [s.images[0, i] for i in range(s.num_layers)]
        tiles += [s.masks[0, k, :, :, None].expand(H, W, 3) for k in range(s.num_foregrounds)]
        blank = torch.full((H, W, 3), 1.0)
        tiles += [blank] * (1 + Lmax + (Lmax - 1) - len(tiles))
        rows.append(torch.cat(tiles, dim=1))
    grid = (torch.cat(rows, dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, png_bytes(np.ascontiguousarray(grid)))
    return path
