"""LayerDiff checkpoints: ONE self-describing ``.safetensors`` file per model.

Layout of a LayerDiff file:

- tensors ``unet.*`` (the widened UNet with its layer modules, diffusers key names) and
  ``prompt_enhancer.*``; optionally ``vae.*`` and ``text_encoder.*`` (a *full* file, as the
  built-in toy model is). An SD 1.5 LayerDiff usually omits the VAE and text encoder: they come
  from the user's SD 1.5 checkpoint (``base``).
- metadata ``format = "layerdiff"``, ``config`` (the :class:`LayerDiffConfig` as JSON),
  ``components`` (comma-separated) and ``layerdiff_version``; ``kind = "adapter"`` marks a file
  that holds only the layer modules (:mod:`layerdiff.io.adapter`) and needs an SD base UNet.
"""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path

import torch

from layerdiff import __version__
from layerdiff.config import LayerDiffConfig, get_preset
from layerdiff.deps import require_model_libraries
from layerdiff.errors import CheckpointError, LayerDiffError
from layerdiff.io.adapter import (
    ADAPTER,
    FULL,
    KIND_KEY,
    KINDS,
    layerdiff_kind,
    read_kind,
    split_names,
    unet_on_base,
)
from layerdiff.io.files import (
    DTYPE_BYTES,
    path_exists,
    read_safetensors,
    read_safetensors_header,
    save_safetensors_atomic,
)
from layerdiff.io.sd15 import ARCHITECTURE_WORDS, detect_architecture, load_base_components
from layerdiff.limits import available_memory, check_load_args
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.model.text import build_tokenizer
from layerdiff.model.unet import LayerDiffUNet

logger = logging.getLogger("layerdiff.io")

FORMAT = "layerdiff"
CORE = ("unet", "prompt_enhancer")
OPTIONAL = ("vae", "text_encoder")

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Built-in models: name -> file in layerdiff/weights (trained by this project) or a random preset.
BUILTIN_FILES = {"layerdiff-toy": "layerdiff-toy.safetensors"}
RANDOM_PRESETS = {"tiny": "tiny", "toy-random": "toy"}
DEFAULT_MODEL = "layerdiff-toy"


def builtin_names() -> list[str]:
    """Built-in model names usable without a file (the toy model once its weights are present)."""
    names = [n for n, f in BUILTIN_FILES.items() if (WEIGHTS_DIR / f).is_file()]
    return names + list(RANDOM_PRESETS)


