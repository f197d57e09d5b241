"""The one door to ComfyUI internals: device and dtype policy, progress bar, interrupt, folders.

Only this module imports ``comfy.*`` and ``folder_paths``. Outside ComfyUI (tests, scripts) every
function falls back to plain behaviour: torch's own device choice, no progress bar, no interrupt,
and folders taken from :func:`set_fallback_folder` or the ``LAYERDIFF_<KIND>_DIR`` environment
variables (default: ``./output``, ``./input``, ``./temp``, ``./models/layerdiff``,
``./models/checkpoints``).
"""

from __future__ import annotations

import logging
import os
import re

import torch

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.nodes")

try:  # present only inside ComfyUI
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
    import folder_paths
except ImportError:
    model_management = comfy_utils = folder_paths = None

IN_COMFYUI = folder_paths is not None and model_management is not None

MODEL_FOLDER = "layerdiff"  # models/layerdiff, also settable in extra_model_paths.yaml
MODEL_EXTENSIONS = (".safetensors",)
PSD_EXTENSIONS = (".psd", ".psb")

_fallback_folders: dict[str, str] = {}
_FALLBACK_DEFAULTS = {
    "output": "output",
    "input": "input",
    "temp": "temp",
    MODEL_FOLDER: os.path.join("models", MODEL_FOLDER),
    "checkpoints": os.path.join("models", "checkpoints"),
}


# ---------------------------------------------------------------------------- server
def add_prompt_handler(handler) -> bool:
    """Have ComfyUI's server pass every /prompt request through ``handler`` before it validates the
    prompt; False outside ComfyUI (or a server without the hook)."""
    if not IN_COMFYUI:
        return False
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None or not hasattr(server, "add_on_prompt_handler"):
        return False
    server.add_on_prompt_handler(handler)
    return True


# ---------------------------------------------------------------------------- folders


def set_fallback_folder(kind: str, path: str | os.PathLike | None) -> None:
    """Folder used for ``kind`` (output, input, temp, layerdiff, checkpoints) when ComfyUI is
    absent; None restores the default."""
    if kind not in _FALLBACK_DEFAULTS:
        raise ValueError(f"unknown folder kind {kind!r}: use one of {sorted(_FALLBACK_DEFAULTS)}")
    if path is None:
        _fallback_folders.pop(kind, None)
    else:
        _fallback_folders[kind] = os.fspath(path)


def _fallback(kind: str) -> str:
    env = os.environ.get(f"LAYERDIFF_{kind.upper()}_DIR")
    return os.path.abspath(_fallback_folders.get(kind) or env or _FALLBACK_DEFAULTS[kind])


def folder(kind: str) -> str:
    """ComfyUI's output, input or temp directory (absolute)."""
    if IN_COMFYUI:
        getter = {
            "output": folder_paths.get_output_directory,
            "input": folder_paths.get_input_directory,
            "temp": folder_paths.get_temp_directory,
        }[kind]
        return os.path.abspath(getter())
    return _fallback(kind)


def register_model_folder() -> None:
    """Register models/layerdiff with ComfyUI, extending (never replacing) a ``layerdiff`` entry
    that extra_model_paths.yaml may already have made. Idempotent; no file scan."""
    if not IN_COMFYUI:
        return
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    folder_paths.add_model_folder_path(MODEL_FOLDER, default)  # appends after yaml paths
    paths, exts = folder_paths.folder_names_and_paths[MODEL_FOLDER]
    if isinstance(exts, set):
        exts.update(MODEL_EXTENSIONS)  # an empty set would list every file (README, .txt)
    else:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(exts) | set(MODEL_EXTENSIONS))


def _list_files(kind: str, extensions: tuple[str, ...]) -> list[str]:
    root = _fallback(kind)
    if not os.path.isdir(root):
        return []
    out = []
    for base, _dirs, files in os.walk(root):
        for f in files:
            if f.lower().endswith(extensions):
                out.append(os.path.relpath(os.path.join(base, f), root).replace(os.sep, "/"))
    return sorted(out)


def model_files() -> list[str]:
    """LayerDiff model files (.safetensors) in every models/layerdiff folder."""
    if IN_COMFYUI:
        register_model_folder()
        return folder_paths.get_filename_list(MODEL_FOLDER)
    return _list_files(MODEL_FOLDER, MODEL_EXTENSIONS)


def model_folders() -> list[str]:
    if IN_COMFYUI:
        register_model_folder()
        return list(folder_paths.get_folder_paths(MODEL_FOLDER))
    return [_fallback(MODEL_FOLDER)]


