"""Stable Diffusion 1.5 parts (UNet, VAE, CLIP text encoder) from a single file or a diffusers folder.

Offline only: the configs ship in ``layerdiff/presets/sd15/``; single files in the original
(CompVis) layout are mapped to diffusers/transformers names by ``_diffusers_compat``; weights are
read only from safetensors.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from layerdiff.errors import CheckpointError, LayerDiffError
from layerdiff.io import _diffusers_compat as compat
from layerdiff.io.files import PICKLE_SUFFIXES, read_safetensors, read_safetensors_header

logger = logging.getLogger("layerdiff.io")

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "sd15"
COMPONENTS = ("unet", "vae", "text_encoder")
ARCHITECTURES = (
    "sd15", "sd15-inpainting", "sd2", "sdxl", "sd3", "flux", "layerdiff", "diffusers-unet", "unknown",
)  # fmt: skip

_COMPONENT_PREFIX = {"unet": compat.UNET_PREFIX, "vae": compat.VAE_PREFIX, "text_encoder": compat.CLIP_PREFIX}
_COMPONENT_WORDS = {
    "unet": "UNet (model.diffusion_model.*)",
    "vae": "VAE (first_stage_model.*)",
    "text_encoder": "CLIP text encoder (cond_stage_model.transformer.*)",
}
_ARCH_WORDS = {
    "sd15-inpainting": "an SD1.5 inpainting checkpoint (9 UNet input channels)",
    "sd2": "a Stable Diffusion 2.x checkpoint",
    "sdxl": "an SDXL checkpoint",
    "sd3": "an SD3 checkpoint",
    "flux": "a FLUX checkpoint",
    "layerdiff": "a LayerDiff checkpoint",
    "diffusers-unet": "a diffusers UNet weights file",
}
# Tensors a single file may carry that no model parameter corresponds to: CLIP's position_ids
# (regenerated; some merges store them as broken floats) and LDM's autoencoder training loss.
_IGNORED = re.compile(r"(^|\.)position_ids$|^first_stage_model\.loss\.")


def load_sd15_configs() -> dict[str, dict]:
    """Fresh copies of the SD1.5 configs: ``unet``, ``vae``, ``text_encoder``, ``scheduler``.

    Build the scheduler with ``DDIMScheduler.from_config(cfg)`` (or PNDM/Euler...): the file keeps
    keys of several scheduler classes, which ``from_config`` ignores where they do not apply.
    """
    return {
        name: json.loads((PRESET_DIR / f"{name}.json").read_text("utf-8"))
        for name in (*COMPONENTS, "scheduler")
    }


# --------------------------------------------------------------------------------------------
# Architecture detection from names and shapes


def _as_shapes(shapes: Mapping) -> dict[str, tuple[int, ...]]:
    """Accept name -> shape, name -> (dtype, shape) as from ``read_safetensors_header``, or name -> tensor."""
    out = {}
    for k, v in shapes.items():
        if isinstance(v, torch.Tensor):
            v = v.shape
        elif isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            v = v[1]
        out[k] = tuple(v)
    return out


def detect_architecture(shapes: Mapping[str, tuple]) -> str:
    """One of ``ARCHITECTURES``, from tensor names and shapes only (so it runs on a header)."""
    shapes = _as_shapes(shapes)
    keys = list(shapes)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("unet.") and has("prompt_enhancer."):
        return "layerdiff"
    if has("conditioner.embedders.") or has(compat.UNET_PREFIX + "label_emb."):
        return "sdxl"
    if has("joint_blocks.", compat.UNET_PREFIX + "joint_blocks.", "text_encoders.clip_g."):
        return "sd3"
    if has("double_blocks.", "single_blocks.", compat.UNET_PREFIX + "double_blocks."):
        return "flux"
    conv_in = shapes.get(compat.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None:
        if has("cond_stage_model.model."):  # OpenCLIP ViT-H text encoder
            return "sd2"
        context = [
            s[1]
            for k, s in shapes.items()
            if k.startswith(compat.UNET_PREFIX) and k.endswith("attn2.to_k.weight")
        ]
        if context and context[0] == 1024:
            return "sd2"
        if len(conv_in) == 4 and conv_in[1] == 9:
            return "sd15-inpainting"
        if len(conv_in) == 4 and conv_in[1] == 4 and context:
            return "sd15"
        return "unknown"
    if (
        "conv_in.weight" in shapes
        and has("down_blocks.")
        and has("up_blocks.")
        and "time_embedding.linear_1.weight" in shapes
    ):
        return "diffusers-unet"
    return "unknown"


def _wrong_architecture(path: Path, arch: str, keys: list[str]) -> CheckpointError:
    need = "LayerDiff needs a Stable Diffusion 1.5 checkpoint (SD1.5-architecture fine-tunes work)"
    if arch == "layerdiff":
        return CheckpointError(
            f"{path} looks like a LayerDiff checkpoint; load it with the LayerDiff model loader"
        )
    if arch == "diffusers-unet":
        return CheckpointError(
            f"{path} looks like a diffusers UNet weights file; {need}: pass the whole diffusers folder "
            "(unet/, vae/, text_encoder/) to load_diffusers_dir or use an original-layout single file"
        )
    if arch in _ARCH_WORDS:
        return CheckpointError(f"{path} looks like {_ARCH_WORDS[arch]}; {need}")
    return CheckpointError(
        f"{path} is not a recognised Stable Diffusion checkpoint (first tensors: {', '.join(sorted(keys)[:3])}); {need}"
    )


# --------------------------------------------------------------------------------------------
# Building the modules


def _check_components(components: Iterable[str]) -> tuple[str, ...]:
    components = tuple(components)
    for c in components:
        if c not in COMPONENTS:
            raise LayerDiffError(f"component {c!r} is not one of {', '.join(COMPONENTS)}: pick from those")
    if not components:
        raise LayerDiffError(f"components is empty: pass one or more of {', '.join(COMPONENTS)}")
    return components


def _empty_model(component: str, config: Mapping) -> torch.nn.Module:
    """The module with parameters on the meta device (no memory, no init), buffers real."""
    try:
        from accelerate import init_empty_weights

        ctx = init_empty_weights(include_buffers=False)
    except ImportError:  # pragma: no cover - accelerate is a declared dependency; this is only slower
        ctx = contextlib.nullcontext()
    with ctx:
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**config)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**config)
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig(**config))


def _ldm_names(component: str, model_keys: list[str], config: Mapping, file_keys: set[str]) -> dict[str, str]:
    if component == "unet":
        return compat.unet_ldm_names(model_keys, config)
    if component == "vae":
        return compat.vae_ldm_names(model_keys, config)
    nested = any(k.startswith(compat.CLIP_PREFIX + "text_model.") for k in file_keys)
    return compat.clip_ldm_names(model_keys, text_model_prefix=nested)


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _plan(path: Path, component: str, model: torch.nn.Module, config: Mapping, shapes: dict, use_ema: bool):
    """Source tensor name per model parameter, after checking names and shapes against the header."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = _ldm_names(component, list(expected), config, set(shapes))
    prefix = _COMPONENT_PREFIX[component]
    used = set(names.values())
    missing = [v for v in names.values() if v not in shapes]
    unexpected = [k for k in shapes if k.startswith(prefix) and k not in used and not _IGNORED.search(k)]
    wrong = [
        f"{names[k]} {shapes[names[k]]} vs {shape}"
        for k, shape in expected.items()
        if names[k] in shapes and torch.Size(shapes[names[k]]).numel() != torch.Size(shape).numel()
    ]
    if missing or unexpected or wrong:
        parts = [
            f"missing {_first(missing)}" if missing else "",
            f"unexpected {_first(unexpected)}" if unexpected else "",
        ]
        parts.append(f"shape file vs model {_first(wrong, 2)}" if wrong else "")
        raise CheckpointError(
            f"{path}: the {component} weights do not fit the SD1.5 {component} config ("
            + "; ".join(p for p in parts if p)
            + "): use an unmodified SD1.5-architecture checkpoint"
        )
    if component == "unet" and use_ema:
        ema = {k: compat.ema_name(v) for k, v in names.items()}
        if all(v in shapes for v in ema.values()):
            logger.info("%s: using the EMA UNet weights (model_ema.*)", path)
            return ema
        if any(k.startswith(compat.EMA_PREFIX) for k in shapes):
            logger.warning("%s: EMA weights incomplete, using the non-EMA UNet weights", path)
    return names


