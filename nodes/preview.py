"""Sampler previews for ComfyUI's progress bar: a cheap composite of a step's predicted latents."""

from __future__ import annotations

import torch

from layerdiff.sampling import read_masks


class PreviewDecoder:
    """Cheap preview of a sampler step: predicted x0 (B, L, 8, h, w) -> composite RGB (h, w, 3) in
    0..1 of sample 0, at latent resolution, without a VAE decode.

    Colours: a linear latent -> RGB map fitted (least squares) on the latents of flat colour images
    (the corners of the RGB cube and mid grey), so it works for any VAE, like ComfyUI's
    latent_rgb_factors. Masks: the mask-axis projection of self-mask guidance (sampling.read_masks).
    Built once per run (one small VAE encode), then an einsum per step.
    """

    def __init__(self, model):
        colours = torch.tensor(
            [[r, g, b] for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)] + [[0.5, 0.5, 0.5]]
        )  # (9, 3)
        size = model.vae_scale_factor * 4
        flat = (colours * 2 - 1)[:, :, None, None].expand(-1, -1, size, size)  # (9, 3, S, S)
        lat = model.encode_images(flat).float().mean(dim=(2, 3)).cpu()  # (9, 4)
        design = torch.cat([lat, torch.ones(len(lat), 1)], dim=1)  # (9, 5): latent + bias
        gram = design.T @ design  # ridge keeps a near-degenerate (random) VAE's map bounded
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0])
        self.factors = torch.linalg.solve(gram + ridge, design.T @ colours)  # (5, 3)
        self.white, self.black = (t.float().cpu() for t in model.mask_axis())

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0[0].detach().float().cpu()  # (L, 8, h, w)
        w = self.factors
        rgb = (torch.einsum("lchw,cd->lhwd", x[:, :4], w[:4]) + w[4]).clamp(0, 1)  # (L, h, w, 3)
        masks = read_masks(x[None], self.white, self.black)[0].clamp(0, 1)  # (L-1, h, w)
        out = rgb[0]
        for k in range(1, x.shape[0]):  # back to front, METHOD.md section 1
            m = masks[k - 1, ..., None]
            out = m * rgb[k] + (1 - m) * out
        return out
