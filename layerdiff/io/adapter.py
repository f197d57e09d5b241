"""LayerDiff adapters: the layer modules of a LayerDiff UNet without the SD UNet they sit on.

A LayerDiff UNet is an SD UNet (its own weights, under the diffusers names ``unet.*``) plus the
layer modules: inter-layer and intra-layer attention and position features in every transformer
block, the prompt enhancer (``prompt_enhancer.*``), and ``conv_in`` / ``conv_out`` widened from 4
to 8 channels for the mask latents. An *adapter* file holds only the layer modules and the widened
convolutions (whose first 4 channels, the SD part, are replaced by the base's on loading); it
applies to any SD UNet of the architecture in its config. A *full* file holds everything.

Putting layer modules on a base the file was not trained with is a merge: the base's own weights
(a fine-tune, a LoRA) change what the layer modules see. :func:`unet_on_base` does it in one of two
ways (``base_weights``): ``"model"`` keeps the base's weights; ``"layerdiff"`` keeps the full
file's SD weights and adds the base's LoRA deltas to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from layerdiff.config import LayerDiffConfig
from layerdiff.errors import CheckpointError
from layerdiff.io.files import read_safetensors_header
from layerdiff.model.unet import LayerDiffUNet

KIND_KEY = "kind"  # metadata key; absent or "full" in full files
FULL, ADAPTER = "full", "adapter"
KINDS = (FULL, ADAPTER)
BASE_WEIGHTS = ("model", "layerdiff")
_UNET = "unet."


def base_shapes(config: LayerDiffConfig) -> dict[str, tuple[int, ...]]:
    """File name (``unet.*``) -> shape of every weight of the plain 4-channel SD UNet of ``config``."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        base = UNet2DConditionModel.from_config(config.unet)  # config.unet is the 4-channel SD UNet
    return {_UNET + k: tuple(v.shape) for k, v in base.state_dict().items()}


def split_names(layerdiff_shapes: Mapping[str, tuple], config: LayerDiffConfig) -> tuple[set[str], set[str]]:
    """(names that only the base supplies, names an adapter file holds) of a LayerDiff UNet's state dict.

    A weight whose LayerDiff shape differs from the plain SD shape (the widened convolutions) is an
    adapter weight: its extra channels are learned with the layer modules.
    """
    plain = base_shapes(config)
    missing = sorted(set(plain) - set(layerdiff_shapes))
    if missing:  # the layer modules never rename an SD weight; a config that did would break adapters
        raise CheckpointError(f"LayerDiff UNet of config {config.name!r} lacks SD weights {missing[:3]}")
    base_only = {k for k, shape in plain.items() if tuple(layerdiff_shapes[k]) == shape}
    return base_only, set(layerdiff_shapes) - base_only


def read_kind(metadata: dict[str, str], path) -> str:
    """``full`` or ``adapter`` (:mod:`layerdiff.io.adapter`) from a LayerDiff file's metadata."""
    kind = metadata.get(KIND_KEY, FULL)
    if kind not in KINDS:
        raise CheckpointError(
            f"{path} has LayerDiff kind {str(kind)[:40]!r}, which this version does not know ({', '.join(KINDS)}): "
            "update the pack, or export the file again"
        )
    return kind


def layerdiff_kind(path: str | Path) -> str:
    """``full`` or ``adapter``: what a LayerDiff file holds (header only)."""
    return read_kind(read_safetensors_header(path)[1], path)


def widened(name: str, plain_shape: tuple[int, ...] | None, shape: tuple[int, ...]) -> int | None:
    """The axis along which ``name`` was widened from the SD shape (None: not widened)."""
    if plain_shape is None or tuple(plain_shape) == tuple(shape):
        return None
    for axis, (a, b) in enumerate(zip(plain_shape, shape)):
        if a != b:
            return axis
    return None


@torch.no_grad()
def unet_on_base(
    base_unet: torch.nn.Module,
    config: LayerDiffConfig,
    tensors: Mapping[str, torch.Tensor],
    kind: str,
    base_weights: str = "model",
    deltas: Mapping[str, torch.Tensor] | None = None,
    source: str = "the LayerDiff file",
) -> LayerDiffUNet:
    """A LayerDiff UNet from a 4-channel diffusers SD UNet (consumed) and a file's tensors.

    ``tensors``: the file's ``unet.*`` / ``prompt_enhancer.*`` tensors. ``base_weights="model"``:
    the SD weights are ``base_unet``'s (with an adapter, the only choice); ``"layerdiff"``: they are
    the full file's, plus ``deltas`` (diffusers name without ``unet.`` -> change, a LoRA's effect on
    the base) where given.
    """
    if base_weights not in BASE_WEIGHTS:
        raise CheckpointError(f"base_weights {base_weights!r} is unknown: choose {' or '.join(BASE_WEIGHTS)}")
    if kind == ADAPTER and base_weights == "layerdiff":
        raise CheckpointError(
            f"{source} is an adapter (layer modules only), so it has no SD weights of its own: "
            "use base_weights 'model'"
        )
    plain = base_shapes(config)
    unet = LayerDiffUNet.from_base(base_unet, config)
    current = unet.state_dict()
    _, adapter_names = split_names({k: tuple(v.shape) for k, v in current.items()}, config)
    wanted = adapter_names if base_weights == "model" else set(current)
    missing = sorted(wanted - set(tensors))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} LayerDiff tensors (e.g. {missing[:3]}): export it again")
    state = {}
    for name in sorted(wanted):
        t = tensors[name].to(current[name].dtype, copy=True)
        axis = widened(name, plain.get(name), tuple(t.shape))
        if base_weights == "model" and axis is not None:  # the SD channels come from the base
            t.narrow(axis, 0, plain[name][axis]).copy_(current[name].narrow(axis, 0, plain[name][axis]))
        state[name] = t
    for key, delta in (deltas or {}).items() if base_weights == "layerdiff" else ():
        name = _UNET + key
        if name not in state:
            raise CheckpointError(f"a LoRA patch targets {key!r}, which the LayerDiff UNet does not have")
        axis = widened(name, plain.get(name), tuple(state[name].shape))
        target = state[name] if axis is None else state[name].narrow(axis, 0, plain[name][axis])
        if tuple(delta.shape) != tuple(target.shape):
            raise CheckpointError(
                f"a LoRA patch on {key!r} has shape {tuple(delta.shape)}, the weight {tuple(target.shape)}: "
                "the LoRA was made for another architecture"
            )
        target.add_(delta.to(target.dtype))
    # assign: the new tensors replace the parameters, so memory the base's weights share with a host's
    # model is never written to
    unet.load_state_dict(state, strict=False, assign=True)
    return unet