# ---------------------------------------------------------------------------- building
def build_vae(config: LayerDiffConfig, device="cpu"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL.from_config(config.vae)


def build_text_encoder(config: LayerDiffConfig, device="cpu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**config.text_encoder))


def build_random_model(config: LayerDiffConfig, seed: int = 0, tokenizer_dirs=None) -> LayerDiffModel:
    """A LayerDiff with random weights (deterministic for ``seed``): tests and timing."""
    state = torch.random.get_rng_state()
    try:
        # each part from its own stream: changing one part's config must not move another's weights
        torch.manual_seed(seed)
        unet = LayerDiffUNet.from_config(config)
        torch.manual_seed(seed)
        vae = build_vae(config)
        torch.manual_seed(seed)
        text = build_text_encoder(config)
    finally:
        torch.random.set_rng_state(state)
    tok = build_tokenizer(config.tokenizer, tokenizer_dirs)
    return LayerDiffModel(config, unet, vae, text, tok, source=f"random:{config.name}:{seed}").eval()


# ---------------------------------------------------------------------------- saving
def model_state_dict(model: LayerDiffModel | LayerDiffUNet, components=CORE + OPTIONAL) -> dict[str, torch.Tensor]:
    unet = model.unet if isinstance(model, LayerDiffModel) else model
    tensors = {k: v for k, v in unet.state_dict().items() if k.split(".", 1)[0] in components}
    if isinstance(model, LayerDiffModel):
        for name in OPTIONAL:
            if name in components:
                sd = getattr(model, name).state_dict()
                if name == "text_encoder":  # one layout in files, whatever transformers wrote it
                    sd = _canonical_text_keys(sd)
                tensors.update({f"{name}.{k}": v for k, v in sd.items()})
    return tensors


def save_layerdiff(
    model: LayerDiffModel | LayerDiffUNet,
    path: str | Path,
    include_vae_and_text_encoder: bool = True,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    extra_metadata: dict[str, str] | None = None,
    kind: str = FULL,
) -> Path:
    """Write the model as one .safetensors file (atomic; never overwrites unless asked).

    ``kind="adapter"``: only the layer modules and widened convolutions (never a VAE or text encoder).
    """
    config = model.config
    if kind not in KINDS:
        raise CheckpointError(f"kind {kind!r} is unknown: choose {' or '.join(KINDS)}")
    full = include_vae_and_text_encoder and isinstance(model, LayerDiffModel) and kind == FULL
    components = CORE + (OPTIONAL if full else ())
    tensors = model_state_dict(model, components)
    if kind == ADAPTER:
        _, keep = split_names({k: tuple(v.shape) for k, v in tensors.items() if k.startswith("unet.")}, config)
        tensors = {k: v for k, v in tensors.items() if k in keep or not k.startswith("unet.")}
    # position_ids buffers are rebuilt by transformers; keep files free of them
    tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "config": config.to_json(),
        "components": ",".join(components),
        "layerdiff_version": __version__,
        **({KIND_KEY: ADAPTER} if kind == ADAPTER else {}),
        **(extra_metadata or {}),
    }
    return save_safetensors_atomic(tensors, path, metadata=metadata, overwrite=overwrite)


# ---------------------------------------------------------------------------- loading
def read_layerdiff_header(path: str | Path) -> LayerDiffConfig:
    """The config of a LayerDiff file, validated from its header alone; other model files are named and refused.

    An SD 1.5 checkpoint (gigabytes) given where a LayerDiff file belongs fails here, before a tensor is read;
    so does a file whose config is out of bounds or whose tensors do not match its config.
    """
    return check_layerdiff_file(path)[0]


def check_layerdiff_file(path: str | Path) -> tuple[LayerDiffConfig, dict[str, torch.nn.Module], dict]:
    """(config, the model it describes on the meta device, the header's tensors) of a LayerDiff file.

    Nothing of the file's data is read and nothing is allocated for weights: the header is validated
    (layerdiff.io.files), the config is checked against its schema (layerdiff.config_check), the model is
    built on the meta device, and every tensor's name, dtype and shape must match that model.
    """
    shapes, metadata = read_safetensors_header(path)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        arch = detect_architecture(shapes)
        convert = f"python -m layerdiff convert --base {shlex.quote(str(path))} --out layerdiff.safetensors"
        if arch == "sd15":
            raise CheckpointError(
                f"{path} is an SD 1.5 checkpoint, not a LayerDiff file: use it as --base (the base_checkpoint "
                f"input of Load LayerDiff), or convert it ({convert})"
            )
        if arch in ARCHITECTURE_WORDS and arch != "layerdiff":
            raise CheckpointError(
                f"{path} looks like {ARCHITECTURE_WORDS[arch]}, not a LayerDiff file: load a LayerDiff checkpoint, "
                "or build one from an SD 1.5 checkpoint with `python -m layerdiff convert --base FILE --out OUT`"
            )
    config = read_config(metadata, path)
    kind = read_kind(metadata, path)
    parts = _meta_parts(config, path)
    _check_tensors(path, shapes, parts, kind)
    return config, parts, shapes


def read_config(metadata: dict[str, str], path) -> LayerDiffConfig:
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{path} is not a LayerDiff checkpoint (no LayerDiff config in its metadata): "
            "build one from an SD 1.5 checkpoint with `python -m layerdiff convert --base FILE --out OUT`"
        )
    try:
        return LayerDiffConfig.from_json(metadata["config"])
    except LayerDiffError as exc:
        raise CheckpointError(f"{path} has an invalid LayerDiff config: {exc}") from None


