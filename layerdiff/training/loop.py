"""The training loop: :func:`train` on accelerate, with separate learning rates for base and new
weights, an optional frozen base, gradient clipping, EMA, mixed precision where the device
allows, gradient checkpointing, a held-out loss (:mod:`~layerdiff.training.validation`) and sample
grids.

The same command runs on one CPU or, through ``accelerate launch``, on many GPUs and machines;
several CPU processes form a gloo group under ``torchrun --nproc_per_node N -m layerdiff train ...``
or ``accelerate launch --multi_gpu --num_processes N -m layerdiff train ...`` (``accelerate launch
--cpu`` starts only one process unless given an MPI host file). ``accelerate launch --config_file
layerdiff/presets/accelerate/fsdp.yaml`` shards the model (FSDP2, :mod:`~layerdiff.training.sharding`).
Randomness is drawn per (seed, step, rank), so a resumed run continues bit-identically with
``cache_latents``; a streaming run (no cache) is exact up to its checkpoint, but after a resume its
reader starts a fresh order seeded by ``seed + step`` (skipping the consumed samples would decode
them all again), so only noise, timesteps and prompt dropout match an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from layerdiff.errors import LayerDiffError
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.training import sharding
from layerdiff.training.latents import LatentCache
from layerdiff.training.objective import LayerDiffTrainModule, NoiseSchedule, make_batch
from layerdiff.training.outputs import export, grid_prompts, sample_grid
from layerdiff.training.settings import TrainConfig
from layerdiff.training.state import (
    latest_checkpoint,
    load_training_state,
    read_optimizer_state,
    save_training_state,
    step_generator,
    write_training_state,
)

logger = logging.getLogger("layerdiff.train")

NEW_MODULE_KEYS = ("inter_layer_attn", "intra_layer_attn", "prompt_enhancer", "conv_in", "conv_out", ".position.")
LAYOUT_KEY = ".layout."  # the layout prior's weights: their own learning rate (lr_layout)


def param_groups(module: LayerDiffTrainModule, config: TrainConfig) -> list[dict]:
    new, layout, base, text = [], [], [], []
    for name, p in module.named_parameters():
        if name.startswith("text_encoder."):
            p.requires_grad_(config.lr_text > 0)
            if config.lr_text > 0:
                text.append(p)
        elif LAYOUT_KEY in name:  # only the layout loss reaches them: frozen without it
            p.requires_grad_(config.layout_weight > 0)
            if config.layout_weight > 0:
                layout.append(p)
        elif any(k in name for k in NEW_MODULE_KEYS):
            new.append(p.requires_grad_(True))
        elif not config.freeze_base:
            base.append(p.requires_grad_(True))
        else:
            p.requires_grad_(False)
    groups = [{"params": new, "lr": config.lr_new, "name": "new"}]
    if layout:
        groups.append({"params": layout, "lr": config.lr_new if config.lr_layout is None else config.lr_layout,
                       "name": "layout"})
    if base:
        groups.append({"params": base, "lr": config.lr_base, "name": "base"})
    if text:
        groups.append({"params": text, "lr": config.lr_text, "name": "text"})
    return groups


def make_adamw(groups: list[dict], weight_decay: float, device) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all weights instead of about ten small ops per weight) where
    torch offers it for the device. Same update rule; the state dict is the same either way, so a
    run resumes across the two."""
    kw = {"weight_decay": weight_decay, "betas": (0.9, 0.999)}
    if torch.device(device).type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError) as e:  # an older torch, or weights it cannot fuse
            logger.info("fused AdamW unavailable (%s); using the per-weight loop", e)
    return torch.optim.AdamW(groups, **kw)