def checkpoint_files() -> list[str]:
    """SD checkpoints in models/checkpoints (base VAE/text encoder for Load LayerDiff)."""
    if IN_COMFYUI:
        return folder_paths.get_filename_list("checkpoints")
    return _list_files("checkpoints", (".safetensors", ".ckpt"))


def _full_path(kind: str, name: str) -> str | None:
    if IN_COMFYUI:
        if kind == MODEL_FOLDER:
            register_model_folder()
        return folder_paths.get_full_path(kind, name)
    root = _fallback(kind)
    path = os.path.normpath(os.path.join(root, name))
    return path if os.path.commonpath([root, path]) == root and os.path.isfile(path) else None


def model_path(name: str) -> str | None:
    return _full_path(MODEL_FOLDER, name)


def checkpoint_path(name: str) -> str | None:
    return _full_path("checkpoints", name)


def input_files(extensions: tuple[str, ...] = PSD_EXTENSIONS) -> list[str]:
    """Files in the input folder (top level, like LoadImage) with these extensions."""
    root = folder("input")
    if not os.path.isdir(root):
        return []
    names = [f for f in os.listdir(root) if f.lower().endswith(extensions) and os.path.isfile(os.path.join(root, f))]
    return sorted(names)


def input_path(name: str) -> str:
    """Full path of an input file name (ComfyUI's 'name [input]' annotations understood)."""
    if IN_COMFYUI:
        return folder_paths.get_annotated_filepath(name)
    return os.path.join(folder("input"), name)


def input_exists(name: str) -> bool:
    if IN_COMFYUI:
        return folder_paths.exists_annotated_filepath(name)
    return os.path.isfile(input_path(name))


def save_path(prefix: str, width: int = 0, height: int = 0) -> tuple[str, str, int, str]:
    """(full folder, file name base, first free counter, subfolder) for ``prefix``, with
    ComfyUI's SaveImage naming: ``<base>_<counter:05>_.<ext>``."""
    if IN_COMFYUI:
        full, base, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder("output"), width, height)
        return full, base, counter, subfolder
    out = folder("output")
    subfolder = os.path.dirname(os.path.normpath(prefix))
    base = os.path.basename(os.path.normpath(prefix))
    full = os.path.abspath(os.path.join(out, subfolder))
    if os.path.commonpath([out, full]) != out:
        raise LayerDiffError(f"filename_prefix {prefix!r} points outside the output folder {out}: use a relative prefix")
    os.makedirs(full, exist_ok=True)
    pattern = re.compile(re.escape(base) + r"_(\d+)_")
    counters = [int(m.group(1)) for f in os.listdir(full) if (m := pattern.match(f))]
    return full, base, max(counters, default=0) + 1, subfolder


# ---------------------------------------------------------------------------- devices


def torch_device(choice: str = "auto") -> torch.device:
    """'auto' (ComfyUI's compute device), 'cpu' or 'gpu'."""
    if choice == "cpu":
        return torch.device("cpu")
    if IN_COMFYUI:
        device = model_management.get_torch_device()
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if choice == "gpu" and device.type == "cpu":
        why = "ComfyUI runs on the CPU (--cpu, or no GPU found)" if IN_COMFYUI else "torch sees no GPU"
        raise LayerDiffError(f"device 'gpu' was chosen but {why}: choose device 'auto' or 'cpu'")
    if choice not in ("auto", "gpu"):
        raise LayerDiffError(f"device {choice!r} is unknown: choose auto, cpu or gpu")
    return device


