"""LayerDiff node pack (V1 node API): NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.

Importable without ComfyUI (tests call the node functions directly); ComfyUI services come
through ``_host``. Class names are public API once shipped: never rename, only deprecate.
"""

from __future__ import annotations

from layerdiff.deps import log_problem_once

from . import _host
from .editing import LayerDiffLayerEdit, LayerDiffLayerInpaint, LayerDiffLayerStyle, LayerDiffTransformLayer
from .io import LayerDiffLoadPSD, LayerDiffSavePSD
from .layers import LayerDiffCompositeLayers, LayerDiffLayersFromImages, LayerDiffSplitLayers
from .loading import LayerDiffApplyModel, LayerDiffLoader
from .prompting import LayerDiffLayerPrompt, LayerDiffPromptEnhancer
from .sampling import LayerDiffKSampler
from .upgrade import upgrade_request

# Literal dicts, not comprehensions: ComfyUI-Manager's scanner reads the class names from this text to map
# a workflow's missing nodes to this pack.
NODE_CLASS_MAPPINGS = {
    "LayerDiffLoader": LayerDiffLoader,
    "LayerDiffLayerPrompt": LayerDiffLayerPrompt,
    "LayerDiffPromptEnhancer": LayerDiffPromptEnhancer,
    "LayerDiffKSampler": LayerDiffKSampler,
    "LayerDiffLayerEdit": LayerDiffLayerEdit,
    "LayerDiffLayerInpaint": LayerDiffLayerInpaint,
    "LayerDiffLayerStyle": LayerDiffLayerStyle,
    "LayerDiffTransformLayer": LayerDiffTransformLayer,
    "LayerDiffCompositeLayers": LayerDiffCompositeLayers,
    "LayerDiffSplitLayers": LayerDiffSplitLayers,
    "LayerDiffLayersFromImages": LayerDiffLayersFromImages,
    "LayerDiffSavePSD": LayerDiffSavePSD,
    "LayerDiffLoadPSD": LayerDiffLoadPSD,
    "LayerDiffApplyModel": LayerDiffApplyModel,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LayerDiffLoader": "Load LayerDiff",
    "LayerDiffLayerPrompt": "Layer Prompt",
    "LayerDiffPromptEnhancer": "Prompt Enhancer",
    "LayerDiffKSampler": "Layered KSampler",
    "LayerDiffLayerEdit": "Layer Edit",
    "LayerDiffLayerInpaint": "Layer Inpaint",
    "LayerDiffLayerStyle": "Layer Style",
    "LayerDiffTransformLayer": "Transform Layer",
    "LayerDiffCompositeLayers": "Composite Layers",
    "LayerDiffSplitLayers": "Split Layers",
    "LayerDiffLayersFromImages": "Layers from Images",
    "LayerDiffSavePSD": "Save Layers as PSD",
    "LayerDiffLoadPSD": "Load PSD as Layers",
    "LayerDiffApplyModel": "Apply LayerDiff to Model",
}

_host.register_model_folder()  # models/layerdiff for folder_paths (cheap; no file scan)
_host.add_prompt_handler(upgrade_request)  # API prompts saved by earlier versions (the sampler inputs)
# One log line at load when diffusers/transformers cannot be imported; the nodes still register, and the
# nodes that build a model raise the same line (with the command that fixes it) when they run.
log_problem_once()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