def ema_update(ema: dict, params: dict, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place, for every trained weight (one fused
    multi-tensor op where the dtypes and device allow, instead of two small ops per weight)."""
    names = list(params)
    e = [ema[n] for n in names]
    p = [params[n].detach() for n in names]
    if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(e, p)):
        torch._foreach_lerp_(e, p, 1 - decay)
    else:
        for a, b in zip(e, p):
            a.lerp_(b.to(device=a.device, dtype=a.dtype), 1 - decay)


def train(
    model: LayerDiffModel,
    data,
    out: str | Path,
    config: TrainConfig,
    sample_prompts: list | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train ``model`` (in place) on layered shards; return the exported LayerDiff file.

    Resumes from ``out/checkpoints/latest`` if present. ``stop_after`` ends the run after that
    many steps of this invocation (tests of resume). ``sample_prompts`` (``LayerPrompts``) replace
    the config's prompts of the sample grids.
    """
    Accelerator, set_seed = _accelerate()
    if sample_prompts is None:  # checked before any work
        sample_prompts = grid_prompts(model, data, config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = _cpu_distributed()
    accelerator = Accelerator(mixed_precision=config.mixed_precision if config.mixed_precision != "no" else "no",
                              cpu=cpu)
    fsdp = _fsdp(accelerator, cpu, config)
    rank = accelerator.process_index
    set_seed(config.seed)
    device = accelerator.device
    module, optimizer, trained, ema = _trained_module(model, config, device)
    if fsdp:
        sharding.declare_units(module)
    validation = None
    if config.val_every:
        from layerdiff.training.validation import ValidationSet

        validation = ValidationSet.build(model, config.validation_data, config, rank, accelerator.num_processes)
    start = 0
    ck = latest_checkpoint(out)
    if ck is not None:  # under FSDP the optimizer state is loaded after sharding
        start, _ = load_training_state(ck, module, None if fsdp else optimizer, ema)
        logger.warning("resumed from step %d (%s)", start, ck)
    logger.info("batch: %d per process x %d accumulated micro-batches x %d processes = %d samples per step",
                config.batch_size, config.gradient_accumulation_steps, accelerator.num_processes,
                config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes)
    ddp_module, optimizer = accelerator.prepare(module, optimizer)
    live = lambda: trained  # noqa: E731  (the trained weights as plain tensors, by name)
    if fsdp:
        live, ema = sharding.after_prepare(accelerator, module, optimizer, list(trained), ema, config,
                                           ck and read_optimizer_state(ck))
    schedule = NoiseSchedule(model.config.scheduler)
    draw = _latent_batches(model, data, out, config, accelerator, start)

    log = out / "train_log.jsonl"
    if start and accelerator.is_main_process:
        _truncate_log(log, start)  # steps after the checkpoint are trained (and logged) again
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="training", unit="step")
    losses, t0 = [], time.time()
    step = start
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    accumulate = config.gradient_accumulation_steps
    while step < end:
        batches = []
        for micro in range(accumulate):  # micro-batch m of step s draws what step s * accumulate + m would
            gen = step_generator(config.seed, step * accumulate + micro, rank)
            latents, valid, gp, lp = draw(gen)
            batch = make_batch(latents.cpu(), valid.cpu(), gp, lp, model.tokenizer, schedule, config, gen)
            batches.append({k: v.to(device) for k, v in batch.items()})
        loss = _optimizer_step(accelerator, ddp_module, module, optimizer, batches, config, config.lr_scale(step))
        step += 1
        if ema is not None:
            d = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                ema_update(ema, live(), d)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % config.log_every == 0 or step == end:
            _log_losses(log, step, losses, t0, accelerator.is_main_process)
            losses, t0 = [], time.time()
        if validation is not None and (step % config.val_every == 0 or step == end):
            _log_validation(log, step, validation, module, accelerator, ema, live())
        if step % config.checkpoint_every == 0 or step == end:
            _checkpoint(accelerator, out, step, module, optimizer, ema, config.keep_checkpoints, fsdp)
        if config.sample_every and step % config.sample_every == 0 and accelerator.is_main_process and not fsdp:
            sample_grid(model, ema, trained, sample_prompts, out / "samples" / f"step-{step:06d}.png", config)
    if bar is not None:
        bar.close()
    accelerator.wait_for_everyone()
    final = out / "model.safetensors"
    if step >= config.steps and fsdp:  # every rank gathers, the main process writes
        sharding.export_sharded(accelerator, model, module, ema, final)
    elif step >= config.steps and accelerator.is_main_process:
        export(model, ema, trained, final)
    accelerator.wait_for_everyone()
    return final


def enable_gradient_checkpointing(model: LayerDiffModel, text_encoder: bool = False) -> None:
    """Recompute activations in the backward pass instead of keeping them: diffusers' checkpointing
    of the UNet's down, mid and up blocks and of each transformer block (our
    ``LayeredTransformerBlock`` takes diffusers' positional arguments, so it is checkpointed whole,
    layer modules included), and, with ``text_encoder``, transformers' of the text encoder's layers.
    Both use torch's non-reentrant checkpoint, which also carries the gradient of the layer prompts
    that reach the blocks inside ``cross_attention_kwargs``."""
    model.unet.unet.enable_gradient_checkpointing()
    if not text_encoder:
        return
    encoder = model.text_encoder
    if not getattr(encoder, "supports_gradient_checkpointing", False):
        logger.info("the text encoder (%s) has no gradient checkpointing: it keeps its activations",
                    type(encoder).__name__)
        return
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers 5's name
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _accelerate() -> tuple:
    """accelerate's ``Accelerator`` and ``set_seed``; a LayerDiffError saying what to install without it."""
    try:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
    except ImportError as exc:
        raise LayerDiffError(
            f"training needs accelerate ({exc}): pip install -r requirements-train.txt "
            "(or pip install 'accelerate>=0.27.0'); generating does not need it"
        ) from None
    return Accelerator, set_seed


def _trained_module(model: LayerDiffModel, config: TrainConfig, device) -> tuple:
    """(module, optimizer, trained, ema): the model on ``device`` under one trained module, its AdamW
    (each group remembering its ``base_lr``), the trained weights by name and their EMA copies (None
    without EMA)."""
    model.to(device=device)
    model.vae.requires_grad_(False).eval()
    module = LayerDiffTrainModule(model, config.layout_weight).train()
    groups = param_groups(module, config)
    optimizer = make_adamw(groups, config.weight_decay, device)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    if config.intra_gate_init is not None:  # a checkpoint, if resumed, overwrites it
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n.endswith("intra_layer_attn.gate"):
                    p.fill_(config.intra_gate_init)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, text_encoder=config.lr_text > 0)
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    ema_device = "cpu" if config.ema_on_cpu else None
    ema = ({n: p.detach().float().to(device=ema_device or p.device, copy=True) for n, p in trained.items()}
           if config.ema_decay > 0 else None)
    return module, optimizer, trained, ema


