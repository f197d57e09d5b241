"""Training the toy world's small VAE (a diffusers AutoencoderKL, the class SD 1.5 uses).

SD 1.5 brings its own VAE; the built-in toy model needs one of its own. It is convolutional, so
it trains on random crops of layer images and of mask images (masks are encoded as 3-channel
images, METHOD.md section 2). Loss: L1 + MSE reconstruction + a small KL term, optionally the
texture statistics loss (:func:`texture_loss`) and scale equivariance. After training the
latent scaling factor is set to 1 / std of the latents, as SD's 0.18215 was chosen.
Its settings are :class:`layerdiff.training.settings.VaeTrainConfig`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from layerdiff.errors import LayerDiffError
from layerdiff.model.bundle import latent_affine
from layerdiff.training.settings import VaeTrainConfig, cosine_scale
from layerdiff.training.state import (
    latest_checkpoint,
    load_training_state,
    save_training_state,
    step_generator,
)

logger = logging.getLogger("layerdiff.train")


def _image_pool(data, count: int, size: int, seed: int) -> torch.Tensor:
    """Up to ``count`` layer and mask images (N, 3, S, S) in [-1, 1] from the shards."""
    from layerdiff.data.format import DamageCount, read_samples
    from layerdiff.data.reader import resolve_shards, sample_to_tensors

    pool = []
    damage = DamageCount()  # damaged samples are skipped and counted
    for sample in read_samples(resolve_shards(data), damage):
        t = sample_to_tensors(sample, size)
        pool.extend(t["images"])  # background + foregrounds (grey outside their masks)
        pool.extend(m.expand(3, -1, -1) * 2 - 1 for m in t["masks"][1:])  # masks as images
        if len(pool) >= count:
            break
    if not pool:
        why = f" ({damage.describe()})" if damage else ""
        raise LayerDiffError(f"no images found in {data}{why}: generate the toy data first")
    return torch.stack(pool[:count])


def _is_mask_image(pool: torch.Tensor) -> torch.Tensor:
    """(N,) bool: images that are masks drawn as images (every pixel black or white)."""
    return ((pool.abs() > 0.98).all(1)).flatten(1).float().mean(1) > 0.99


def _is_foreground_image(pool: torch.Tensor) -> torch.Tensor:
    """(N,) bool: foreground layers (most pixels the exact grey fill, 0 in [-1, 1])."""
    return (pool.abs() < 1e-3).all(1).flatten(1).float().mean(1) > 0.3


def _object_pixels(x: torch.Tensor, foreground: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: the object of each foreground layer (pixels away from the exact grey fill, 0)
    and of each mask image (white on black); nothing in backgrounds."""
    away_grey = (x.abs() > 0.04).any(1)
    white = (x > 0.0).all(1)
    obj = torch.where(is_mask[:, None, None], white, away_grey)
    return obj & (foreground | is_mask)[:, None, None]


def _object_centres(pool: torch.Tensor) -> torch.Tensor:
    """(N, 2) integer centre (y, x) of the object in each foreground / mask image; -1 for images
    without one (backgrounds)."""
    obj = _object_pixels(pool, _is_foreground_image(pool), _is_mask_image(pool))
    frac = obj.flatten(1).float().mean(1)
    centres = torch.full((len(pool), 2), -1, dtype=torch.long)
    ys = torch.arange(pool.shape[-2]).float()
    xs = torch.arange(pool.shape[-1]).float()
    for i in torch.nonzero((frac > 0) & (frac < 0.9)).flatten().tolist():
        m = obj[i].float()
        total = m.sum()
        centres[i, 0] = int((m.sum(1) * ys).sum() / total)
        centres[i, 1] = int((m.sum(0) * xs).sum() / total)
    return centres


