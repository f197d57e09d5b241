"""Layout prior: where each foreground's prompt puts its object, written into the starting noise.

A model with a layout prior (``LayerDiffConfig.layout_prior``, in its prompt enhancer) maps each
layer prompt's words to a coverage map ``p``: the chance that its object covers each latent pixel
("on the left": the left third; no position word: the data's spread). A small UNet at a small
latent reads its layout off the starting noise (whatever blob the noise happens to hold becomes the
object), so the hook writes two things into each foreground's mask channels of the starting
latents, along the axis from a black to a white mask latent, as the layout would show in the noisy
latent were its signal ``strength`` times stronger (``strength * sqrt(a_first)``):

- *where the object is not*: the negative part of the centred map, ``min(p - mean p, 0)``;
- *where it is, and how large*: a focus disk, at ``FOCUS_SHARE`` of that strength and centred, of
  about the map's expected area (``sum p``, a little smaller, since the UNet draws a strong blob
  larger than it is written), placed where the map is high, where the noise already leans towards
  a white mask, and away from the disks placed before it.

A map *pinned* in both directions (its spread along x and along y both under ``FOCUS_PINNED`` of the
side: "in the centre") names one place, not a band: its disk keeps the map's full expected area
(a smaller one does not hold the object there) and goes exactly where the map is high, whatever
the noise leans. Disks are placed from the most pinned map to the broadest, so a layer free to go
anywhere does not take the one place another layer asked for.

The map's positive part is not written: for "a small star on the left" it is the whole left third,
a broad bump that the UNet draws as one large object.

Image channels, the background, padding slots and partial starts (restyling) are left alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layerdiff.sampling.hooks import Hook

FOCUS_SHARE = 0.6  # the focus disk's strength, as a share of the layout strength
FOCUS_SHRINK = 0.75  # latent pixels taken off the disk's radius (the UNet grows a strong blob)
FOCUS_MIN_RADIUS = 1.0  # latent pixels
FOCUS_LEAN = 0.3  # weight of the noise's own lean (a z-score) against the map's log coverage
FOCUS_TAKEN = 4.0  # penalty for covering the disks placed before
FOCUS_FLOOR = 0.01  # added to the disk's mean coverage before the log
FOCUS_PINNED = 0.2  # a map whose spread along both axes is under this share of the side is pinned


def coverage(unet, layer_words: torch.Tensor | None, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """(B, L, T', D) the layer prompts' input word embeddings -> (B, L-1, h, w) foreground coverage in
    0..1, or None for a model without a layout prior (or conditioning without the words)."""
    if layer_words is None or not hasattr(unet, "layout_logits"):
        return None
    logits = unet.layout_logits(layer_words, latent_size)
    return None if logits is None else torch.sigmoid(logits[:, 1:].float())


def _disk(radius: float) -> torch.Tensor:
    """(2R+1, 2R+1) 0/1 kernel of the cells within ``radius`` of its centre."""
    R = int(math.floor(radius))
    d = torch.arange(-R, R + 1, dtype=torch.float32)
    return ((d[:, None] ** 2 + d[None, :] ** 2) <= radius * radius).float()


def map_spread(p: torch.Tensor) -> float:
    """(h, w) coverage -> the larger of its standard deviations along x and along y, as a share of
    that side (about 0.29 for a flat map, under 0.2 for a map peaked in both directions); a map
    with no coverage at all counts as flat."""
    h, w = p.shape
    p = p.float()
    if not float(p.sum()) > 0:
        p = torch.ones_like(p)
    total = p.sum()
    ys = (torch.arange(h, dtype=torch.float32, device=p.device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=p.device) + 0.5) / w
    py, px = p.sum(1) / total, p.sum(0) / total  # marginals
    var_y = (py * (ys - (py * ys).sum()) ** 2).sum()
    var_x = (px * (xs - (px * xs).sum()) ** 2).sum()
    return float(torch.maximum(var_x, var_y).sqrt())


def focus_disks(cover: torch.Tensor, lean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """cover, lean (B, K, h, w): coverage maps and the noise's lean towards a white mask (unit
    variance per cell); keep (B, K) bool -> (B, K, h, w) one 0/1 disk per kept foreground (zeros
    elsewhere), placed one layer after another from the most pinned map to the broadest."""
    B, K, h, w = cover.shape
    out = torch.zeros(B, K, h, w, device=cover.device)
    for b in range(B):
        taken = torch.zeros(1, 1, h, w, device=cover.device)
        spreads = [map_spread(cover[b, k]) for k in range(K)]
        for k in sorted(range(K), key=lambda k: (spreads[k], k)):
            if not bool(keep[b, k]):
                continue
            p = cover[b, k].float()
            pinned = spreads[k] < FOCUS_PINNED
            shrink, lean_weight = (0.0, 0.0) if pinned else (FOCUS_SHRINK, FOCUS_LEAN)
            radius = max(math.sqrt(float(p.sum()) / math.pi) - shrink, FOCUS_MIN_RADIUS)
            kernel = _disk(radius).to(cover.device)
            R = kernel.shape[-1] // 2
            stack = torch.stack([p, lean[b, k].float(), torch.ones_like(p), taken[0, 0]])[:, None]
            sums = F.conv2d(stack, kernel[None, None], padding=R)[:, 0]  # (4, h, w) sums over the disk
            inside = sums[2].clamp(min=1.0)  # cells of the disk inside the latent
            score = (torch.log(sums[0] / (math.pi * radius * radius) + FOCUS_FLOOR)
                     + lean_weight * sums[1] / inside.sqrt() - FOCUS_TAKEN * sums[3] / inside)
            centre = torch.zeros(h * w, device=cover.device)
            centre[int(score.flatten().argmax())] = 1.0
            disk = F.conv2d(centre.view(1, 1, h, w), kernel[None, None], padding=R)[0, 0].clamp(max=1.0)
            out[b, k] = disk
            taken = torch.maximum(taken, disk[None, None])
    return out


class LayoutPriorStart(Hook):
    """Adds where each foreground is not (its map's negative part) and its focus disk to its mask
    channels of the starting latents."""

    def __init__(self, strength: float, cover: torch.Tensor, mask_axis, valid: torch.Tensor, a_first: float,
                 init_sigma: float):
        white, black = mask_axis
        self.axis = (white - black).float()  # (4,)
        self.scale = strength * math.sqrt(a_first) * init_sigma
        self.cover = cover.float()
        self.keep = valid[:, 1:]
        centred = self.cover - self.cover.mean((2, 3), keepdim=True)  # (B, K, h, w)
        self.away = self._along_axis(centred.clamp(max=0.0))

    def _along_axis(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) maps -> (B, K, 4, h, w) mask-channel bias, padding slots zeroed."""
        keep = self.keep[:, :, None, None].to(maps)
        return self.scale * (maps * keep)[:, :, None] * self.axis.to(maps.device)[:, None, None]

    def start(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        unit = (self.axis / self.axis.norm().clamp(min=1e-8)).to(noise.device)
        lean = torch.einsum("bkchw,c->bkhw", noise[:, 1:, 4:].float(), unit)
        disks = focus_disks(self.cover.to(noise.device), lean, self.keep.to(noise.device))
        focus = FOCUS_SHARE * self._along_axis(disks - disks.mean((2, 3), keepdim=True))
        x = x.clone()
        x[:, 1:, 4:] += (self.away.to(x.device) + focus.to(x.device)).to(x.dtype)
        return x
