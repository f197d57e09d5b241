"""The training objective (METHOD.md section 3): one t per composable sample, independent noise per
layer, MSE of the model's prediction (the noise, or v for a v-prediction schedule) over all valid
layers and all 8 channels (the background's mask channels excepted: its mask slot is a constant),
CFG dropout of prompts, optional Min-SNR-gamma weighting and offset noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerdiff.errors import LayerDiffError
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.model.text import tokenize
from layerdiff.training.settings import TrainConfig


class LayerDiffTrainModule(nn.Module):
    """UNet + text encoder under one module, so DDP syncs all trained weights; forward = loss."""

    def __init__(self, model: LayerDiffModel, layout_weight: float = 0.0):
        super().__init__()
        self.unet = model.unet
        self.text_encoder = model.text_encoder
        self.layer_prompt_tokens = model.config.layer_prompt_tokens
        self.layout_weight = float(layout_weight)
        if self.layout_weight > 0:
            if not int(getattr(model.config, "layout_prior", 0)):
                raise LayerDiffError(f"layout_weight {layout_weight} needs a model with a layout prior: its config "
                                     "has layout_prior 0; set layout_weight to 0, or train a model whose config sets "
                                     "layout_prior (e.g. 16)")
            white, black = model.mask_axis()  # the masks of the clean latents, read without decoding
            self.register_buffer("mask_white", white, persistent=False)
            self.register_buffer("mask_black", black, persistent=False)

    def forward(self, noisy, t, ids_global, ids_layers, valid, target, weight, per_sample: bool = False,
                clean=None):
        """The weighted MSE over the batch; with ``per_sample``, each sample's own (B,) (validation).

        With ``layout_weight`` and the clean latents ``clean`` (B, L, 8, h, w), plus that weight times
        the layout loss: the binary cross-entropy of each foreground's layout-prior map (from its
        prompt's words alone) against its mask read off the clean latent. Its gradient reaches only
        the layout prior's own weights."""
        # noisy/target (B, L, 8, h, w); ids_global (B, T); ids_layers (B, L, T); weight (B, L, 8, 1, 1)
        B, L = noisy.shape[:2]
        glob = self.text_encoder(ids_global)[0]  # (B, T, D)
        n = self.layer_prompt_tokens or None  # the same truncation as encode_prompts
        lay = self.text_encoder(ids_layers.flatten(0, 1)[:, :n])[0].unflatten(0, (B, L))  # (B, L, T', D)
        enhanced = self.unet.enhance(glob, lay)
        pred = self.unet(noisy, t, glob.to(noisy.dtype), enhanced.to(noisy.dtype), valid=valid)
        err = (pred.float() - target.float()) ** 2 * weight
        count = (weight > 0).to(err.dtype).expand_as(err)  # loss weights scale, they do not renormalise
        if per_sample:
            return err.flatten(1).sum(1) / count.flatten(1).sum(1).clamp(min=1)  # (B,)
        loss = err.sum() / count.sum().clamp(min=1)
        if self.layout_weight > 0 and clean is not None:  # 0 for a batch without foregrounds
            loss = loss + self.layout_weight * self.layout_loss(self.layer_words(ids_layers), clean, valid)
        return loss

    def layer_words(self, ids_layers: torch.Tensor) -> torch.Tensor:
        """ids (B, L, T) -> the layer prompts' input word embeddings (B, L, T', D), detached (the
        layout prior reads them; its loss must not move the text encoder)."""
        n = self.layer_prompt_tokens or None
        with torch.no_grad():
            return self.text_encoder.get_input_embeddings()(ids_layers[..., :n])

    def layout_loss(self, words: torch.Tensor, clean: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy of the foregrounds' layout-prior logits (from the layer prompts'
        input word embeddings ``words`` (B, L, T', D)) against their masks read off the clean latents,
        over valid foreground layers and latent pixels."""
        from layerdiff.sampling.masks import read_masks

        logits = self.unet.layout_logits(words, tuple(clean.shape[-2:]))[:, 1:].float()  # (B, L-1, h, w)
        masks = read_masks(clean.float(), self.mask_white.float(), self.mask_black.float()).clamp(0, 1)
        bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean((2, 3))  # (B, L-1)
        keep = valid[:, 1:].to(bce.dtype)
        return (bce * keep).sum() / keep.sum().clamp(min=1)


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
        self.v_prediction = sched.config.prediction_type == "v_prediction"

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to predict: the noise, or v = sqrt(a) noise - sqrt(1 - a) x0."""
        if not self.v_prediction:
            return noise
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (B,) (Hang et al. 2023): the clean latent's error is weighed
        at most ``gamma``. For the noise: min(SNR, gamma) / SNR. For v, whose loss already weighs it
        SNR + 1 (at least 1, so the noisiest steps still teach the clean latent): min(SNR + 1, gamma) / (SNR + 1)."""
        a = self.alphas_cumprod[t]
        snr = a / (1 - a)
        if self.v_prediction:
            return (snr + 1).clamp(max=gamma) / (snr + 1)
        return snr.clamp(max=gamma) / snr


def make_batch(
    latents: torch.Tensor,
    valid: torch.Tensor,
    global_prompts: list[str],
    layer_prompts: list[list[str]],
    tokenizer,
    schedule: NoiseSchedule,
    config: TrainConfig,
    gen: torch.Generator,
    t: torch.Tensor | None = None,
) -> dict:
    """Noise a batch of clean layer latents (B, L, 8, h, w) and apply prompt dropout; ``t`` (B,)
    fixes the timesteps (validation) instead of drawing them."""
    B, L = latents.shape[:2]
    if t is None:
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
    if config.snr_gamma > 0:
        weight = weight * schedule.snr_weight(t, config.snr_gamma).view(B, 1, 1, 1, 1)
    return {
        "noisy": noisy,
        "t": t,
        "ids_global": tokenize(tokenizer, globs),
        "ids_layers": tokenize(tokenizer, lays).view(B, L, -1),
        "valid": valid,
        "target": schedule.target(latents.float(), noise, t),
        "weight": weight,
        **({"clean": latents.float()} if config.layout_weight > 0 else {}),
    }
