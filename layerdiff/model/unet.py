"""LayerDiff UNet: SD's UNet2DConditionModel run over a stack of layers (METHOD.md section 2).

Shapes: the model takes ``sample`` (B, L, 8, h, w): per layer 4 image latent channels and 4 mask
latent channels. Layers fold into the batch for every SD part (B*L, 8, h, w); the inserted layer
modules unfold them where layers must talk to each other.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import nn

from layerdiff.config import IMAGE_CHANNELS, LAYER_CHANNELS, LayerDiffConfig
from layerdiff.deps import require_model_libraries
from layerdiff.errors import LayerDiffError
from layerdiff.model.enhancer import PromptEnhancer
from layerdiff.model.layers import LayerContext, LayeredTransformerBlock

if TYPE_CHECKING:  # diffusers is imported where a model is built, so the node pack loads without it
    from diffusers import UNet2DConditionModel

logger = logging.getLogger("layerdiff.model")


def _widen_conv(conv: nn.Conv2d, in_channels: int | None = None, out_channels: int | None = None) -> nn.Conv2d:
    """A copy of ``conv`` with more input/output channels; the base weights fill the first slots,
    the new slots are zero (so they contribute / produce nothing at initialisation)."""
    new = nn.Conv2d(
        in_channels or conv.in_channels,
        out_channels or conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if conv.weight.device.type == "meta":
        return new
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: conv.out_channels, : conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.zero_()
            new.bias[: conv.out_channels].copy_(conv.bias)
    return new


def _wrap_transformer_blocks(unet: nn.Module, max_layers: int, layer_head_dim: int, inter_layer_width: float = 1.0,
                            intra_layer_mode: str = "separate", position_features: int = 0) -> int:
    count = 0
    for module in unet.modules():
        blocks = getattr(module, "transformer_blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for i, block in enumerate(blocks):
                if not isinstance(block, LayeredTransformerBlock):
                    blocks[i] = LayeredTransformerBlock(block, max_layers, layer_head_dim, inter_layer_width,
                                                        intra_layer_mode, position_features)
                    count += 1
    return count


class LayerDiffUNet(nn.Module):
    """The layer-collaborative denoiser: widened UNet with layer modules + prompt enhancer."""

    def __init__(self, unet: UNet2DConditionModel, prompt_enhancer: PromptEnhancer, config: LayerDiffConfig):
        super().__init__()
        self.unet = unet
        self.prompt_enhancer = prompt_enhancer
        self.config = config

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_base(cls, base: UNet2DConditionModel, config: LayerDiffConfig) -> LayerDiffUNet:
        """Turn a 4-channel SD UNet into an (untrained) LayerDiff UNet; ``base`` is consumed.

        conv_in gets zero weights for the 4 mask input channels, conv_out zero weights for the 4
        mask output channels; every new path is zero-initialised, so image channels reproduce SD.
        """
        if base.config.in_channels != IMAGE_CHANNELS or base.config.out_channels != IMAGE_CHANNELS:
            raise LayerDiffError(
                f"base UNet has {base.config.in_channels} input / {base.config.out_channels} output channels: "
                "LayerDiff starts from a 4-channel text-to-image UNet (not an inpainting or LayerDiff UNet)"
            )
        base.conv_in = _widen_conv(base.conv_in, in_channels=LAYER_CHANNELS)
        base.conv_out = _widen_conv(base.conv_out, out_channels=LAYER_CHANNELS)
        # keep the diffusers config truthful about the widened convolutions
        base.register_to_config(in_channels=LAYER_CHANNELS, out_channels=LAYER_CHANNELS)
        n = _wrap_transformer_blocks(base, config.max_layers, config.layer_head_dim, config.inter_layer_width,
                                     config.intra_layer_mode, config.position_features)
        if n == 0:
            raise LayerDiffError("base UNet has no transformer blocks: LayerDiff needs a text-conditioned SD UNet")
        text_dim = int(base.config.cross_attention_dim)  # the text encoder's width, by construction
        enhancer = PromptEnhancer(
            text_dim, config.max_layers, config.enhancer_blocks, config.enhancer_head_dim, config.layout_prior
        ).to(device=base.device, dtype=base.dtype)
        logger.debug("wrapped %d transformer blocks", n)
        return cls(base, enhancer, config)

    @classmethod
    def from_config(cls, config: LayerDiffConfig, device: str | torch.device = "cpu") -> LayerDiffUNet:
        """Random (or, with ``device="meta"``, unallocated) weights; load a checkpoint into it."""
        require_model_libraries()
        from diffusers import UNet2DConditionModel

        with torch.device(device):
            base = UNet2DConditionModel.from_config(config.unet)
            return cls.from_base(base, config)

    # ---------------------------------------------------------------- inference
    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    compute_device: torch.device | None = None  # set by a host that moves weights itself (ComfyUI lowvram)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the weights' device, or the host's compute device when it manages them."""
        return self.compute_device if self.compute_device is not None else self.unet.device

    def enhance(self, global_tokens: torch.Tensor, layer_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B, L, T, D) -> enhanced layer tokens (B, L, T, D)."""
        return self.prompt_enhancer(global_tokens, layer_tokens)

    def layout_logits(self, layer_words: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor | None:
        """(B, L, T', D) the layer prompts' input word embeddings -> (B, L, h, w): each layer's
        object-coverage logits per latent pixel from the layout prior, without running the UNet;
        None for a model without a layout prior."""
        prior = self.prompt_enhancer.layout
        if prior is None:
            return None
        B, L = layer_words.shape[:2]
        return prior(layer_words.flatten(0, 1), latent_size).view(B, L, *latent_size)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        global_tokens: torch.Tensor,
        layer_tokens: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        num_layers: torch.Tensor | list[int] | None = None,
    ) -> torch.Tensor:
        """Predict noise for every layer.

        sample (B, L, 8, h, w); timestep scalar, (B,) or (B, L); global_tokens (B, T, D);
        layer_tokens (B, L, T', D) *enhanced* layer prompts (None: no intra-layer attention);
        valid (B, L) bool or num_layers (B,) ints: which slots hold a layer (default: all).
        Returns (B, L, 8, h, w); empty slots are zero.
        """
        B, L = self._check_inputs(sample, global_tokens, layer_tokens)
        valid = self._validity(valid, num_layers, B, L, sample.device)
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(B * L)
        elif t.shape == (B,):
            t = t.repeat_interleave(L)
        elif t.shape == (B, L):
            t = t.reshape(B * L)
        else:
            raise LayerDiffError(f"timestep shape {tuple(t.shape)} must be (), ({B},) or ({B}, {L})")
        x = rearrange(sample, "b l c h w -> (b l) c h w")
        context = global_tokens.repeat_interleave(L, dim=0)  # (B*L, T, D)
        tokens = None if layer_tokens is None else rearrange(layer_tokens, "b l t d -> (b l) t d")
        ctx = LayerContext(num_layers=L, valid=valid, layer_tokens=tokens, all_valid=bool(valid.all()),
                           latent_size=(int(sample.shape[-2]), int(sample.shape[-1])))
        out = self.unet(x, t, encoder_hidden_states=context, cross_attention_kwargs={"layerdiff": ctx}).sample
        out = rearrange(out, "(b l) c h w -> b l c h w", b=B)
        return torch.where(valid[:, :, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))

    def _check_inputs(self, sample, global_tokens, layer_tokens) -> tuple[int, int]:
        if sample.ndim != 5 or sample.shape[2] != LAYER_CHANNELS:
            raise LayerDiffError(
                f"sample has shape {tuple(sample.shape)}: expected (batch, layers, {LAYER_CHANNELS}, h, w)"
            )
        B, L, _, h, w = sample.shape
        if not 1 <= L <= self.config.max_layers:
            raise LayerDiffError(
                f"sample has {L} layers: this model takes 1..{self.config.max_layers} (config.max_layers)"
            )
        if h < 1 or w < 1:
            raise LayerDiffError(f"sample has shape {tuple(sample.shape)}: latent height and width must be positive")
        dim = self.unet.config.cross_attention_dim
        if global_tokens.ndim != 3 or global_tokens.shape[0] != B or global_tokens.shape[2] != dim:
            raise LayerDiffError(
                f"global_tokens has shape {tuple(global_tokens.shape)}: expected ({B}, tokens, {dim}) "
                f"for sample {tuple(sample.shape)}"
            )
        if layer_tokens is not None and (
            layer_tokens.ndim != 4 or layer_tokens.shape[:2] != (B, L) or layer_tokens.shape[3] != dim
        ):
            raise LayerDiffError(
                f"layer_tokens has shape {tuple(layer_tokens.shape)}: expected ({B}, {L}, tokens, {dim}) "
                f"for sample {tuple(sample.shape)}"
            )
        return B, L

    @staticmethod
    def _validity(valid, num_layers, B: int, L: int, device) -> torch.Tensor:
        if valid is not None and num_layers is not None:
            raise LayerDiffError("give either valid or num_layers, not both")
        if num_layers is not None:
            n = torch.as_tensor(num_layers, device=device).reshape(-1)
            if n.shape[0] != B or bool((n < 1).any()) or bool((n > L).any()):
                raise LayerDiffError(f"num_layers {n.tolist()} must hold {B} counts in 1..{L}")
            valid = torch.arange(L, device=device)[None, :] < n[:, None]
        if valid is None:
            return torch.ones(B, L, dtype=torch.bool, device=device)
        valid = torch.as_tensor(valid, device=device).bool()
        if valid.shape != (B, L):
            raise LayerDiffError(f"valid has shape {tuple(valid.shape)}: expected ({B}, {L})")
        if not bool(valid[:, 0].all()):
            raise LayerDiffError("valid[:, 0] must be True: every sample has a background layer")
        return valid
