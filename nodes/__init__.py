"""LayerDiff node pack (V1 node API): NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.

Importable without ComfyUI (tests call the node functions directly); ComfyUI services come
through ``_host``. Class names are public API once shipped: never rename, only deprecate.
"""

from __future__ import annotations

from . import _host
from .editing import LayerDiffLayerEdit, LayerDiffLayerInpaint, LayerDiffLayerStyle, LayerDiffTransformLayer
from .io import LayerDiffLoadPSD, LayerDiffSavePSD
from .layers import LayerDiffCompositeLayers, LayerDiffLayersFromImages, LayerDiffSplitLayers
from .loading import LayerDiffLoader
from .prompting import LayerDiffLayerPrompt, LayerDiffPromptEnhancer
from .sampling import LayerDiffKSampler

_NODES = [
    (LayerDiffLoader, "Load LayerDiff"),
    (LayerDiffLayerPrompt, "Layer Prompt"),
    (LayerDiffPromptEnhancer, "Prompt Enhancer"),
    (LayerDiffKSampler, "Layered KSampler"),
    (LayerDiffLayerEdit, "Layer Edit"),
    (LayerDiffLayerInpaint, "Layer Inpaint"),
    (LayerDiffLayerStyle, "Layer Style"),
    (LayerDiffTransformLayer, "Transform Layer"),
    (LayerDiffCompositeLayers, "Composite Layers"),
    (LayerDiffSplitLayers, "Split Layers"),
    (LayerDiffLayersFromImages, "Layers from Images"),
    (LayerDiffSavePSD, "Save Layers as PSD"),
    (LayerDiffLoadPSD, "Load PSD as Layers"),
]

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls, _ in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: name for cls, name in _NODES}

_host.register_model_folder()  # models/layerdiff for folder_paths (cheap; no file scan)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
