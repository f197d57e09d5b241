"""Load LayerDiff: a model bundle (LAYERDIFF_MODEL) from a built-in name or models/layerdiff."""

from __future__ import annotations

import logging
import os

from layerdiff.errors import CheckpointError
from layerdiff.io.checkpoint import DEFAULT_MODEL, builtin_names, check_model, load_model

from . import _host

logger = logging.getLogger("layerdiff.nodes")

NONE = "none"
DTYPES = ["auto", "fp32", "fp16", "bf16"]
DEVICES = ["auto", "cpu", "gpu"]


def _model_choices() -> list[str]:
    return builtin_names() + _host.model_files()


def _missing_model(model_name) -> str | None:
    """Why model_name cannot be loaded (None: it can, or it is a linked input checked later)."""
    if model_name is None or model_name in builtin_names() or _host.model_path(model_name) is not None:
        return None
    folders = ", ".join(_host.model_folders())
    return (
        f"model_name {model_name!r} is neither a built-in model ({', '.join(builtin_names())}) nor a file in "
        f"models/layerdiff ({folders}): copy the .safetensors file there and press R, or pick another"
    )


class LayerDiffLoader:
    DESCRIPTION = (
        "Loads a LayerDiff model: a built-in one (layerdiff-toy when installed; tiny and toy-random have random "
        "weights, for tests) or a LayerDiff .safetensors file from models/layerdiff (extra_model_paths.yaml: key "
        "'layerdiff'). A file without its own VAE and text encoder takes them from the SD 1.5 base checkpoint."
    )
    CATEGORY = "LayerDiff/loaders"
    RETURN_TYPES = ("LAYERDIFF_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The LayerDiff model bundle (layered UNet, prompt enhancer, text encoder, VAE).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = _model_choices()
        default = DEFAULT_MODEL if DEFAULT_MODEL in names else names[0]
        return {
            "required": {
                "model_name": (names, {"default": default, "tooltip": (
                    "Built-in model or a file in models/layerdiff. Put new files there and press R (refresh).")}),
                "base_checkpoint": ([NONE] + _host.checkpoint_files(), {"default": NONE, "tooltip": (
                    "SD 1.5 checkpoint (models/checkpoints) giving the VAE and text encoder to a LayerDiff file "
                    "that has none. 'none' for full files and built-in models.")}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": (
                    "Weight precision. auto: ComfyUI's choice for the device (fp32 on a CPU, fp16/bf16 on a GPU).")}),
                "device": (DEVICES, {"default": "auto", "tooltip": (
                    "Where the model runs. auto: ComfyUI's device. ComfyUI loads it there when a node needs it, "
                    "unloading other models as far as needed, and offloads it when they need the memory.")}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        # listing model_name here replaces ComfyUI's "value not in list" check with this clearer one
        return _missing_model(model_name) or True

    def load(self, model_name, base_checkpoint=NONE, dtype="auto", device="auto"):
        if model_name in builtin_names():
            source, size = model_name, 0
        else:
            source = _host.model_path(model_name)
            if source is None:
                raise CheckpointError(_missing_model(model_name))
            size = os.path.getsize(source)
        base = None
        if base_checkpoint != NONE:
            base = _host.checkpoint_path(base_checkpoint)
            if base is None:
                raise CheckpointError(
                    f"base_checkpoint {base_checkpoint!r} is not in models/checkpoints: copy it there and press R, "
                    f"or choose '{NONE}'"
                )
            size += os.path.getsize(base)
        torch_device = _host.torch_device(device)
        torch_dtype = _host.torch_dtype(dtype, torch_device, parameters=size // 2)
        if model_name not in builtin_names():  # a bad or too large file fails before other models are unloaded
            check_model(source, torch_dtype)
        logger.info("loading LayerDiff %s (base %s) for %s as %s", model_name, base_checkpoint, torch_device, torch_dtype)
        model = load_model(source, base=base, device=_host.staging_device(torch_device), dtype=torch_dtype)
        return (_host.manage(model, torch_device),)


BASE_WEIGHTS = ["model", "layerdiff"]


class LayerDiffApplyModel:
    DESCRIPTION = (
        "Puts a LayerDiff file (a full SD 1.5 LayerDiff or an adapter: layer modules only) on your own SD 1.5 "
        "checkpoint: connect MODEL, CLIP and VAE from Load Checkpoint, after any Load LoRA nodes. The prompts go "
        "through your CLIP (Set Last Layer is followed), layers and masks through your VAE."
    )
    CATEGORY = "LayerDiff/loaders"
    RETURN_TYPES = ("LAYERDIFF_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The LayerDiff model bundle on your checkpoint's weights, for Layered KSampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD 1.5 MODEL (Load Checkpoint, then any LoRA loaders)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint (after the same LoRA loaders)."}),
                "vae": ("VAE", {"tooltip": "The VAE that encodes and decodes the layers and masks."}),
                "layerdiff_name": (_host.model_files(), {"tooltip": (
                    "An SD 1.5 LayerDiff file or adapter in models/layerdiff. Put new files there and press R.")}),
                "base_weights": (BASE_WEIGHTS, {"default": "model", "tooltip": (
                    "model: the layer modules run on your MODEL's weights (your fine-tune and LoRAs; adapters allow "
                    "only this). layerdiff: a full LayerDiff file keeps the SD weights it was trained with, and "
                    "only your LoRAs' changes are added to them.")}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": (
                    "Weight precision. auto: ComfyUI's choice for the device (fp32 on a CPU, fp16/bf16 on a GPU).")}),
                "device": (DEVICES, {"default": "auto", "tooltip": "Where the model runs. auto: ComfyUI's device."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, layerdiff_name):
        if layerdiff_name is None or _host.model_path(layerdiff_name) is not None:
            return True
        folders = ", ".join(_host.model_folders())
        return (
            f"layerdiff_name {layerdiff_name!r} is not a file in models/layerdiff ({folders}): copy the SD 1.5 LayerDiff "
            ".safetensors file there and press R, or pick another"
        )

    def apply(self, model, clip, vae, layerdiff_name, base_weights="model", dtype="auto", device="auto"):
        from layerdiff.io.on_model import load_on_weights

        path = _host.model_path(layerdiff_name)
        if path is None:
            raise CheckpointError(self.VALIDATE_INPUTS(layerdiff_name))
        torch_device = _host.torch_device(device)
        tensors, deltas, text_layers = _host.sd15_weights(model, clip, vae, deltas=base_weights == "layerdiff")
        parameters = sum(t.numel() for t in tensors.values())
        torch_dtype = _host.torch_dtype(dtype, torch_device, parameters=parameters)
        # load_on_weights checks the file's header and the memory this needs (shared weights cost none)
        logger.info("applying LayerDiff %s to the MODEL (SD weights: %s) for %s as %s",
                    layerdiff_name, base_weights, torch_device, torch_dtype)
        model = load_on_weights(path, tensors, deltas=deltas, base_weights=base_weights,
                                device=_host.staging_device(torch_device), dtype=torch_dtype,
                                source="the MODEL/CLIP/VAE inputs", text_layers=text_layers, share=True)
        return (_host.manage(model, torch_device),)