def _latent_batches(model: LayerDiffModel, data, out: Path, config: TrainConfig, accelerator, start: int):
    """A function ``gen -> (latents, valid, global prompts, layer prompts)`` drawing one step's batch:
    from the latent cache (built by the main process on first use) with ``cache_latents``, else from
    a streaming reader of this rank's share, seeded by ``seed + start``."""
    if config.cache_latents:
        cache_path = out / f"latents-{config.size}.safetensors"
        if accelerator.is_main_process and not cache_path.exists():
            LatentCache.build(model, data, config.size, cache_path, model.config.max_layers)
        accelerator.wait_for_everyone()
        cache = LatentCache.load(cache_path)
        return lambda gen: cache.batch(gen, config.batch_size, config.layer_weights, config.bucket_layers)
    from layerdiff.data.reader import make_loader

    loader = make_loader(
        data, batch_size=config.batch_size, num_workers=config.num_workers, size=config.size,
        seed=config.seed + start, max_layers=model.config.max_layers, layer_weights=config.layer_weights,
        repeat=True, rank=accelerator.process_index, world_size=accelerator.num_processes,
        shuffle_buffer=config.shuffle_buffer,
    )
    stream = iter(loader)
    device = accelerator.device

    def draw(gen: torch.Generator) -> tuple:
        b = next(stream)
        imgs = b["images"].permute(0, 1, 3, 4, 2) * 0.5 + 0.5
        latents = model.encode_layers(imgs.to(device), b["masks"][:, 1:, 0].to(device)).float()
        return latents, b["valid"], b["global_prompt"], b["layer_prompts"]

    return draw


