"""LayerDiff model parts: the layered UNet, its layer modules and the prompt enhancer."""

from layerdiff.model.enhancer import PromptEnhancer
from layerdiff.model.layers import (
    InterLayerAttention,
    IntraLayerAttention,
    LayerContext,
    LayeredTransformerBlock,
)
from layerdiff.model.unet import LayerDiffUNet

__all__ = [
    "InterLayerAttention",
    "IntraLayerAttention",
    "LayerContext",
    "LayerDiffUNet",
    "LayeredTransformerBlock",
    "PromptEnhancer",
]