def _meta_parts(config: LayerDiffConfig, path) -> dict[str, torch.nn.Module]:
    """UNet (with the prompt enhancer), VAE and text encoder of ``config`` on the meta device."""
    require_model_libraries()
    try:
        return {
            "unet": LayerDiffUNet.from_config(config, device="meta"),
            "vae": build_vae(config, device="meta"),
            "text_encoder": build_text_encoder(config, device="meta"),
        }
    except LayerDiffError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, ZeroDivisionError) as exc:
        # the schema admits only buildable configs; this names what a library still refused
        why = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{path} has a LayerDiff config that does not build a model ({type(exc).__name__}: {why}): "
            "the file was damaged or edited; export it again"
        ) from None


def _expected_tensors(parts: dict[str, torch.nn.Module], kind: str = FULL) -> dict[str, dict[str, tuple[int, ...]]]:
    """Component -> {name in a file: shape} of the meta model (file names: ``unet.*``, ``vae.*``, ...)."""
    out = {"unet": {k: tuple(v.shape) for k, v in parts["unet"].state_dict().items()}}
    if kind == ADAPTER:
        _, keep = split_names({k: v for k, v in out["unet"].items() if k.startswith("unet.")}, parts["unet"].config)
        out["unet"] = {k: v for k, v in out["unet"].items() if k in keep or not k.startswith("unet.")}
    for name in OPTIONAL:
        sd = parts[name].state_dict()
        if name == "text_encoder":
            sd = _canonical_text_keys(sd)
        out[name] = {f"{name}.{k}": tuple(v.shape) for k, v in sd.items() if not k.endswith("position_ids")}
    return out


_FLOAT_TAGS = ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2")


def _check_tensors(
    path, shapes: dict[str, tuple[str, tuple[int, ...]]], parts: dict[str, torch.nn.Module], kind: str = FULL
) -> None:
    """Every tensor of the file belongs to a component the config builds, with that component's shape."""
    expected = _expected_tensors(parts, kind)
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, (dtype, shape) in shapes.items():
        prefix = name.split(".", 1)[0]
        component = "unet" if prefix in CORE else prefix
        if component not in expected:
            raise CheckpointError(
                f"{path} holds tensor {name[:80]!r}, which is no part of a LayerDiff model (parts: "
                f"{', '.join(CORE + OPTIONAL)}): the file was damaged or edited; export it again"
            )
        if dtype not in _FLOAT_TAGS:
            raise CheckpointError(
                f"{path}: tensor {name[:80]!r} has dtype {dtype}; LayerDiff weights are floating point "
                f"({', '.join(_FLOAT_TAGS)}): export the file again"
            )
        if component == "text_encoder":
            bare = name[len("text_encoder."):]
            name = "text_encoder." + (bare if bare.startswith(TEXT_PREFIX) else TEXT_PREFIX + bare)
        found.setdefault(component, {})[name] = tuple(shape)
    if "unet" not in found:
        raise CheckpointError(f"{path} holds no UNet tensors (unet.*): it is not a LayerDiff model; export it again")
    for component, tensors in found.items():
        _compare(path, "UNet" if component == "unet" else component, expected[component], tensors)


def _compare(path, what: str, expected: dict[str, tuple], tensors: dict[str, tuple]) -> None:
    """Refuse ``tensors`` (name -> shape) unless they are exactly ``expected``, naming the first differences."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k]) != tuple(tensors[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {[k[:80] for k in unexpected[:3]]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {k}: file {tuple(tensors[k])}, config {tuple(expected[k])})")
        raise CheckpointError(
            f"{path}: the {what} tensors do not match the config stored in the file ({'; '.join(parts)}): "
            "the file is damaged or was edited; re-export it from the trainer or `python -m layerdiff convert`"
        )


# ---------------------------------------------------------------------------- memory
MEMORY_RESERVE_FRACTION = 0.1  # of the available memory, kept free for activations and the host
MEMORY_RESERVE_MIN = 512 * 2**20
_TORCH_TAGS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def load_memory_bytes(parts: dict[str, torch.nn.Module], shapes: dict, dtype: torch.dtype) -> int:
    """Bytes of host memory a load needs at its peak: every weight at ``dtype`` plus the file's tensors
    that are read at another dtype and converted (both copies exist for a moment)."""
    tensors = (t for m in parts.values() for t in (*m.parameters(), *m.buffers()))
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    model = sum(t.numel() for t in tensors) * itemsize
    converted = sum(
        math.prod(shape) * DTYPE_BYTES[tag] for tag, shape in shapes.values() if tag != _TORCH_TAGS.get(dtype)
    )
    return model + converted


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory(path, need: int, dtype: torch.dtype) -> None:
    """Refuse a load that cannot fit: ``need`` bytes against the available memory less a reserve."""
    available = available_memory()
    if available is None:
        return
    reserve = max(MEMORY_RESERVE_MIN, int(available * MEMORY_RESERVE_FRACTION))
    logger.debug("%s: loading needs about %s, %s available", path, _gib(need), _gib(available))
    if need > available - reserve:
        smaller = "" if dtype in (torch.float16, torch.bfloat16) else ", load it as fp16 (half the memory)"
        raise CheckpointError(
            f"{path} needs about {_gib(need)} of memory to load as {str(dtype).replace('torch.', '')} but "
            f"{_gib(available)} is available and {_gib(reserve)} stays free for generating: close other "
            f"programs{smaller}, or use a smaller model"
        )


TEXT_PREFIX = "text_model."  # CLIPTextModel keys: transformers 4.x has this level, 5.x does not


def _canonical_text_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder tensors in the one layout files use (transformers 4.x: ``text_model.*``)."""
    return {k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k: v for k, v in tensors.items()}


