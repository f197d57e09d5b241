"""Layout cleanup: each foreground reduced to one object, no two foregrounds claiming one place.

Our addition to the sampler of METHOD.md section 4; a hook that rewrites the predicted clean
latents of every step after its start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from layerdiff.sampling.hooks import Hook, Step
from layerdiff.sampling.masks import PRESENCE, read_masks


def _components(hard: torch.Tensor) -> torch.Tensor:
    """8-connected components of (N, h, w) bool: a label per True pixel (the smallest flat index in
    its component), h * w where False. Min-label propagation; latent grids are small."""
    N, h, w = hard.shape
    none = float(h * w)
    idx = torch.arange(h * w, dtype=torch.float32, device=hard.device).view(1, h, w).expand(N, -1, -1)
    lab = torch.where(hard, idx, torch.full_like(idx, none))
    for _ in range(h * w):
        low = -F.max_pool2d(-lab[:, None], 3, stride=1, padding=1)[:, 0]
        new = torch.where(hard, torch.minimum(lab, low), lab)
        if torch.equal(new, lab):
            break
        lab = new
    return lab.long()


def clean_layout(
    x0: torch.Tensor,
    white: torch.Tensor,
    black: torch.Tensor,
    empty: torch.Tensor,
    strength: float = 1.0,
    priority: torch.Tensor | None = None,
    gap: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predicted clean latents with each foreground reduced to one object and no two foregrounds
    claiming the same place (layout cleanup: our addition to the sampler of METHOD.md section 4).

    x0 (B, L, 8, h, w); ``empty`` (8,) the latent of an empty foreground layer (neutral fill image,
    black mask). On the masks read from x0 (:func:`read_masks`): per foreground, every connected
    group of mask pixels (> 0.5; pixels one latent pixel apart count as one group) except the one
    with the most mask mass is emptied, with a one-pixel margin. Where several foregrounds claim a
    pixel (> :data:`PRESENCE`), the one with the least mask mass (the smaller object, in front)
    keeps it, and between equal masses the stronger mask; with ``gap``, a pixel next to another
    foreground's winning mask pixel is emptied too, as decoded masks spread a little past their
    latent pixels. ``priority`` (B, K) bool: these layers (e.g. locked ones) always win
    and are never changed; ``valid`` (B, L) bool: padding layers of a mixed batch take no part.
    ``strength`` in 0..1 blends the emptied places towards ``empty``. The background never changes.
    """
    B, L = x0.shape[:2]
    K = L - 1
    if K < 1 or strength <= 0:
        return x0
    soft = read_masks(x0, white, black)  # (B, K, h, w)
    if valid is not None:
        soft = soft * valid[:, 1:, None, None].to(soft)
    h, w = soft.shape[-2:]
    hard = soft > 0.5
    flat_hard = rearrange(hard, "b k h w -> (b k) h w")
    grown = F.max_pool2d(flat_hard[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    lab = _components(grown)  # groups of the grown mask: a one-pixel gap does not split an object
    mass = torch.zeros(B * K, h * w + 1, device=x0.device)
    mass.scatter_add_(1, lab.flatten(1), rearrange(soft.clamp(min=0) * hard, "b k h w -> (b k) (h w)"))
    best = mass[:, : h * w].argmax(dim=1)  # (B*K,)
    keep = (lab == best[:, None, None]) & grown  # the main group, grown by a pixel
    stray = grown & ~keep
    stray = F.max_pool2d(stray[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    drop = rearrange(stray & ~(keep & flat_hard), "(b k) h w -> b k h w", b=B)
    kept = (soft > PRESENCE) & ~drop  # a latent pixel partly covered decodes to mask pixels too
    if K > 1:  # overlaps between foregrounds: one layer (a priority layer first) keeps each pixel
        # the smaller object sits in front: it keeps a shared pixel whatever the mask strengths (a
        # small object inside a large one's claim would otherwise lose its whole place); equal
        # sizes fall back to the stronger mask
        amount = (soft * kept).flatten(2).sum(-1)  # (B, K) mask mass of each foreground
        front = 10.0 * (1.0 - amount / amount.amax(dim=1, keepdim=True).clamp(min=1e-6))
        score = torch.where(kept, soft + front[:, :, None, None], torch.full_like(soft, -1.0))
        if priority is not None:
            score = score + 1e3 * priority.to(score.device)[:, :, None, None].to(score.dtype) * kept
        winner = score.argmax(dim=1, keepdim=True)  # (B, 1, h, w)
        k_idx = torch.arange(K, device=x0.device).view(1, K, 1, 1)
        claimed = kept.sum(dim=1, keepdim=True) > 1
        drop = drop | (kept & claimed & (k_idx != winner))
        if gap:  # a weaker pixel next to another foreground's stronger mask pixel yields too:
            # decoded masks spread past their latent pixels, so touching latents decode overlapping
            core = torch.where(kept & ~drop & hard, score, torch.full_like(score, -1.0))
            near = F.max_pool2d(core, 3, stride=1, padding=1)  # (B, K, h, w)
            for k in range(K):
                others = torch.cat([near[:, :k], near[:, k + 1:]], dim=1).amax(dim=1)
                drop[:, k] |= kept[:, k] & (others > score[:, k])
    if priority is not None:
        drop = drop & ~priority.to(drop.device)[:, :, None, None].bool()
    if not bool(drop.any()):
        return x0
    out = x0.clone()
    fg = out[:, 1:]
    target = empty.to(x0)[None, None, :, None, None]
    d = drop[:, :, None].to(x0.dtype) * float(min(strength, 1.0))
    out[:, 1:] = fg + d * (target - fg)
    return out


class LayoutCleanup(Hook):
    """:func:`clean_layout` on the prediction of every step from ``start`` on; the step continues
    from the cleaned prediction."""

    def __init__(self, strength: float, start: int, mask_axis, empty_latent, priority, valid):
        self.strength, self.start_at = strength, start
        self.mask_axis, self.empty, self.priority, self.valid = mask_axis, empty_latent, priority, valid

    def on_prediction(self, step: Step) -> None:
        if step.index < self.start_at:
            return
        x0 = clean_layout(step.x0, *self.mask_axis, self.empty, self.strength, self.priority, valid=self.valid)
        if x0 is not step.x0:
            step.x0 = x0
            step.guided = step.eps_from(x0)