def _load_into(path: Path, component: str, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: cannot load the {component} weights ({' '.join(first[:3])[:400]})"
        ) from None
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a parameter the state dict did not fill: a bug in the name tables, not in the file
        raise CheckpointError(f"{path}: {component} tensors left unloaded: {_first(leftover)}")


def load_sd15_single_file(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    components: Iterable[str] = COMPONENTS,
    unet_config: Mapping | None = None,
    vae_config: Mapping | None = None,
    text_config: Mapping | None = None,
    *,
    use_ema: bool = True,
) -> dict[str, torch.nn.Module]:
    """diffusers/transformers modules (eval mode, on the CPU) from an original-layout SD1.5 safetensors file.

    ``use_ema``: take the UNet from ``model_ema.*`` when the file carries a full EMA copy (as
    ``v1-5-pruned.safetensors`` does; the emaonly files already hold EMA weights under ``model.*``).
    """
    components = _check_components(components)
    header, _ = read_safetensors_header(path)
    p = Path(path).expanduser()
    shapes = {k: shape for k, (_, shape) in header.items()}
    arch = detect_architecture(shapes)
    if arch != "sd15":
        raise _wrong_architecture(p, arch, list(shapes))
    for c in components:
        if not any(k.startswith(_COMPONENT_PREFIX[c]) for k in shapes):
            raise CheckpointError(
                f"{p} has no {_COMPONENT_WORDS[c]} weights: use a full SD1.5 checkpoint, "
                f"or leave {c!r} out of components and load it from elsewhere"
            )

    defaults = load_sd15_configs()
    overrides = {"unet": unet_config, "vae": vae_config, "text_encoder": text_config}
    models, plans = {}, {}
    for c in components:
        config = copy.deepcopy(dict(overrides[c])) if overrides[c] is not None else defaults[c]
        models[c] = _empty_model(c, config)
        plans[c] = _plan(p, c, models[c], config, shapes, use_ema)

    wanted = sorted({name for plan in plans.values() for name in plan.values()})
    tensors, _ = read_safetensors(p, keys=wanted)
    for c in components:
        model, plan = models[c], plans[c]
        targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = {}
        for key, name in plan.items():
            t = compat.fit_to_shape(name, tensors.pop(name), targets[key])
            state[key] = t.to(dtype) if t.is_floating_point() else t
        _load_into(p, c, model, state)
        models[c] = model.eval()
    logger.info("loaded %s from %s (%s)", ", ".join(components), p, str(dtype).removeprefix("torch."))
    return models


