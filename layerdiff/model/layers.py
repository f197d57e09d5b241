"""The layer-collaborative parts that LayerDiff adds to every transformer block of the SD UNet.

METHOD.md section 2: after SD's spatial self-attention, *inter-layer attention* lets the L layers
of one composable image attend to each other at every spatial position (like temporal attention
in video UNets); after SD's cross-attention to the global prompt, *text-guided intra-layer
attention* lets each layer attend to its own enhanced prompt. Both start as exact no-ops
(zero-initialised output projection / zero gate), so an untrained LayerDiff equals SD per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layerdiff.errors import LayerDiffError


@dataclass
class LayerContext:
    """What the wrapped transformer blocks need beyond diffusers' own arguments.

    Travels through the UNet inside ``cross_attention_kwargs["layerdiff"]``.
    """

    num_layers: int  # L, the (padded) number of layer slots per sample
    valid: torch.Tensor  # (B, L) bool, False for empty slots
    layer_tokens: torch.Tensor | None  # (B*L, T, D) enhanced layer-prompt embeddings, or None
    all_valid: bool = False  # no empty slot anywhere: inter-layer attention needs no key mask
    latent_size: tuple[int, int] | None = None  # (h, w) of the UNet's input: the blocks' grids follow


def block_grid(tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of a transformer block's grid of ``tokens`` cells in a UNet whose input is
    ``latent_size``: the input halved (rounding up, as a stride-2 convolution with padding 1) until
    it has that many cells."""
    h, w = latent_size
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise LayerDiffError(f"a transformer block has {tokens} positions, which no downsampling of the "
                             f"{latent_size[0]}x{latent_size[1]} latent gives: the UNet is not an SD-style UNet")
    return h, w


def position_features(rows: int, cols: int, frequencies: int, device=None, dtype=None) -> torch.Tensor:
    """(rows * cols, 4 * frequencies) fixed features of each grid cell's centre (u, v) in (-1, 1):
    sin and cos of (pi / 2) 2^k u and of (pi / 2) 2^k v for k < ``frequencies``. The lowest
    frequency is monotone across the image (left/right, top/bottom) and its cosine peaks at the
    centre; the grid's size does not matter, so any image size and aspect ratio works."""
    v = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows * 2 - 1
    u = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols * 2 - 1
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    scales = (torch.pi / 2) * 2.0 ** torch.arange(frequencies, device=device, dtype=torch.float32)
    parts = [f(c.reshape(-1, 1) * scales) for c in (uu, vv) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1).to(dtype)


def _heads(dim: int, head_dim: int) -> int:
    """Number of heads of width ``head_dim`` in ``dim`` channels (one full-width head if it does not divide)."""
    return dim // head_dim if head_dim <= dim and dim % head_dim == 0 else 1


class InterLayerAttention(nn.Module):
    """Attention across the L layers at each spatial position (pre-LN, slot embedding, zero out)."""

    def __init__(self, dim: int, max_layers: int, head_dim: int = 64, width: float = 1.0):
        super().__init__()
        if not 0 < width <= 1:
            raise LayerDiffError(f"inter_layer_width {width} is out of range: use a fraction in (0, 1] (1 = full width)")
        inner = max(1, round(dim * width))  # a narrower inner width makes q/k/v/out cheaper
        self.heads = _heads(inner, head_dim)
        self.max_layers = max_layers
        self.norm = nn.LayerNorm(dim)
        self.slot_embedding = nn.Embedding(max_layers, dim)
        nn.init.normal_(self.slot_embedding.weight, std=0.02)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """hidden (B*L, N, C) -> residual update of the same shape."""
        L = ctx.num_layers
        if L > self.max_layers:
            raise LayerDiffError(f"{L} layers exceed this model's max_layers={self.max_layers}")
        x = rearrange(hidden, "(b l) n c -> (b n) l c", l=L)
        n = hidden.shape[1]
        x = self.norm(x) + self.slot_embedding.weight[:L].to(x.dtype)  # (B*N, L, C)
        q, k, v = (rearrange(p(x), "s l (h d) -> s h l d", h=self.heads) for p in (self.to_q, self.to_k, self.to_v))
        # keys of empty slots are masked out; the background slot is always valid, so no row is empty
        key_mask = None if ctx.all_valid else ctx.valid.repeat_interleave(n, dim=0)[:, None, None, :]  # (B*N,1,1,L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        out = self.to_out(rearrange(out, "s h l d -> s l (h d)"))
        return rearrange(out, "(b n) l c -> (b l) n c", n=n)


