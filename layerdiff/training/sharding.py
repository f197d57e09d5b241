"""Training under FSDP (accelerate's ``fsdp_version: 2``, torch's ``fully_shard``): turning it on
for CPU process groups, and the full (unsharded) views of the sharded weights, EMA and optimizer
state that checkpoints and the exported file hold.

Under FSDP2 every trained weight is a DTensor whose local shard is a slice of its first axis;
:func:`local_views` gives those shards as plain tensors, so the EMA (kept as shards of the same
layout) and its swap into the live weights work as without FSDP. Checkpoints hold full tensors
with the keys and optimizer-state layout of a one-process run, so a run resumes across process
counts and with or without FSDP.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.train")

# The modules FSDP shards as units (each gathers its weights on its own forward): every module the
# training module calls outside its parents' forward is one of them (``unet.enhance`` calls the
# prompt enhancer; the LayerDiff UNet calls the diffusers UNet), so no weight is left to the root.
# The shipped accelerate config names the same classes.
FSDP_UNITS = ("LayeredTransformerBlock", "ResnetBlock2D", "UNet2DConditionModel", "PromptEnhancer",
              "CLIPEncoderLayer", "CLIPTextModel")


def fsdp_requested() -> bool:
    """``accelerate launch`` with an FSDP config (it sets ACCELERATE_USE_FSDP for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def enable_fsdp_on_cpu(accelerator) -> None:
    """Turn a CPU (gloo) process group into an FSDP2 one.

    accelerate takes FSDP only on GPUs and quietly falls back to DDP in a CPU group, although
    torch's FSDP2 (``fully_shard``) runs there; this sets the state accelerate would have set on a
    GPU (distributed type and the plugin it read from the FSDP_* variables). FSDP1 cannot run on CPU
    (``sync_module_states`` refuses CPU weights), so it is refused by name.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()  # from the FSDP_* variables
    if plugin.fsdp_version != 2:
        raise LayerDiffError(f"fsdp_version {plugin.fsdp_version} cannot train on CPU (FSDP1 keeps weights on a GPU): "
                             "set fsdp_version: 2 in the accelerate config (layerdiff/presets/accelerate/fsdp.yaml)")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_fsdp_settings(accelerator, config) -> None:
    """Refuse settings that FSDP cannot run, before any work."""
    if config.layout_weight > 0:
        raise LayerDiffError(f"layout_weight {config.layout_weight} is not supported under FSDP (the layout loss reads the "
                             "text encoder's word embeddings outside its forward): set layout_weight to 0, or train the "
                             "layout prior in its own stage (the toy recipe's layout stage)")
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise LayerDiffError(f"fsdp_version {plugin.fsdp_version}: LayerDiff trains under FSDP2 only: set fsdp_version: 2 "
                             "in the accelerate config (layerdiff/presets/accelerate/fsdp.yaml)")


def declare_units(module: nn.Module) -> None:
    """The units accelerate's TRANSFORMER_BASED_WRAP shards when the config names no classes."""
    module._no_split_modules = list(FSDP_UNITS)


def after_prepare(accelerator, module: nn.Module, optimizer, names: list[str], ema: dict | None, config,
                  optimizer_state: dict | None) -> tuple:
    """(live, ema) once accelerate has sharded ``module`` in place (its weights are now DTensors):
    ``live()`` gives the trained weights' local shards by name, the EMA becomes this rank's shard
    of each full EMA tensor, and a resumed run's optimizer state (full, by weight index) is loaded."""
    params = dict(module.named_parameters())
    logger.info("FSDP2: %d of %d weights sharded across %d processes", sum(hasattr(p, "device_mesh")
                for p in params.values()), len(params), accelerator.num_processes)
    if ema is not None:
        ema = {n: shard_like(ema[n], params[n], "cpu" if config.ema_on_cpu else None) for n in names}
    if optimizer_state is not None:
        load_optimizer_state(module, optimizer.optimizer, optimizer_state)
    if config.sample_every:
        logger.warning("sample grids are not drawn under FSDP (sample_every %d): sample from the checkpoints",
                       config.sample_every)
    return (lambda: local_views(module, names)), ema


def local_views(module: nn.Module, names) -> dict[str, torch.Tensor]:
    """The local shards of the named (DTensor) weights: plain tensors sharing their storage, so an
    in-place write (the EMA swapped in) changes the sharded weight."""
    params = dict(module.named_parameters())
    return {n: _local(params[n]) for n in names}


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def shard_like(full: torch.Tensor, param: torch.Tensor, device=None) -> torch.Tensor:
    """This rank's shard of ``full`` laid out as the DTensor ``param``'s (a copy, float32)."""
    if not hasattr(param, "device_mesh"):
        return full.float().to(device or param.device, copy=True)
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(full.float().to(param.device), param.device_mesh, param.placements,
                              src_data_rank=None).to_local()
    return local.to(device or local.device, copy=True)


def gather_ema(ema: dict, module: nn.Module) -> dict[str, torch.Tensor]:
    """The full EMA tensors (on CPU) from each rank's shards (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    params = dict(module.named_parameters())
    full = {}
    for n, shard in ema.items():
        p = params[n]
        if not isinstance(p, DTensor):
            full[n] = shard.cpu()
            continue
        d = DTensor.from_local(shard.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        full[n] = d.full_tensor().cpu()
    return full


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (keys as ``module.state_dict()`` without FSDP) in the main
    process's CPU memory, gathered one tensor at a time; a collective (other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in sd.items()}


def _param_names(module: nn.Module, optimizer) -> list[str]:
    """The names of the optimizer's weights in its own order (the indices of its state dict)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(module: nn.Module, optimizer) -> dict:
    """The unsharded optimizer state dict in torch's own layout (state and groups by weight index,
    as a one-process run saves it) in the main process's CPU memory; a collective (other ranks get
    no state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:  # not the main process
        return {}
    index = {n: i for i, n in enumerate(_param_names(module, optimizer))}

    def plain(v):
        return v.detach().cpu() if torch.is_tensor(v) else v

    state = {index[n]: {k: plain(v) for k, v in s.items()} for n, s in sd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(module: nn.Module, optimizer, saved: dict) -> None:
    """Load a full optimizer state dict in torch's layout (by weight index) into the sharded
    optimizer: each rank keeps its shard of every moment."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(module, optimizer)
    state = {names[int(i)]: s for i, s in saved["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]
    set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


class _Weights(nn.Module):
    """A stand-in module whose state dict is the given tensors (the full weights of a sharded one)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._tensors = tensors

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(self._tensors)


def export_sharded(accelerator, model, module: nn.Module, ema: dict | None, path) -> None:
    """The final one-file model (EMA weights where EMA ran) of a sharded ``model``: what
    :func:`~layerdiff.training.outputs.export` writes for an unsharded one. A collective: every
    rank gathers, the main process writes."""
    import dataclasses

    from layerdiff.io.checkpoint import save_layerdiff

    state = full_model_state(module)  # keys unet.*, text_encoder.*
    ema = ema and gather_ema(ema, module)
    if not accelerator.is_main_process:
        return
    for n, v in (ema or {}).items():
        state[n] = v.to(state[n].dtype)
    parts = {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
             for name in ("unet", "text_encoder")}
    stand_in = dataclasses.replace(model, unet=_Weights(parts["unet"]), text_encoder=_Weights(parts["text_encoder"]))
    save_layerdiff(stand_in, path, include_vae_and_text_encoder=True, overwrite=True)