def _match_text_keys(tensors: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    """File layout -> the installed transformers' layout (with or without ``text_model.``)."""
    wants_prefix = any(k.startswith(TEXT_PREFIX) for k in expected)
    out = {}
    for k, v in tensors.items():
        bare = k[len(TEXT_PREFIX):] if k.startswith(TEXT_PREFIX) else k
        out[TEXT_PREFIX + bare if wants_prefix else bare] = v
    return out


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, path) -> None:
    expected = module.state_dict()
    if what == "text_encoder":
        tensors = _match_text_keys(tensors, expected)
    ignorable = {k for k in expected if k.endswith("position_ids")}
    present = {k: tuple(v.shape) for k, v in tensors.items()}
    _compare(path, what, {k: tuple(v.shape) for k, v in expected.items() if k not in ignorable or k in tensors}, present)
    for k in ignorable - set(tensors):
        tensors[k] = expected[k] if not expected[k].is_meta else torch.arange(expected[k].shape[-1])[None]
    module.load_state_dict(tensors, strict=True, assign=True)
    _materialize_buffers(module)


def _materialize_buffers(module: torch.nn.Module) -> None:
    """Non-persistent buffers (CLIP's position_ids) are not in files; rebuild those left on meta."""
    for owner in module.modules():
        for name, buf in list(owner.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise CheckpointError(f"buffer {name!r} of {type(owner).__name__} was not restored from the file")
                owner.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_layerdiff(
    path: str | Path,
    base: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer_dirs: list[str] | None = None,
) -> LayerDiffModel:
    """Load a LayerDiff file; the VAE/text encoder come from the file or from ``base``
    (an SD 1.5 single-file checkpoint or a diffusers folder) when the file has none."""
    path = Path(path)
    config, meta, shapes = check_layerdiff_file(path)  # the whole header, before a byte of data is read
    check_memory(path, load_memory_bytes(meta, shapes, dtype), dtype)
    tensors, _ = read_safetensors(path, dtype=dtype)
    kind = layerdiff_kind(path)
    have = {name for name in OPTIONAL if any(k.startswith(name + ".") for k in tensors)}
    parts = {}
    need = tuple(n for n in OPTIONAL if n not in have)
    if kind == ADAPTER:
        if base is None:
            raise CheckpointError(
                f"{path} is a LayerDiff adapter (layer modules only): give the SD 1.5 checkpoint to put it on "
                "(--base FILE, the base_checkpoint input of Load LayerDiff, or Apply LayerDiff to Model)"
            )
        parts = load_base_components(base, dtype=dtype, components=("unet",) + need, config=config)
        core = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in CORE}
        unet = unet_on_base(parts.pop("unet"), config, core, ADAPTER, source=str(path))
    else:
        unet = meta["unet"]
        _load_into(unet, {k: v for k, v in tensors.items() if k.split(".", 1)[0] in CORE}, "UNet", path)
        if base is not None and need:
            parts = load_base_components(base, dtype=dtype, components=need, config=config)
    for name in OPTIONAL:
        if name in have:
            module = meta[name]
            _load_into(module, _split(tensors, name), name, path)
            parts[name] = module
        elif name not in parts:
            raise CheckpointError(
                f"{path} holds no {name.replace('_', ' ')}: give the SD 1.5 checkpoint it was trained on as base "
                "(--base FILE, or the base_checkpoint input of Load LayerDiff)"
            )
    tokenizer = build_tokenizer(config.tokenizer, tokenizer_dirs)
    model = LayerDiffModel(config, unet, parts["vae"], parts["text_encoder"], tokenizer, source=str(path))
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------- by name
def load_model(
    name_or_path: str | Path | None = None,
    base: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer_dirs: list[str] | None = None,
) -> LayerDiffModel:
    """A built-in model by name (``layerdiff-toy``, ``tiny``, ``toy-random``) or a LayerDiff file."""
    device, dtype = check_load_args(device, dtype, base)  # one line naming a bad device, dtype or base
    name = str(name_or_path or DEFAULT_MODEL)
    path = model_file(name)
    require_model_libraries()  # one line naming the fix when diffusers/transformers cannot be imported
    if path is None:
        model = build_random_model(get_preset(RANDOM_PRESETS[name]), seed=0, tokenizer_dirs=tokenizer_dirs)
        model.source = name
        return model.to(device=device, dtype=dtype)
    model = load_layerdiff(path, base=base, device=device, dtype=dtype, tokenizer_dirs=tokenizer_dirs)
    if name in BUILTIN_FILES:
        model.source = name
    return model


