"""Checkpoints of a training run, and the per-step randomness that makes resuming exact.

Checkpoints are folders ``OUT/checkpoints/step-NNNNNN/`` holding ``state.safetensors`` (model,
EMA and optimizer tensors; the rest as JSON metadata): written to a temporary folder, then
renamed, so a killed run never leaves a half-written checkpoint; ``OUT/checkpoints/latest``
names the newest. Under FSDP the same file holds the full tensors gathered from the shards
(:mod:`~layerdiff.training.sharding`). Randomness is drawn per (seed, step, rank, stream) by
:func:`step_generator`, so a resumed run draws what the first run drew.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from layerdiff.io.files import read_safetensors, save_safetensors_atomic

logger = logging.getLogger("layerdiff.train")


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """Randomness of one (step, rank): a resumed run draws exactly what the first run drew."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + rank) * 8 + stream)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {}
    scalars = {}
    for idx, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: str) -> dict:
    info = json.loads(meta)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in info["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": info["param_groups"]}


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_training_state(out: Path, step: int, module: nn.Module, optimizer, ema: dict | None, extra: dict, keep: int):
    """Atomic: write into a temporary folder, fsync, rename; then update ``latest``.

    A checkpoint folder ``step-NNNNNN`` exists complete or not at all. Temporary folders of
    earlier saves that were killed (whatever their process id) are removed first: only one
    process (the main one) saves into an output folder.
    """
    return write_training_state(out, step, module.state_dict(), optimizer.state_dict(), ema, extra, keep)


def write_training_state(out: Path, step: int, model_state: dict, optimizer_state: dict, ema: dict | None,
                         extra: dict, keep: int):
    """:func:`save_training_state` from the state dicts themselves (under FSDP: the full ones,
    gathered from the shards, in the layout of a one-process run)."""
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step-{step:06d}"
    for stale in [*ckdir.glob(".tmp-step-*"), *ckdir.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckdir / f".tmp-step-{step:06d}-{os.getpid()}"
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model_state.items()}
    if ema:
        tensors.update({f"ema.{k}": v.cpu() for k, v in ema.items()})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    tensors.update({k: v.cpu() for k, v in opt_tensors.items()})
    meta = {"step": str(step), "optimizer": opt_meta, "extra": json.dumps(extra)}
    save_safetensors_atomic(tensors, tmp / "state.safetensors", metadata=meta)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again: move the old folder aside in one rename, never half-delete it
        aside = ckdir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    latest_tmp = ckdir / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckdir / "latest")
    _fsync_dir(ckdir)
    old = sorted((p for p in ckdir.glob("step-*") if p.is_dir()), key=_step_of)  # by number, not by name
    for p in old[: max(0, len(old) - keep)]:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``latest`` names; if that pointer is missing or names no complete checkpoint,
    the complete ``step-*`` folder of the highest step (temporary folders are never used)."""
    ckdir = out / "checkpoints"
    pointer = ckdir / "latest"
    if pointer.is_file():
        path = ckdir / pointer.read_text().strip()
        if path.name.startswith("step-") and (path / "state.safetensors").is_file():
            return path
    complete = [p for p in ckdir.glob("step-*") if _step_of(p) >= 0 and (p / "state.safetensors").is_file()]
    if complete:
        path = max(complete, key=_step_of)
        logger.warning("%s names no complete checkpoint: resuming from %s", pointer, path)
        return path
    return None


def load_training_state(path: Path, module: nn.Module, optimizer, ema: dict | None) -> tuple[int, dict]:
    """Load the checkpoint at ``path`` into the (unsharded) module, the optimizer (None: left for
    :func:`read_optimizer_state`, as FSDP loads it after sharding) and the EMA; (step, extra)."""
    tensors, meta = read_safetensors(path / "state.safetensors")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    module.load_state_dict(model_sd, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema.{k}"])
    return int(meta["step"]), json.loads(meta.get("extra", "{}"))


def read_optimizer_state(path: Path) -> dict:
    """The optimizer state dict of the checkpoint at ``path`` (torch's layout: by weight index)."""
    tensors, meta = read_safetensors(path / "state.safetensors")
    return _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