def torch_dtype(choice: str, device: torch.device, parameters: int = 0) -> torch.dtype:
    """'fp32' / 'fp16' / 'bf16', or 'auto': ComfyUI's UNet dtype for this device (fp32 on a CPU)."""
    fixed = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if choice in fixed:
        return fixed[choice]
    if choice != "auto":
        raise LayerDiffError(f"dtype {choice!r} is unknown: choose auto, fp32, fp16 or bf16")
    if device.type == "cpu":
        return torch.float32
    if IN_COMFYUI:
        return model_management.unet_dtype(device=device, model_params=parameters)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def intermediate_device() -> torch.device:
    """Where node outputs live between nodes (the CPU unless ComfyUI runs with --gpu-only)."""
    return model_management.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def free_memory(required_bytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until ``required_bytes`` are free on ``device``
    (our model bundle is not managed by ComfyUI, so it must make room before loading/sampling)."""
    if IN_COMFYUI and device.type != "cpu":
        model_management.free_memory(int(required_bytes), device)


class _Weights(torch.nn.Module):
    """The bundle's modules under one root, as ComfyUI's ModelPatcher wants a model (a plain module
    whose ``device`` attribute it may set)."""

    def __init__(self, model):
        super().__init__()
        self.unet, self.vae, self.text_encoder = model.unet, model.vae, model.text_encoder


def _castable(root: torch.nn.Module) -> int:
    """Give every plain Linear / Conv / norm / Embedding layer ComfyUI's castable class of the same
    layer (comfy.ops.disable_weight_init): the same forward until ComfyUI loads the model partially
    (lowvram), when such a layer's weights stay on the offload device and are cast per call."""
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    classes = {torch.nn.Linear: ops.Linear, torch.nn.Conv2d: ops.Conv2d, torch.nn.GroupNorm: ops.GroupNorm,
               torch.nn.LayerNorm: ops.LayerNorm, torch.nn.Embedding: ops.Embedding}
    n = 0
    for module in root.modules():
        castable = classes.get(type(module))
        if castable is not None:
            module.__class__ = castable
            n += 1
    return n


def manage(model, device: torch.device):
    """Hand a loaded bundle's weights to ComfyUI's model management: a ModelPatcher of their own that
    ComfyUI loads onto ``device`` when a node needs them (:func:`ready`), offloads when other models
    need the memory, loads partially in lowvram mode, and frees with its other models. Outside
    ComfyUI the bundle is returned as it is."""
    if not IN_COMFYUI:
        return model
    import comfy.model_patcher

    offload = model_management.unet_offload_device()
    model.to(device=offload)
    weights = _Weights(model)
    _castable(weights)
    weights.device = offload
    model.host_patcher = comfy.model_patcher.ModelPatcher(weights, load_device=device, offload_device=offload)
    model.unet.compute_device = device
    return model


def staging_device(device: torch.device) -> torch.device:
    """Where a loader puts new weights: ComfyUI's offload device (:func:`manage` moves them to
    ``device`` when needed); outside ComfyUI ``device`` itself."""
    return model_management.unet_offload_device() if IN_COMFYUI else device


def ready(model, memory_required: int = 0) -> None:
    """Before a node uses the bundle's weights: ComfyUI loads them (making room for them and for
    ``memory_required`` more bytes, unloading or offloading other models as far as needed)."""
    patcher = getattr(model, "host_patcher", None)
    if patcher is not None:
        model_management.load_models_gpu([patcher], memory_required=int(memory_required))
        if getattr(patcher.model, "model_lowvram", False):
            place_leftovers(patcher.model, patcher.load_device)
    else:
        free_memory(memory_required, model.device)


def place_leftovers(root: torch.nn.Module, device: torch.device) -> int:
    """After a partial (lowvram) load: move what ComfyUI's loader leaves where it was and no layer
    casts per call (parameters held directly by modules with children, such as the intra-layer
    gates, and every buffer, such as CLIP's position ids) to ``device``. They are small. Returns
    how many tensors moved."""
    moved = 0
    for module in root.modules():
        if hasattr(module, "comfy_cast_weights"):
            continue  # cast per call by ComfyUI
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device != device:
                module._parameters[name] = torch.nn.Parameter(param.detach().to(device), param.requires_grad)
                moved += 1
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
                moved += 1
    return moved


def sampling_memory(model, batch: int, layers: int, height: int, width: int) -> int:
    """Rough bytes needed to sample and decode (layerdiff.limits.run_bytes, the estimate the library
    refuses a run by) plus ComfyUI's own minimum for inference."""
    from layerdiff.limits import run_bytes

    base = model_management.minimum_inference_memory() if IN_COMFYUI else 0
    return int(base + run_bytes(model.config, batch, layers, height, width, model.dtype))


# ---------------------------------------------------------------------------- users' models
SD15_UNET, SD15_VAE, SD15_CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
_CLIP_SKIPPED = ("text_projection", "logit_scale")


def _patched(entries, key: str) -> torch.Tensor:
    """A weight with ComfyUI's patches on it: ``entries`` is one value of ``get_key_patches()``
    (the unpatched weight with its convert function, then the patches)."""
    import comfy.lora

    weight, convert = entries[0]
    if len(entries) == 1 and convert is None:
        return weight
    out = weight.to(device="cpu", dtype=torch.float32, copy=True)
    if convert is not None:
        out = convert(out, inplace=True)
    if len(entries) == 1:
        return out
    out = comfy.lora.calculate_weight(entries[1:], out, key)
    if weight.dtype != torch.float32:  # rounded back to the stored precision exactly as ComfyUI patches it
        import comfy.float
        from comfy.model_patcher import string_to_seed

        out = comfy.float.stochastic_rounding(out, weight.dtype, seed=string_to_seed(key))
    return out


def sd15_weights(model, clip, vae, deltas: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int | None]:
    """What ComfyUI's MODEL, CLIP and VAE hold, as one SD 1.5 checkpoint in the original layout.

    Returns (tensors with every weight patch (LoRA) applied; the UNet's weight changes those patches
    make, original names (empty unless ``deltas``); the text encoder's layer count Set Last Layer
    asks for, None for all).
    ComfyUI's objects are read, never changed; unpatched tensors are shared, not copied.
    """
    if not IN_COMFYUI:
        raise LayerDiffError("MODEL, CLIP and VAE inputs exist only inside ComfyUI")
    inner = getattr(model, "model", None)
    model_type = getattr(getattr(inner, "model_type", None), "name", "EPS")
    if model_type != "EPS":
        raise LayerDiffError(
            f"the MODEL predicts {model_type}, but LayerDiff on SD 1.5 works with noise (eps) prediction models: "
            "load an SD 1.5 checkpoint or fine-tune that predicts noise (most do)"
        )
    tensors, changes = {}, {}
    for key, entries in model.get_key_patches("diffusion_model.").items():
        name = "model." + key
        tensors[name] = _patched(entries, key)
        if deltas and len(entries) > 1:
            changes[name] = tensors[name].float() - entries[0][0].to(device="cpu", dtype=torch.float32)
    clip_keys = clip.patcher.get_key_patches()
    prefix = next((p for p in ("clip_l.transformer.", "transformer.") if any(k.startswith(p) for k in clip_keys)), None)
    if prefix is None:
        found = sorted({k.split(".", 1)[0] for k in clip_keys})[:4]
        raise LayerDiffError(
            f"the CLIP input is not SD 1.5's text encoder (it holds {', '.join(found)}): connect the CLIP output of the "
            "same SD 1.5 checkpoint as the MODEL"
        )
    for key, entries in clip_keys.items():
        if key.startswith(prefix) and not key.endswith(_CLIP_SKIPPED):
            tensors[SD15_CLIP + key[len(prefix):]] = _patched(entries, key)
    for key, value in vae.get_sd().items():
        tensors[SD15_VAE + key] = value
    layer_idx = getattr(clip, "layer_idx", None)
    layers = None
    if layer_idx is not None and int(layer_idx) < -1:
        head = SD15_CLIP + "text_model.encoder.layers."
        total = len({k[len(head):].split(".", 1)[0] for k in tensors if k.startswith(head)})
        layers = total + int(layer_idx) + 1
    return tensors, changes, layers


# ---------------------------------------------------------------------------- progress


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel."""
    if IN_COMFYUI:
        model_management.throw_exception_if_processing_interrupted()


def _previews_enabled() -> tuple[bool, int]:
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return True, 512
    return args.preview_method != LatentPreviewMethod.NoPreviews, int(getattr(args, "preview_size", 512) or 512)


class Progress:
    """Sampler callback ``(step, total, x0)``: stops on ComfyUI's interrupt (within one step) and
    moves the node's progress bar with a preview image. ``preview`` is a factory, called once on
    the first step and only when ComfyUI previews are on (--preview-method), that returns
    ``decode(x0) -> (h, w, 3)`` in 0..1. Outside ComfyUI it does nothing."""

    def __init__(self, total: int, preview=None):
        self.bar = comfy_utils.ProgressBar(total) if IN_COMFYUI else None
        enabled, self.preview_size = _previews_enabled() if IN_COMFYUI else (False, 0)
        self._factory = preview if enabled else None
        self._decode = None

    def _image(self, x0):
        if self._factory is None:
            return None
        try:
            from PIL import Image

            if self._decode is None:
                self._decode = self._factory()
            rgb = self._decode(x0)  # (h, w, 3) in 0..1
            array = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            return ("JPEG", Image.fromarray(array), self.preview_size)
        except Exception:  # a preview must never stop sampling
            logger.warning("LayerDiff preview failed; previews are off for this run", exc_info=True)
            self._factory = None
            return None

    def __call__(self, step: int, total: int, x0: torch.Tensor) -> None:
        check_interrupt()
        if self.bar is not None:
            self.bar.update_absolute(step, total, self._image(x0))