class IntraLayerAttention(nn.Module):
    """Each layer cross-attends to its own enhanced prompt; initialised from SD's cross-attention.

    ``mode="separate"`` (the paper's layout): its own pre-LN, q/k/v/out projections after SD's
    cross-attention. ``mode="shared"`` (cheaper, METHOD.md section 2): run in parallel with SD's
    cross-attention on the same normalised input, sharing its query and output projections; only
    k/v of the layer tokens are its own, so the per-token cost is one extra attention over the
    layer prompt's tokens and no extra matmul. Both start as exact no-ops (zero gate).
    """

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, mode: str = "separate"):
        super().__init__()
        if mode not in INTRA_LAYER_MODES:
            raise LayerDiffError(f"intra_layer_mode {mode!r} is not known: use one of {list(INTRA_LAYER_MODES)}")
        inner = heads * head_dim
        self.heads = heads
        self.mode = mode
        if mode == "separate":
            self.norm = nn.LayerNorm(dim)
            self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        if mode == "separate":
            self.to_out = nn.Linear(inner, dim)
        self.gate = nn.Parameter(torch.zeros(1))  # zero gate: an exact no-op until trained
        self._closed = (None, -1, None)  # (gate tensor, its version, whether it is exactly 0)

    def closed(self) -> bool:
        """Whether the gate is exactly 0 (the attention then changes nothing and is skipped). Read from
        the device once per change of the gate (a new tensor or an in-place update), not every call."""
        gate = self.gate
        if self.training or torch.is_grad_enabled():
            return False  # training needs the path (its gradient opens the gate)
        try:
            now = gate._version
        except RuntimeError:  # an inference tensor (made under torch.inference_mode, as ComfyUI loads) has none
            now = None
        tensor, version, closed = self._closed
        if tensor is not gate or version != now:
            closed = bool((gate == 0).all())
            self._closed = (gate, now, closed)
        return closed

    @torch.no_grad()
    def copy_from_cross_attention(self, attn2: nn.Module, norm2: nn.Module) -> None:
        """Start from SD's text cross-attention (the paper: 'initialised from SD')."""
        for name in ("to_q", "to_k", "to_v"):
            if hasattr(self, name):
                getattr(self, name).weight.copy_(getattr(attn2, name).weight)
        if self.mode == "separate":
            self.to_out.weight.copy_(attn2.to_out[0].weight)
            self.to_out.bias.copy_(attn2.to_out[0].bias)
            if getattr(norm2, "weight", None) is not None:
                self.norm.weight.copy_(norm2.weight)
                self.norm.bias.copy_(norm2.bias)

    def attend(self, q: torch.Tensor, layer_tokens: torch.Tensor) -> torch.Tensor:
        """Queries (B*L, heads, N, d) -> attention over the layer tokens, (B*L, heads, N, d), ungated."""
        k = rearrange(self.to_k(layer_tokens), "s t (h d) -> s h t d", h=self.heads)
        v = rearrange(self.to_v(layer_tokens), "s t (h d) -> s h t d", h=self.heads)
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, hidden: torch.Tensor, layer_tokens: torch.Tensor) -> torch.Tensor:
        """Separate mode: hidden (B*L, N, C), layer_tokens (B*L, T, D) -> residual update (B*L, N, C)."""
        if self.mode != "separate":
            raise LayerDiffError("a shared intra-layer attention runs inside its block's cross-attention")
        if self.closed():
            return torch.zeros_like(hidden)
        q = rearrange(self.to_q(self.norm(hidden)), "s n (h d) -> s h n d", h=self.heads)
        out = self.to_out(rearrange(self.attend(q, layer_tokens), "s h n d -> s n (h d)"))
        return self.gate.to(out.dtype) * out


INTRA_LAYER_MODES = ("separate", "shared")


def _shared_cross_attention(attn2: nn.Module, intra: IntraLayerAttention, x: torch.Tensor,
                            context: torch.Tensor, layer_tokens: torch.Tensor) -> torch.Tensor:
    """SD's cross-attention to the global prompt plus the gated attention to each layer's own
    prompt, sharing the query and output projections: to_out(attn(q, global) + g attn(q, layer))."""
    q = rearrange(attn2.to_q(x), "s n (h d) -> s h n d", h=attn2.heads)
    k = rearrange(attn2.to_k(context), "s t (h d) -> s h t d", h=attn2.heads)
    v = rearrange(attn2.to_v(context), "s t (h d) -> s h t d", h=attn2.heads)
    out = F.scaled_dot_product_attention(q, k, v) + intra.gate.to(q.dtype) * intra.attend(q, layer_tokens)
    out = attn2.to_out[0](rearrange(out, "s h n d -> s n (h d)"))
    return attn2.to_out[1](out)