def _optimizer_step(accelerator, ddp_module, module, optimizer, batches: list[dict], config: TrainConfig,
                    lr_scale: float) -> torch.Tensor:
    """One update from the mean gradient of ``batches`` (micro-batches: one forward and backward
    each; the processes synchronise at the last only), every group at ``lr_scale`` times its
    ``base_lr``; the mean loss."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_scale
    total = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(ddp_module):
            with accelerator.autocast():
                loss = ddp_module(**batch)
            accelerator.backward(loss / len(batches))
        total = total + loss.detach()
    loss = total / len(batches)
    if config.grad_clip > 0:
        accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _log_losses(log: Path, step: int, losses: list, t0: float, main_process: bool) -> None:
    """The mean loss and steps per second since ``t0``: one line of ``log`` (main process) and a log message."""
    mean = sum(losses) / len(losses)
    rate = len(losses) / max(1e-9, time.time() - t0)
    if main_process:
        with open(log, "a") as f:
            f.write(json.dumps({"step": step, "loss": round(mean, 5), "steps_per_s": round(rate, 3)}) + "\n")
    logger.info("step %d loss %.4f (%.2f steps/s)", step, mean, rate)


def _log_validation(log: Path, step: int, validation, module, accelerator, ema: dict | None, trained: dict) -> None:
    """The held-out loss (every rank computes its share; all get the mean): one line of ``log``
    (main process) and a log message."""
    value, samples = validation.loss(module, accelerator, ema, trained)
    weights = "ema" if ema is not None else "trained"
    if accelerator.is_main_process:
        with open(log, "a") as f:
            f.write(json.dumps({"step": step, "val_loss": round(value, 6), "val_samples": samples,
                                "weights": weights}) + "\n")
    logger.info("step %d validation loss %.6f (%d held-out samples, %s weights)", step, value, samples,
                "EMA" if ema is not None else "trained")


def _checkpoint(accelerator, out: Path, step: int, module, optimizer, ema: dict | None, keep: int,
                fsdp: bool = False) -> None:
    """The main process saves the training state while the other ranks wait; under FSDP every rank
    first gathers the full weights, EMA and optimizer state (the layout of a one-process run)."""
    accelerator.wait_for_everyone()
    if fsdp:
        model_state = sharding.full_model_state(module)
        optimizer_state = sharding.full_optimizer_state(module, optimizer.optimizer)
        full_ema = ema and sharding.gather_ema(ema, module)
        if accelerator.is_main_process:
            write_training_state(out, step, model_state, optimizer_state, full_ema,
                                 {"rank_count": accelerator.num_processes, "fsdp": True}, keep)
    elif accelerator.is_main_process:
        save_training_state(out, step, module, optimizer.optimizer if hasattr(optimizer, "optimizer")
                            else optimizer, ema, {"rank_count": accelerator.num_processes}, keep)
    accelerator.wait_for_everyone()


def _fsdp(accelerator, cpu: bool, config: TrainConfig) -> bool:
    """Whether this run shards the model (``accelerate launch`` with an FSDP config); in a CPU
    process group, FSDP2 is turned on here (accelerate takes FSDP only on GPUs)."""
    if cpu and sharding.fsdp_requested():
        sharding.enable_fsdp_on_cpu(accelerator)
    if not sharding.is_fsdp(accelerator):
        return False
    sharding.check_fsdp_settings(accelerator, config)
    return True


def _cpu_distributed() -> bool:
    """Several processes (torchrun, ``accelerate launch``) on a machine without a GPU.

    accelerate forms a gloo group of CPU processes only when asked for CPU (``cpu=True`` or
    ACCELERATE_USE_CPU); otherwise each process silently trains alone as rank 0 of 1, all of them
    writing into one output folder. One process (world size 1) keeps accelerate's own choice.
    """
    world = 1
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        try:
            world = max(world, int(os.environ.get(key, "1") or 1))
        except ValueError:
            pass
    if world <= 1:
        return False
    if torch.cuda.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def _truncate_log(log: Path, step: int) -> None:
    """Drop log lines of steps after ``step`` (a resumed run logs them again)."""
    if not log.is_file():
        return
    keep = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):
            continue
        keep.append(line)
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log)
