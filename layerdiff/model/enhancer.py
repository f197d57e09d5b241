"""Layer-specific prompt enhancer (METHOD.md section 2).

A small transformer in which each layer prompt's text tokens attend to the global prompt's
tokens (plus self-attention among themselves), with a learned layer-slot embedding. Its output
projection is zero-initialised and added to the layer tokens, so that at initialisation
``enhanced == layer prompt``. One enhancer is shared by all layers.

With ``layout_prior`` in the config it also holds a :class:`LayoutPrior`: where each layer prompt
puts its object, read from the prompt's words alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layerdiff.model.layers import position_features

LAYOUT_FREQUENCIES = 3  # position features of the layout prior's grid cells (4 per frequency)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.to_q(x), "s t (h d) -> s h t d", h=self.heads)
        k = rearrange(self.to_k(context), "s u (h d) -> s h u d", h=self.heads)
        v = rearrange(self.to_v(context), "s u (h d) -> s h u d", h=self.heads)
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "s h t d -> s t (h d)"))


class EnhancerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the global prompt, feed-forward."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), global_tokens)
        return x + self.ff(self.norm3(x))


class LayoutPrior(nn.Module):
    """Where a layer prompt puts its object: one coverage logit per latent pixel, from the prompt alone.

    ``readout(where(p) * max_t text(norm(word_t)))``: a bilinear map of the cell's fixed position
    features ``p`` and the layer prompt's *input word embeddings* (the text encoder's token
    embeddings, before any attention), pooled by a maximum over the words so that one word ("left")
    is not averaged away by the others. The words are detached: training the map (``layout_weight``)
    moves only its own weights, never the text encoder or the prompt states the UNet reads colours
    and shapes from. Nothing in the UNet reads the map; a sampler writes it into each foreground's
    starting noise (:mod:`layerdiff.sampling.layout_prior`).
    """

    def __init__(self, dim: int, rank: int, frequencies: int = LAYOUT_FREQUENCIES):
        super().__init__()
        self.frequencies = frequencies
        self.norm = nn.LayerNorm(dim)
        self.text = nn.Linear(dim, rank)
        self.where = nn.Linear(4 * frequencies, rank)
        self.readout = nn.Linear(rank, 1)

    def forward(self, words: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """words (N, T, D) input embeddings of N prompts -> (N, h, w) coverage logits on an h x w grid."""
        h, w = size
        dtype = self.text.weight.dtype
        t = self.text(self.norm(words.detach().to(dtype))).amax(1)  # (N, rank)
        cells = self.where(position_features(h, w, self.frequencies, t.device, dtype))  # (h*w, rank)
        return self.readout(cells[None] * t[:, None, :]).squeeze(-1).view(-1, h, w)


class PromptEnhancer(nn.Module):
    """enhanced_l = layer_l + W_out(Blocks(layer_l + slot_l; global)), W_out zero-initialised
    (and, with ``layout_prior`` > 0, a :class:`LayoutPrior` of that rank)."""

    def __init__(self, dim: int, max_layers: int, num_blocks: int = 2, head_dim: int = 64, layout_prior: int = 0):
        super().__init__()
        heads = dim // head_dim if head_dim <= dim and dim % head_dim == 0 else 1
        self.max_layers = max_layers
        self.slot_embedding = nn.Embedding(max_layers, dim)
        nn.init.normal_(self.slot_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(EnhancerBlock(dim, heads) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.layout = LayoutPrior(dim, int(layout_prior)) if layout_prior else None

    def forward(self, global_tokens: torch.Tensor, layer_tokens: torch.Tensor) -> torch.Tensor:
        """global_tokens (B, T, D), layer_tokens (B, L, T, D) -> enhanced (B, L, T, D)."""
        B, L = layer_tokens.shape[:2]
        x = layer_tokens + self.slot_embedding.weight[:L, None, :].to(layer_tokens.dtype)  # (B, L, T, D)
        x = rearrange(x, "b l t d -> (b l) t d")
        g = global_tokens.repeat_interleave(L, dim=0)  # (B*L, T, D)
        for block in self.blocks:
            x = block(x, g)
        delta = self.proj_out(self.norm_out(x))
        return layer_tokens + rearrange(delta, "(b l) t d -> b l t d", b=B)