def _outline(x: torch.Tensor, foreground: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) float: pixels within one pixel of an object's edge, for foreground layers (object
    = away from the grey fill) and mask images (object = white); 0 for backgrounds."""
    obj = _object_pixels(x, foreground, is_mask)[:, None].float()
    grown = torch.nn.functional.max_pool2d(obj, 3, 1, 1)
    shrunk = -torch.nn.functional.max_pool2d(-obj, 3, 1, 1)
    return grown - shrunk  # 1 on both sides of the edge


def _crop_origins(centres: torch.Tensor, idx: torch.Tensor, size: int, crop: int, focus: float,
                  g: torch.Generator) -> tuple[list[int], list[int]]:
    """Top-left corners: uniform, or (with probability ``focus``) around the image's object centre."""
    n = len(idx)
    ys = torch.randint(0, size - crop + 1, (n,), generator=g)
    xs = torch.randint(0, size - crop + 1, (n,), generator=g)
    use = (torch.rand(n, generator=g) < focus) & (centres[idx, 0] >= 0)
    jitter = torch.randint(-(crop // 4), crop // 4 + 1, (n, 2), generator=g)
    fy = (centres[idx, 0] - crop // 2 + jitter[:, 0]).clamp(0, size - crop)
    fx = (centres[idx, 1] - crop // 2 + jitter[:, 1]).clamp(0, size - crop)
    return torch.where(use, fy, ys).tolist(), torch.where(use, fx, xs).tolist()


def _checked_factors(vae, config: VaeTrainConfig, size: int) -> tuple[int, ...]:
    """The scale-equivariance pooling factors, after checking the settings against the VAE and the
    image size (a config changed after it was made is checked again here)."""
    if config.latent_stats not in ("global", "channel"):
        raise LayerDiffError(f"VAE latent_stats {config.latent_stats!r} is not known: use global or channel")
    if config.lr_schedule not in ("constant", "cosine"):
        raise LayerDiffError(f"VAE lr_schedule {config.lr_schedule!r} is not known: use constant or cosine")
    for name in ("object_weight", "edge_weight"):
        if getattr(config, name) < 0:
            raise LayerDiffError(f"VAE {name} {getattr(config, name)} must be 0 or more (1 = no extra weight)")
    if config.scale_equivariance < 0:
        raise LayerDiffError(f"VAE scale_equivariance {config.scale_equivariance} must be 0 or more (0 = off)")
    if config.crop > size:
        raise LayerDiffError(f"VAE crop {config.crop} is larger than the training images ({size} px): use {size} or less")
    latent_crop = config.crop // (2 ** (len(vae.config.block_out_channels) - 1))
    factors = tuple(int(f) for f in config.scale_equivariance_factors)
    if config.scale_equivariance > 0 and (not factors or any(f < 2 or latent_crop % f for f in factors)):
        raise LayerDiffError(
            f"VAE scale_equivariance_factors {list(config.scale_equivariance_factors)}: each must be 2 or more and "
            f"divide the crop's latent size {latent_crop} (crop {config.crop}), e.g. [2, 4]")
    return factors


def train_vae(vae, data, out: str | Path, config: VaeTrainConfig, size: int = 128, progress: bool = True):
    """Train ``vae`` in place; checkpoints in ``out/checkpoints`` (resumable); returns the vae."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    factors = _checked_factors(vae, config, size)
    pool = _image_pool(data, config.images, size, config.seed)
    centres = _object_centres(pool)
    foreground = _is_foreground_image(pool)
    is_mask = _is_mask_image(pool)
    vae.train().requires_grad_(True)
    params = list(vae.parameters())
    if config.decoder_only:
        vae.encoder.requires_grad_(False).eval()
        if getattr(vae, "quant_conv", None) is not None:
            vae.quant_conv.requires_grad_(False)
        params = [p for p in vae.parameters() if p.requires_grad]
    _, scale = latent_affine(vae)  # (1, C, 1, 1): latent noise is given in the UNet's units
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    step = 0
    ck = latest_checkpoint(out)
    if ck is not None:
        step, _ = load_training_state(ck, vae, opt, None)
        logger.info("VAE: resumed from %s (step %d)", ck, step)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="training VAE", unit="step")
    losses, t0 = [], time.time()
    while step < config.steps:
        if config.lr_schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = config.lr * cosine_scale(step / max(1, config.steps))
        g = step_generator(config.seed, step, 0, stream=3)
        idx = torch.randint(0, len(pool), (config.batch_size,), generator=g)
        c = config.crop
        ys, xs = _crop_origins(centres, idx, size, c, config.focus, g)
        x = torch.stack([pool[i, :, y : y + c, xx : xx + c] for i, y, xx in zip(idx.tolist(), ys, xs)])
        with torch.set_grad_enabled(not config.decoder_only):
            post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g) if config.sample_posterior else post.mean
        if config.latent_noise > 0:
            z = noisy_latents(z, config, scale, g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / (z[0].numel()) if not config.decoder_only else torch.zeros(())
        w = torch.ones_like(x[:, :1])
        if config.object_weight != 1.0:  # object pixels of foreground layers
            obj = (x.abs() > 0.04).any(1, keepdim=True) & foreground[idx].view(-1, 1, 1, 1)
            w = w + (config.object_weight - 1.0) * obj
        if config.edge_weight != 1.0:
            w = w + (config.edge_weight - 1.0) * _outline(x, foreground[idx], is_mask[idx])
        err = rec - x
        loss = ((err.abs() + err**2) * w).mean() + config.kl_weight * kl
        if config.texture_weight > 0:
            loss = loss + config.texture_weight * texture_loss(rec, x, crop_weight=config.texture_crop_weight)
        if config.texture_sharpness_weight > 0:
            backgrounds = ~(foreground[idx] | is_mask[idx])
            loss = loss + config.texture_sharpness_weight * sharpness_loss(rec, x, backgrounds)
        if config.scale_equivariance > 0:  # decoder-only stages learn it too (encoder frozen)
            loss = loss + config.scale_equivariance * scale_equivariance_loss(vae, z, x, factors)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % config.log_every == 0:
            logger.info("VAE step %d loss %.4f (%.2f steps/s)", step, np.mean(losses), len(losses) / (time.time() - t0))
            losses, t0 = [], time.time()
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_training_state(out, step, vae, opt, None, {}, keep=1)
    if bar is not None:
        bar.close()
    vae.eval().requires_grad_(False)
    if not config.decoder_only:  # a frozen encoder keeps its latents, and so its scale
        set_scaling_factor(vae, pool[:256], per_channel=config.latent_stats == "channel")
    return vae


def detail_energy(x: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """(N, C, H, W) images -> (N, 2, C, H/patch, W/patch): the mean absolute difference of
    neighbouring pixels (across and down, averaged) per patch, at full resolution and 2x2-pooled."""
    out = []
    for level in (x, F.avg_pool2d(x, 2)):
        p = max(1, patch // (x.shape[-1] // level.shape[-1]))
        dx = F.pad((level[..., :, 1:] - level[..., :, :-1]).abs(), (0, 1))
        dy = F.pad((level[..., 1:, :] - level[..., :-1, :]).abs(), (0, 0, 0, 1))
        out.append(F.avg_pool2d((dx + dy) / 2, p))
    return torch.stack(out, 1)


def texture_loss(rec: torch.Tensor, x: torch.Tensor, patch: int = 8, crop_weight: float = 0.0) -> torch.Tensor:
    """L1 distance of the decoded and true images' per-patch detail energy (:func:`detail_energy`):
    zero when every patch holds as much pixel-scale detail as the image, whatever its phase; plus
    ``crop_weight`` times the same distance over each whole (square) crop, which asks for a sparse
    texture's detail that no single patch can be sure of."""
    if x.shape[-1] % patch or x.shape[-2] % patch:
        raise LayerDiffError(f"VAE texture loss: crops of {x.shape[-2]}x{x.shape[-1]} px are not a multiple of {patch}")
    loss = (detail_energy(rec, patch) - detail_energy(x, patch)).abs().mean()
    if crop_weight > 0:
        side = min(x.shape[-2:])
        loss = loss + crop_weight * (detail_energy(rec, side) - detail_energy(x, side)).abs().mean()
    return loss


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, C): the mean magnitude of each channel's Laplacian (the
    4-neighbour second difference, over the interior pixels): how sharp the image's detail is."""
    k = torch.tensor([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=x.dtype, device=x.device)
    return F.conv2d(x, k.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1), groups=x.shape[1]).abs().mean((2, 3))


def sharpness_loss(rec: torch.Tensor, x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """L1 distance of the decoded and true crops' Laplacian energy (:func:`laplacian_energy`),
    counted for the crops where ``select`` (N,) is True and averaged over all N (0 with none)."""
    if min(x.shape[-2:]) < 3:
        raise LayerDiffError(f"VAE sharpness loss: crops of {x.shape[-2]}x{x.shape[-1]} px are too small: use 3 px or more")
    err = (laplacian_energy(rec) - laplacian_energy(x)).abs().mean(1)
    return (err * select.to(err.dtype)).mean()


def scale_equivariance_loss(vae, z: torch.Tensor, x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Mean over ``factors`` of the error (L1 + L2) of decoding the latents ``z`` average-pooled by
    the factor against the images ``x`` pooled alike."""
    total = 0.0
    for f in factors:
        err = vae.decode(F.avg_pool2d(z, f)).sample - F.avg_pool2d(x, f)
        total = total + (err.abs() + err**2).mean()
    return total / len(factors)


def noisy_latents(z: torch.Tensor, config: VaeTrainConfig, scale: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``z`` plus Gaussian noise, per sample of std uniform in [0, ``latent_noise``] UNet units.

    The unit is the frozen encoder's fixed scale in decoder-only stages; while the encoder learns,
    the batch's own latent spread (detached), so it cannot outgrow the noise by scaling up.
    """
    unit = 1 / scale if config.decoder_only else z.detach().std()
    sigma = torch.rand(len(z), 1, 1, 1, generator=g) * config.latent_noise * unit
    return z + sigma * torch.randn(z.shape, generator=g)


@torch.no_grad()
def set_scaling_factor(vae, images: torch.Tensor, per_channel: bool = False) -> float:
    """Scale the latents (posterior means) of ``images`` to unit spread for the UNet.

    per_channel False: ``scaling_factor`` = 1 / std of all latents (and no latents_mean/std).
    per_channel True: ``latents_mean`` / ``latents_std`` = each channel's mean and std, with
    ``scaling_factor`` 1, so every channel of the scaled latents has mean 0 and std 1.
    Returns the scaling factor.
    """
    lat = torch.cat([vae.encode(images[i : i + 32]).latent_dist.mean for i in range(0, len(images), 32)])
    if per_channel:
        mean = lat.mean(dim=(0, 2, 3))
        std = lat.std(dim=(0, 2, 3)).clamp_min(1e-4)
        vae.register_to_config(scaling_factor=1.0, latents_mean=[round(float(v), 6) for v in mean],
                               latents_std=[round(float(v), 6) for v in std])
        logger.info("VAE latent mean %s, std %s (per channel)", mean.numpy().round(3), std.numpy().round(3))
        return 1.0
    factor = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=factor, latents_mean=None, latents_std=None)
    logger.info("VAE latent scaling factor %.4f", factor)
    return factor


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor, pool: int = 1) -> float:
    """Mean absolute error (0..1 scale) of encode/decode on images (N, 3, S, S) in [-1, 1].

    ``pool`` > 1: the scale-equivariance error instead, latents average-pooled by that factor
    decoded against the images pooled alike (what ``VaeTrainConfig.scale_equivariance`` trains down).
    """
    factor = int(pool)
    errs = []
    for i in range(0, len(images), 16):
        x = images[i : i + 16]
        z = vae.encode(x).latent_dist.mean
        if factor > 1:
            z, x = F.avg_pool2d(z, factor), F.avg_pool2d(x, factor)
        errs.append(((vae.decode(z).sample - x).abs().mean() / 2).item())
    return float(np.mean(errs))
