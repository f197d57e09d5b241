"""The LayerDiff model bundle (ComfyUI type ``LAYERDIFF_MODEL``): everything sampling needs.

Holds the layered UNet (with its prompt enhancer), the VAE, the text encoder and tokenizer, and the
scheduler configuration, plus conversions between layer images/masks and layer latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from layerdiff.config import IMAGE_CHANNELS, LayerDiffConfig
from layerdiff.model.text import tokenize
from layerdiff.model.unet import LayerDiffUNet


def latent_affine(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale), each (1, C, 1, 1): the model's latents are ``(vae latent - shift) * scale``.

    The VAE's config gives them as diffusers does: ``scaling_factor`` alone (SD 1.5: shift 0, one
    scale for all channels), or per channel with ``latents_mean`` / ``latents_std`` as well
    (scale = scaling_factor / std), which gives every channel unit spread even when a VAE puts most
    of its variance in one channel (``VaeTrainConfig.latent_stats``).
    """
    cfg = vae.config
    factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        return torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), factor)
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return mean, factor / std


def to_model_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents (N, C, h, w) -> the scaled latents the UNet works in."""
    shift, scale = latent_affine(vae)
    return (z - shift.to(z)) * scale.to(z)


def from_model_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The UNet's scaled latents (N, C, h, w) -> VAE latents (inverse of :func:`to_model_latents`)."""
    shift, scale = latent_affine(vae)
    return latents / scale.to(latents) + shift.to(latents)


VAE_CHUNK_PIXELS = 2 * 512 * 512  # images per VAE call: as many as fit this many pixels (at least one)


def _chunks(n: int, height: int, width: int) -> list[slice]:
    """Slices of a batch of ``n`` images of this size, so one VAE call holds at most VAE_CHUNK_PIXELS:
    the decoder's activations (many times the image) then peak at a bounded size whatever the batch."""
    step = max(1, VAE_CHUNK_PIXELS // max(1, height * width))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


@dataclass
class LayerDiffModel:
    config: LayerDiffConfig
    unet: LayerDiffUNet
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object
    source: str = ""  # where it was loaded from (file path or built-in name)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def max_layers(self) -> int:
        return self.config.max_layers

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_factor(self) -> int:
        """Width/height of generated images must be multiples of this (VAE x UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.unet.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> LayerDiffModel:
        for module in (self.unet, self.vae, self.text_encoder):
            same = dtype is None or next(module.parameters()).dtype == dtype
            module.to(device=device) if same else module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> LayerDiffModel:
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)
        return self

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts (N) -> CLIP last hidden states (N, T, D) in the UNet's dtype."""
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        hidden = self.text_encoder(ids)[0]
        return hidden.to(self.dtype)

    @torch.no_grad()
    def embed_words(self, prompts: list[str]) -> torch.Tensor:
        """prompts (N) -> the text encoder's input token embeddings (N, T, D), before any attention
        (what the layout prior reads)."""
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        return self.text_encoder.get_input_embeddings()(ids).to(self.dtype)

    # ---------------------------------------------------------------- latents
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images (N, 3, H, W) in [-1, 1] -> scaled latents (N, 4, h, w) (posterior mean)."""
        vae_dtype = next(self.vae.parameters()).dtype
        out = []
        for part in _chunks(images.shape[0], *images.shape[-2:]):
            dist = self.vae.encode(images[part].to(self.device, vae_dtype)).latent_dist
            out.append(to_model_latents(self.vae, dist.mean).to(self.dtype))
        return torch.cat(out)

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (N, 4, h, w) -> images (N, 3, H, W) in [-1, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        f = self.vae_scale_factor
        out = []
        for part in _chunks(latents.shape[0], latents.shape[-2] * f, latents.shape[-1] * f):
            z = from_model_latents(self.vae, latents[part].to(self.device, vae_dtype))
            out.append(self.vae.decode(z).sample.float())
        return torch.cat(out)

    @torch.no_grad()
    def encode_layers(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images (B, L, H, W, 3) in 0..1, masks (B, L-1, H, W) in 0..1 -> latents (B, L, 8, h, w).

        A mask is encoded as a 3-channel image in [-1, 1]; the background's mask slot holds the
        latent of an all-white image (METHOD.md section 2).
        """
        B, L = images.shape[:2]
        full = torch.cat([torch.ones_like(masks[:, :1]), masks], dim=1)  # (B, L, H, W)
        img = rearrange(images, "b l h w c -> (b l) c h w") * 2 - 1
        msk = rearrange(full, "b l h w -> (b l) 1 h w").expand(-1, 3, -1, -1) * 2 - 1
        lat = torch.cat([self.encode_images(img), self.encode_images(msk)], dim=1)  # (B*L, 8, h, w)
        return rearrange(lat, "(b l) c h w -> b l c h w", b=B)

    @torch.no_grad()
    def decode_layers(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (B, L, 8, h, w) -> images (B, L, H, W, 3) in 0..1, soft masks (B, L-1, H, W) in 0..1."""
        B, L = latents.shape[:2]
        flat = rearrange(latents, "b l c h w -> (b l) c h w")
        img = self.decode_images(flat[:, :IMAGE_CHANNELS])
        images = rearrange((img + 1) / 2, "(b l) c h w -> b l h w c", b=B).clamp(0, 1)
        if L == 1:
            masks = images.new_zeros(B, 0, *images.shape[2:4])
        else:
            fg = rearrange(latents[:, 1:, IMAGE_CHANNELS:], "b k c h w -> (b k) c h w")
            m = self.decode_images(fg).mean(dim=1)  # (B*K, H, W), grey value of the decoded mask image
            masks = rearrange((m + 1) / 2, "(b k) h w -> b k h w", b=B).clamp(0, 1)
        return images, masks

    @torch.no_grad()
    def mask_axis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (4,) of all-white and all-black images, averaged over space: the axis on which a
        mask latent is projected to read a mask without decoding (self-mask guidance, previews)."""
        size = self.vae_scale_factor * 4
        img = torch.stack([torch.ones(3, size, size), -torch.ones(3, size, size)])
        lat = self.encode_images(img).float().mean(dim=(2, 3))  # (2, 4)
        return lat[0], lat[1]

    @torch.no_grad()
    def empty_layer_latent(self) -> torch.Tensor:
        """Latent (8,) of an empty foreground layer, averaged over space: the neutral grey fill of
        the training data (METHOD.md section 1) as image, an all-black mask (layout cleanup)."""
        size = self.vae_scale_factor * 4
        img = torch.stack([torch.zeros(3, size, size), -torch.ones(3, size, size)])
        lat = self.encode_images(img).float().mean(dim=(2, 3))  # (2, 4)
        return torch.cat([lat[0], lat[1]])
