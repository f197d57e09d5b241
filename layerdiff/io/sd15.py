"""Stable Diffusion 1.5 parts (UNet, VAE, CLIP text encoder) from a single file or a diffusers folder.

Offline only: the configs ship in ``layerdiff/presets/sd15/`` (read by
:func:`layerdiff.config.load_sd15_configs`); single files in the original (CompVis) layout are
mapped to diffusers/transformers names by ``_diffusers_compat``; weights are read only from
safetensors. :func:`load_base_components` picks the loader for a file or a folder.
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

from layerdiff.config import LayerDiffConfig, load_sd15_configs
from layerdiff.deps import require_model_libraries
from layerdiff.errors import CheckpointError, LayerDiffError
from layerdiff.io import _diffusers_compat as compat
from layerdiff.io.files import PICKLE_SUFFIXES, read_safetensors, read_safetensors_header

logger = logging.getLogger("layerdiff.io")

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
ARCHITECTURE_WORDS = {
    "sd15": "an SD 1.5 checkpoint",
    "sd15-inpainting": "an SD1.5 inpainting checkpoint (9 UNet input channels)",
    "sd2": "a Stable Diffusion 2.x checkpoint",
    "sdxl": "an SDXL checkpoint",
    "sd3": "an SD3 checkpoint",
    "flux": "a FLUX checkpoint",
    "layerdiff": "a LayerDiff checkpoint",
    "diffusers-unet": "a diffusers UNet weights file",
}
# Tensors inside a component's prefix that no SD1.5 parameter corresponds to: CLIP's position_ids
# (regenerated; older transformers saved them, some merges as broken floats), CLIP's text projection
# (ComfyUI's CheckpointSave wrote it between Feb and Mar 2024; SD1.5 uses the hidden states, not
# the projected pooled output) and LDM's autoencoder training loss (LPIPS, discriminator).
# Everything outside the component prefixes (model_ema.*, scheduler buffers such as alphas_cumprod,
# cond_stage_model.logit_scale, conditioner.*, v_pred) is never read.
_UNUSED_IN_COMPONENT = re.compile(
    r"(^|\.)position_ids$"
    r"|^cond_stage_model\.transformer\.text_projection(\.weight)?$"
    r"|^first_stage_model\.loss\."
)


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


def _cross_attention_dims(shapes: dict[str, tuple[int, ...]]) -> list[int]:
    return [
        s[1]
        for k, s in shapes.items()
        if k.startswith(compat.UNET_PREFIX) and k.endswith("attn2.to_k.weight") and len(s) == 2
    ]


def _sd15_unet(shapes: dict[str, tuple[int, ...]]) -> bool:
    """An LDM UNet with SD1.5's 4 input channels and cross-attention not as wide as SD2's or SDXL's
    (768 in real files; reduced-width test files pass too)."""
    conv_in = shapes.get(compat.UNET_PREFIX + "input_blocks.0.0.weight")
    context = _cross_attention_dims(shapes)
    return (
        conv_in is not None and len(conv_in) == 4 and conv_in[1] == 4 and bool(context)
        and context[0] not in (1024, 2048)
    )  # fmt: skip


def detect_architecture(shapes: Mapping[str, tuple]) -> str:
    """One of ``ARCHITECTURES``, from tensor names and shapes only (so it runs on a header)."""
    shapes = _as_shapes(shapes)
    keys = list(shapes)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("unet.") and has("prompt_enhancer."):
        return "layerdiff"
    # The UNet decides, as in ComfyUI's loader: some SD1.5 merges carry leftover conditioner.* tensors.
    if has(compat.UNET_PREFIX + "label_emb.") or (has("conditioner.embedders.") and not _sd15_unet(shapes)):
        return "sdxl"
    if has("joint_blocks.", compat.UNET_PREFIX + "joint_blocks.", "text_encoders.clip_g."):
        return "sd3"
    if has("double_blocks.", "single_blocks.", compat.UNET_PREFIX + "double_blocks."):
        return "flux"
    conv_in = shapes.get(compat.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None:
        if has("cond_stage_model.model."):  # OpenCLIP ViT-H text encoder
            return "sd2"
        context = _cross_attention_dims(shapes)
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
    if arch in ARCHITECTURE_WORDS:
        return CheckpointError(f"{path} looks like {ARCHITECTURE_WORDS[arch]}; {need}")
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


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside go to the meta device (no memory, no random init); buffers stay real.
    accelerate's ``init_empty_weights(include_buffers=False)`` does the same; accelerate is a training
    extra, so generating cannot rely on it."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            old = module._parameters[name]
            module._parameters[name] = type(old)(old.to("meta"), requires_grad=old.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _empty_model(component: str, config: Mapping) -> torch.nn.Module:
    """The module with parameters on the meta device (no memory, no init), buffers real."""
    ctx = _parameters_on_meta()
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
    unexpected = [
        k for k in shapes if k.startswith(prefix) and k not in used and not _UNUSED_IN_COMPONENT.search(k)
    ]
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


def _unused_tensors(shapes: Mapping[str, tuple], plans: Mapping[str, dict[str, str]]) -> list[str]:
    """Tensors of the file that none of the loaded SD1.5 modules takes (requested components only)."""
    used = {name for plan in plans.values() for name in plan.values()}
    others = tuple(_COMPONENT_PREFIX[c] for c in COMPONENTS if c not in plans)
    if "unet" not in plans:
        others += (compat.EMA_PREFIX,)
    elif any(name.startswith(compat.EMA_PREFIX) for name in plans["unet"].values()):
        others += (compat.UNET_PREFIX,)  # the non-EMA UNet: the other choice, not a leftover
    return sorted(k for k in shapes if k not in used and not k.startswith(others))


def _examples(names: list[str], n: int = 5) -> str:
    """A few names from different groups (model_ema.*, cond_stage_model.*, top-level buffers...)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.split(".", 1)[0] if "." in name else "", []).append(name)
    picked: list[str] = []
    for i in range(n):
        picked += [g[i] for g in groups.values() if i < len(g)]
    picked = picked[:n]
    return ", ".join(picked) + (f" (+{len(names) - len(picked)} more)" if len(names) > len(picked) else "")


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
    require_model_libraries()
    header, _ = read_safetensors_header(path)
    p = Path(path).expanduser()
    shapes = {k: shape for k, (_, shape) in header.items()}

    def fetch(names):
        return read_safetensors(p, keys=names)[0]

    models = _load_components(p, shapes, fetch, dtype, components, (unet_config, vae_config, text_config), use_ema)
    logger.info("loaded %s from %s (%s)", ", ".join(components), p, str(dtype).removeprefix("torch."))
    return models