# --------------------------------------------------------------------------------------------
# diffusers folders

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_VARIANT = re.compile(r"^(?:diffusion_pytorch_model|model)\.([A-Za-z0-9_]+)\.safetensors$")


def _variant_of(folder: Path) -> str | None:
    """The weight variant ("fp16") when the folder holds only variant files, else None."""
    names = {f.name for f in folder.iterdir()}
    if any(
        f"{stem}.safetensors" in names or f"{stem}.safetensors.index.json" in names for stem in _WEIGHT_STEMS
    ):
        return None
    variants = sorted({m.group(1) for n in names if (m := _VARIANT.match(n))})
    return variants[0] if variants else None


def _check_folder(root: Path, component: str) -> str | None:
    sub = root / component
    if not (sub / "config.json").is_file():
        raise CheckpointError(
            f"{root} has no {component}/config.json: a diffusers model folder needs unet/, vae/ and text_encoder/"
        )
    files = [f for f in sub.iterdir() if f.is_file()]
    weights = [f for f in files if f.suffix == ".safetensors"]
    if not weights:
        pickles = [f.name for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{sub} holds only pickle weights ({_first(sorted(pickles))}); LayerDiff loads only .safetensors "
                "because unpickling can run arbitrary code: convert it with a trusted tool first"
            )
        raise CheckpointError(f"{sub} holds no .safetensors weights: download the model's safetensors files")
    for f in weights:
        read_safetensors_header(f)  # a truncated download fails here, with its name
    return _variant_of(sub)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_diffusers_dir(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, components: Iterable[str] = COMPONENTS
) -> dict[str, torch.nn.Module]:
    """The same modules from a local diffusers folder (unet/, vae/, text_encoder/), safetensors only."""
    components = _check_components(components)
    root = Path(path).expanduser()
    if root.is_file():
        raise CheckpointError(
            f"{root} is a file; load_diffusers_dir takes a diffusers model folder: use load_sd15_single_file for single files"
        )
    if not root.is_dir():
        raise CheckpointError(f"diffusers model folder not found: {root}")
    variants = {c: _check_folder(root, c) for c in components}

    unet_cfg = root / "unet" / "config.json"
    if "unet" in components:
        cfg = json.loads(unet_cfg.read_text("utf-8"))
        if cfg.get("addition_embed_type") == "text_time" or cfg.get("cross_attention_dim") in (1024, 2048):
            arch = "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd2"
            raise _wrong_architecture(root, arch, [])

    models: dict[str, torch.nn.Module] = {}
    for c in components:
        try:
            if c == "text_encoder":
                from transformers import CLIPTextModel

                model = CLIPTextModel.from_pretrained(
                    root, subfolder=c, local_files_only=True, use_safetensors=True, variant=variants[c],
                    **_dtype_kwarg(dtype),
                )  # fmt: skip
            else:
                from diffusers import AutoencoderKL, UNet2DConditionModel

                cls = UNet2DConditionModel if c == "unet" else AutoencoderKL
                model = cls.from_pretrained(
                    root, subfolder=c, local_files_only=True, use_safetensors=True, variant=variants[c],
                    torch_dtype=dtype,
                )  # fmt: skip
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load {c} from {root / c}: {first}") from None
        models[c] = model.eval()
    logger.info("loaded %s from diffusers folder %s", ", ".join(components), root)
    return models
