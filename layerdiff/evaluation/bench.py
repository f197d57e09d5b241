"""``python -m layerdiff bench``: the cost of the layer modules and of self-mask guidance.

For one UNet configuration it times, per denoising step, (a) the bare diffusers UNet on the
B x L layer images with CFG (the floor: generating the L images separately), (b) LayerDiff
sampling with CFG and (c) LayerDiff with CFG + self-mask guidance. The three run interleaved,
round after round, and the ratios come from medians of the same run (shared machines are noisy).
Random weights: timing does not depend on them.

:func:`bench_command` runs the command (its arguments: :mod:`layerdiff.cli.bench`).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

__all__ = ["DTYPES", "LAYOUTS", "bench_command", "bench_one", "build_unets", "check_args", "check_memory"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"preset": {}, "paper": {"inter_layer_width": 1.0, "intra_layer_mode": "separate", "layer_prompt_tokens": 0}}


def _peak_in_subprocess(preset, layers, batch, size, steps, variant, dtype, layout="preset") -> float:
    """CPU peak memory of one variant: resident-set peak of a fresh process above its level after
    the models are built (in-process numbers would be hidden by the allocator's reuse)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_probe_main, (preset, layers, batch, size, steps, variant, str(dtype).split(".")[-1], layout))


def _probe_main(preset, layers, batch, size, steps, variant, dtype_name, layout="preset") -> float:
    result = bench_one(preset, layers, batch, size, steps, 1, "cpu", getattr(torch, dtype_name), only=variant,
                       layout=layout)
    return round(result["peak_mb"], 1)


class _PeakMemory:
    """Peak CUDA memory above the starting level (allocator statistics)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_unets(config, device) -> tuple:
    """The bare diffusers UNet and the LayerDiff UNet of ``config``, random weights, every weight on
    ``device`` (LayerDiffUNet.from_config takes the device itself: an outer ``torch.device`` context
    does not reach inside it)."""
    from diffusers import UNet2DConditionModel

    from layerdiff.model.unet import LayerDiffUNet

    with torch.device(device):
        bare = UNet2DConditionModel(**config.unet).eval()
    layered = LayerDiffUNet.from_config(config, device=device).eval()
    with torch.no_grad():  # open gates, as a trained model has: a closed one is skipped and would cost nothing
        for module in layered.modules():
            if hasattr(module, "closed") and hasattr(module, "gate"):
                module.gate.fill_(0.1)
    return bare, layered


def bench_one(
    preset: str, layers: int, batch: int, size: int | None, steps: int, rounds: int, device, dtype, only=None,
    layout: str = "preset",
) -> dict:
    from layerdiff.conditioning import LayerConditioning
    from layerdiff.config import get_preset
    from layerdiff.sampling import make_scheduler, sample
    from layerdiff.settings import SamplerSettings

    config = get_preset(preset, max_layers=max(4, layers), **LAYOUTS[layout])
    size = size or config.image_size
    f = config.vae_scale_factor
    h = w = size // f
    torch.manual_seed(0)
    bare, layered = build_unets(config, device)
    if dtype != torch.float32:
        bare, layered = bare.to(dtype), layered.to(dtype)
    T = int(config.text_encoder.get("max_position_embeddings", 77))
    D = int(config.unet["cross_attention_dim"])
    g = torch.Generator("cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    B, L = batch, layers
    Tl = config.layer_prompt_tokens or T  # layer prompts keep their first Tl token states
    cond = LayerConditioning(
        rand(B, T, D), rand(B, L, Tl, D), rand(B, T, D), rand(B, L, Tl, D),
        torch.ones(B, L, dtype=torch.bool, device=device),
    )
    white, black = torch.ones(4, device=device), -torch.ones(4, device=device)

    @torch.no_grad()
    def run_bare():
        sched = make_scheduler("ddim", "normal", config.scheduler)
        sched.set_timesteps(steps, device=device)
        x = rand(B * L, 4, h, w)
        ctx = torch.cat([cond.global_tokens.repeat_interleave(L, 0), cond.uncond_global_tokens.repeat_interleave(L, 0)])
        for t in sched.timesteps:
            eps = bare(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
            c, u = eps.chunk(2)
            x = sched.step(u + 7.5 * (c - u), t, x).prev_sample

    def run_layered(smg: float):
        sample(layered, cond, h, w, list(range(B)), SamplerSettings(steps=steps, cfg=7.5, mask_guidance=smg),
               mask_axis=(white, black))

    variants = {"bare": run_bare, "cfg": lambda: run_layered(0.0), "smg": lambda: run_layered(0.75)}
    if only is not None:  # memory probe in a fresh process (see _peak_in_subprocess)
        before = _rss()
        variants[only]()
        import resource

        return {"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20}
    times = {k: [] for k in variants}
    peaks = {}
    for k, fn in variants.items():  # warm-up, and peak memory once each
        if torch.device(device).type == "cuda":
            with _PeakMemory(torch.device(device)) as mem:
                fn()
            peaks[k] = mem.mb
        else:
            fn()
            peaks[k] = _peak_in_subprocess(preset, layers, batch, size, steps, k, dtype, layout)
    for _ in range(rounds):
        for k, fn in variants.items():
            _sync(torch.device(device))
            t0 = time.perf_counter()
            fn()
            _sync(torch.device(device))
            times[k].append((time.perf_counter() - t0) / steps * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_bare = sum(p.numel() for p in bare.parameters())
    n_layered = sum(p.numel() for p in layered.parameters())
    return {
        "preset": preset,
        "layout": layout,
        "layers": L,
        "batch": B,
        "size": size,
        "steps": steps,
        "bare_ms_per_step": round(med["bare"], 3),
        "cfg_ms_per_step": round(med["cfg"], 3),
        "smg_ms_per_step": round(med["smg"], 3),
        "cfg_over_bare": round(med["cfg"] / med["bare"], 3),
        "smg_over_cfg": round(med["smg"] / med["cfg"], 3),
        "peak_mb_bare": round(peaks["bare"], 1),
        "peak_mb_cfg": round(peaks["cfg"], 1),
        "peak_mb_smg": round(peaks["smg"], 1),
        "params_bare": n_bare,
        "params_added": n_layered - n_bare,
    }


def check_args(args) -> tuple[torch.device, list[int], list[str]]:
    """Every flag checked before a model is built: ranges (limits.RANGES), device, layers and layouts."""
    from layerdiff import limits
    from layerdiff.errors import LayerDiffError

    for key in ("batch", "steps", "rounds", "threads"):
        limits.check_int(getattr(args, key), limits.cli_name(key), key, optional=key == "threads")
    device = limits.check_device(args.device, "--device")
    if device.type == "cpu" and args.dtype == "fp16":
        raise LayerDiffError("--dtype fp16 is not supported on the CPU: use fp32 or bf16")
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise LayerDiffError(f"--layers {args.layers!r} must be comma-separated integers, e.g. 2,3,4") from None
    if not layers:
        raise LayerDiffError(f"--layers {args.layers!r} names no layer count: give e.g. 2,3,4")
    for n in layers:
        limits.check_int(n, "--layers", "layers")
    layouts = [x for x in args.layout.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad or not layouts:
        raise LayerDiffError(f"--layout {args.layout!r}: use preset, paper or 'preset,paper'")
    return device, layers, layouts


def check_memory(preset: str, layers: int, batch: int, size: int | None, device, dtype) -> None:
    """Refuse a configuration the device cannot hold: both UNets' weights and the sampling activations."""
    from layerdiff import limits
    from layerdiff.config import get_preset
    from layerdiff.model.unet import LayerDiffUNet

    config = get_preset(preset, max_layers=max(4, layers))
    size = config.image_size if size is None else size
    limits.check_size(size, size, config.vae_scale_factor, names=("--size", "--size"))
    limits.check_run_size(size, size, layers, batch, names=("--layers", "--batch"))
    params = sum(p.numel() for p in LayerDiffUNet.from_config(config, device="meta").parameters())
    f = config.vae_scale_factor
    need = 2 * params * torch.empty((), dtype=dtype, device="meta").element_size()
    need += limits.sampling_bytes(config, batch, layers, size // f, size // f, dtype)
    limits.check_memory(need, device, f"bench of {preset} with {layers} layers x {batch} image(s) at {size}x{size}")


def bench_command(args) -> int:
    """Run ``bench`` with parsed arguments: print every timed configuration as JSON."""
    device, layers, layouts = check_args(args)
    for preset in [p for p in args.preset.split(",") if p]:
        for L in layers:
            check_memory(preset, L, args.batch, args.size, device, DTYPES[args.dtype])
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for preset in [p for p in args.preset.split(",") if p]:
        for L in layers:
            for layout in layouts:
                results.append(bench_one(preset, L, args.batch, args.size, args.steps, args.rounds, device,
                                         DTYPES[args.dtype], layout=layout))
    info = {"device": str(device), "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps({"results": results, "env": info}, indent=1))
    return 0