def load_sd15_state_dict(
    tensors: Mapping[str, torch.Tensor],
    source: str = "the state dict",
    dtype: torch.dtype = torch.float32,
    components: Iterable[str] = COMPONENTS,
    unet_config: Mapping | None = None,
    vae_config: Mapping | None = None,
    text_config: Mapping | None = None,
    share: bool = False,
) -> dict[str, torch.nn.Module]:
    """The same modules from original-layout tensors already in memory (a host application's loaded
    model); ``source`` names them in errors. The tensors are never modified; they are copied, or with
    ``share`` used as they are where they already have ``dtype`` (the modules then share their memory)."""
    components = _check_components(components)
    require_model_libraries()
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    def fetch(names):
        return {n: tensors[n] for n in names}

    return _load_components(source, shapes, fetch, dtype, components, (unet_config, vae_config, text_config), False,
                            share)


def _load_components(p, shapes, fetch, dtype, components, configs, use_ema, share=False) -> dict[str, torch.nn.Module]:
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
    overrides = dict(zip(COMPONENTS, configs))
    models, plans = {}, {}
    for c in components:
        config = copy.deepcopy(dict(overrides[c])) if overrides[c] is not None else defaults[c]
        models[c] = _empty_model(c, config)
        plans[c] = _plan(p, c, models[c], config, shapes, use_ema)

    unused = _unused_tensors(shapes, plans)
    if unused:
        many = "tensors" if len(unused) > 1 else "tensor"
        logger.debug("%s: ignored %d %s SD 1.5 does not use: %s", p, len(unused), many, _examples(unused))
    if "unet" in components and "v_pred" in shapes:  # ComfyUI's CheckpointSave marks v-prediction models so
        logger.warning(
            "%s is marked as a v-prediction model (it carries 'v_pred'); LayerDiff's SD 1.5 recipe assumes "
            "epsilon prediction: fine-tune from an epsilon-prediction SD 1.5 checkpoint instead", p
        )  # fmt: skip
    wanted = sorted({name for plan in plans.values() for name in plan.values()})
    tensors = dict(fetch(wanted))
    for c in components:
        model, plan = models[c], plans[c]
        targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = {}
        for key, name in plan.items():
            t = compat.fit_to_shape(name, tensors.pop(name), targets[key])
            # a copy unless shared: the tensors may belong to a host's loaded model, which must stay as it was
            if not t.is_floating_point():
                state[key] = t if share else t.clone()
            else:
                state[key] = t if share and t.dtype == dtype else t.to(dtype, copy=True)
        _load_into(p, c, model, state)
        models[c] = model.eval()
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
    require_model_libraries()
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


def load_base_components(
    base, dtype=torch.float32, components=("unet", "vae", "text_encoder"), config: LayerDiffConfig | None = None
) -> dict:
    """SD 1.5 parts from an original-layout single file or a diffusers folder.

    ``config`` (a LayerDiff config) gives the architectures to expect; default: real SD 1.5.
    """
    base = Path(base)
    if base.is_dir():
        return load_diffusers_dir(base, dtype=dtype, components=components)
    kwargs = {}
    if config is not None:
        kwargs = {"unet_config": config.unet, "vae_config": config.vae, "text_config": config.text_encoder}
    return load_sd15_single_file(base, dtype=dtype, components=components, **kwargs)