def model_file(name_or_path: str | Path | None) -> Path | None:
    """The file behind a model name or path (None for the random presets); unknown names are refused."""
    name = str(name_or_path or DEFAULT_MODEL)
    if name in RANDOM_PRESETS:
        return None
    if name in BUILTIN_FILES:
        file = WEIGHTS_DIR / BUILTIN_FILES[name]
        if not file.is_file():
            raise CheckpointError(
                f"built-in model {name!r} is not installed ({file} is missing): reinstall the package, "
                f"or use one of {builtin_names()} or a LayerDiff .safetensors file"
            )
        return file
    path = Path(name).expanduser()
    if not path_exists(path) and path.suffix == "" and "/" not in name and "\\" not in name:
        raise CheckpointError(
            f"unknown model {name!r}: use a built-in name ({', '.join(builtin_names())}) or a path to a "
            "LayerDiff .safetensors file"
        )
    return path


def check_model(name_or_path: str | Path | None, dtype: torch.dtype = torch.float32) -> None:
    """Refuse an unknown name, a missing file, a file that is not a valid LayerDiff model and one too large
    to load at ``dtype`` here, from headers only."""
    path = model_file(name_or_path)
    if path is not None:
        _, meta, shapes = check_layerdiff_file(path)
        check_memory(path, load_memory_bytes(meta, shapes, dtype), dtype)


def describe_file(path: str | Path) -> dict:
    """What a .safetensors file is (reads only its header): architecture, parameters, config."""
    shapes, metadata = read_safetensors_header(path)
    arch = detect_architecture({k: tuple(v[1]) for k, v in shapes.items()})
    n = 0
    for _, shape in shapes.values():
        size = 1
        for d in shape:
            size *= int(d)
        n += size
    info = {"file": str(path), "architecture": arch, "tensors": len(shapes), "parameters": n}
    if metadata.get("format") == FORMAT or arch == "layerdiff":
        config, meta, shapes = check_layerdiff_file(path)  # a file is called valid only once it would load
        info["load_memory_bytes"] = load_memory_bytes(meta, shapes, torch.float32)
        info["layerdiff_config"] = {
            "name": config.name,
            "max_layers": config.max_layers,
            "image_size": config.image_size,
            "components": ",".join(c for c in CORE + OPTIONAL if any(k.startswith(c + ".") for k in shapes)),
            "block_out_channels": config.unet.get("block_out_channels"),
            "kind": layerdiff_kind(path),
        }
        info["layerdiff_version"] = " ".join(metadata.get("layerdiff_version", "").split())[:40]
    return info