def _check_plain_block(block: nn.Module) -> None:
    """LayerDiff rewrites the SD 1.x transformer block only; refuse anything it cannot reproduce."""
    problems = []
    if getattr(block, "norm_type", None) != "layer_norm":
        problems.append(f"norm_type={getattr(block, 'norm_type', None)!r}")
    if getattr(block, "only_cross_attention", False):
        problems.append("only_cross_attention")
    if getattr(block, "pos_embed", None) is not None:
        problems.append("positional embeddings")
    if getattr(block, "attn2", None) is None:
        problems.append("no cross-attention")
    if getattr(block, "_chunk_size", None) is not None:
        problems.append("feed-forward chunking")
    attn2 = getattr(block, "attn2", None)
    if attn2 is not None:
        if getattr(attn2, "norm_cross", None) is not None or getattr(attn2, "spatial_norm", None) is not None:
            problems.append("normalised cross-attention")
        if getattr(attn2, "residual_connection", False) or getattr(attn2, "rescale_output_factor", 1.0) != 1.0:
            problems.append("rescaled cross-attention")
    if problems:
        raise LayerDiffError(
            f"unsupported transformer block ({', '.join(problems)}): LayerDiff needs an SD 1.x-style UNet"
        )


class LayeredTransformerBlock(nn.Module):
    """SD's BasicTransformerBlock with inter-layer and intra-layer attention inserted.

    The original block's sub-modules are re-registered under their own names (norm1, attn1, ...),
    so the UNet's state-dict keys stay those of diffusers and SD weights load unchanged.
    Order: (position features, when the config has them) -> self-attn -> inter-layer attn ->
    cross-attn (global prompt) -> intra-layer attn -> FF
    (with ``intra_layer_mode="shared"`` the last two run as one, sharing query and output projections).
    """

    def __init__(self, block: nn.Module, max_layers: int, layer_head_dim: int, inter_layer_width: float = 1.0,
                 intra_layer_mode: str = "separate", position_features: int = 0):
        super().__init__()
        _check_plain_block(block)
        self.norm1, self.attn1 = block.norm1, block.attn1
        self.norm2, self.attn2 = block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        dim = block.norm1.normalized_shape[0]
        attn2 = block.attn2
        context_dim = attn2.to_k.in_features
        heads = attn2.heads
        head_dim = attn2.to_q.out_features // heads
        self.inter_layer_attn = InterLayerAttention(dim, max_layers, layer_head_dim, inter_layer_width)
        self.intra_layer_attn = IntraLayerAttention(dim, context_dim, heads, head_dim, intra_layer_mode)
        self.intra_layer_attn.copy_from_cross_attention(attn2, block.norm2)
        self.frequencies = int(position_features)
        if self.frequencies:  # zero projection: an exact no-op until trained
            self.position = nn.Linear(4 * self.frequencies, dim)
            nn.init.zeros_(self.position.weight)
            nn.init.zeros_(self.position.bias)

    # Same positional order as diffusers' BasicTransformerBlock.forward (gradient checkpointing
    # calls blocks positionally).
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep=None,
        cross_attention_kwargs: dict | None = None,
        class_labels=None,
        added_cond_kwargs=None,
    ) -> torch.Tensor:
        kwargs = dict(cross_attention_kwargs or {})
        ctx: LayerContext | None = kwargs.pop("layerdiff", None)
        kwargs.pop("scale", None)
        h = hidden_states  # (B*L, N, C)
        if self.frequencies and ctx is not None and ctx.latent_size is not None:
            rows, cols = block_grid(h.shape[1], ctx.latent_size)
            features = position_features(rows, cols, self.frequencies, h.device, h.dtype)
            h = h + self.position(features)
        h = self.attn1(self.norm1(h), encoder_hidden_states=None, attention_mask=attention_mask, **kwargs) + h
        if h.ndim == 4:
            h = h.squeeze(1)
        if ctx is not None and ctx.num_layers > 1:
            h = h + self.inter_layer_attn(h, ctx)
        layer_tokens = None if ctx is None or self.intra_layer_attn.closed() else ctx.layer_tokens
        shared = self.intra_layer_attn.mode == "shared"
        if layer_tokens is not None and shared and encoder_attention_mask is None and not kwargs:
            h = _shared_cross_attention(self.attn2, self.intra_layer_attn, self.norm2(h), encoder_hidden_states,
                                        layer_tokens) + h
        else:
            x = self.norm2(h)
            h = self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                           **kwargs) + h
            if layer_tokens is not None and shared:  # same sum, the global part through diffusers' processor
                q = rearrange(self.attn2.to_q(x), "s n (h d) -> s h n d", h=self.attn2.heads)
                a = self.intra_layer_attn.gate.to(q.dtype) * self.intra_layer_attn.attend(q, layer_tokens)
                h = h + F.linear(rearrange(a, "s h n d -> s n (h d)"), self.attn2.to_out[0].weight)
            elif layer_tokens is not None:
                h = h + self.intra_layer_attn(h, layer_tokens)
        h = self.ff(self.norm3(h)) + h
        if h.ndim == 4:
            h = h.squeeze(1)
        return h
