"""Ranges and types of the arguments a user gives: one table for the nodes, the command line and the
library, and the checks that enforce it before any work starts.

The node widgets take their min/max from :data:`RANGES`, the command line checks its flags with the
same functions under the flag's name, and the library entry points (generate, sample, the edits,
load_model) check their arguments again, so a value refused in one place is refused everywhere with
the same words: the argument, the bad value, the allowed range and what to do. NaN and infinities are
refused wherever a float comes in; ``bool`` is not a number; numpy scalars are.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from layerdiff.errors import LayerDiffError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's limit and ComfyUI's seed widget (0xffffffffffffffff)
SIZE_MULTIPLE = 8  # the VAE's downsampling of every preset; a model's own factor is checked when it runs
SIZE_MAX = 4096  # pixels per side; below the PSD format's 30000, so every generated image also exports
PSD_SIDE_MAX = 30000
RUN_PIXELS_MAX = 2**28  # width x height x layers x batch of one run: 4096 x 4096 x 16 layers
LAYERS_MAX = 64  # layer slots a model may have (LayerDiffConfig.max_layers), background included


@dataclass(frozen=True)
class Range:
    """Allowed values of one argument: ``low..high`` (``below_high``: high itself excluded)."""

    low: int | float
    high: int | float
    hint: str  # what to give, read after the range: "steps 0 is outside 1..500: <hint>"
    integer: bool = False
    below_high: bool = False

    def text(self) -> str:
        return f"{_number(self.low)}..{_number(self.high)}" + (f" (below {_number(self.high)})" if self.below_high else "")

    def widget(self) -> dict:
        """min/max of a ComfyUI INT or FLOAT widget."""
        if self.integer:
            return {"min": int(self.low), "max": int(self.high)}
        return {"min": float(self.low), "max": float(self.high)}


RANGES: dict[str, Range] = {
    "seed": Range(0, SEED_MAX, "use a whole number from 0 to 2**64 - 1", integer=True),
    # DDIM with SD's schedule (steps_offset 1) indexes past the 1000 training timesteps at 1000 steps
    "steps": Range(1, 500, "give the number of denoising steps (more is slower)", integer=True),
    "batch": Range(1, 64, "generate at most 64 images at once (run again with another seed for more)", integer=True),
    "layers": Range(1, LAYERS_MAX, "a stack has a background and at most 63 foregrounds", integer=True),
    "width": Range(SIZE_MULTIPLE, SIZE_MAX, f"give a size in pixels, a multiple of {SIZE_MULTIPLE}", integer=True),
    "height": Range(SIZE_MULTIPLE, SIZE_MAX, f"give a size in pixels, a multiple of {SIZE_MULTIPLE}", integer=True),
    "cfg": Range(0.0, 30.0, "classifier-free guidance scale; 1 turns it off, SD 1.5 models use about 7.5"),
    "background_cfg": Range(0.0, 30.0, "guidance scale of the background layer; SD 1.5 models use about 7.5"),
    "mask_guidance": Range(0.0, 5.0, "self-mask guidance scale; 0 turns it off"),
    "mask_guidance_start": Range(0.0, 1.0, "a fraction of the steps (0.25: after the first quarter)"),
    "mask_guidance_blur": Range(0.1, 16.0, "Gaussian blur sigma in latent pixels"),
    "mask_guidance_erode": Range(0, 16, "latent pixels; 0 guides inside the whole mask", integer=True),
    "layout_cleanup": Range(0.0, 1.0, "1 is full cleanup, 0 turns it off"),
    "layout_prior": Range(0.0, 50.0, "strength of the prompts' layout in the starting noise; 0 turns it off"),
    "layout_cleanup_start": Range(0.0, 1.0, "a fraction of the steps"),
    "empty_layer_retries": Range(0, 10, "times an empty foreground gets new noise; 0 turns it off", integer=True),
    "empty_layer_check": Range(0.0, 1.0, "a fraction of the steps", below_high=True),
    "eta": Range(0.0, 1.0, "DDIM noise; 0 is deterministic"),
    "strength": Range(0.0, 1.0, "0 keeps the layers unchanged, 1 regenerates them from noise"),
    "harmonize": Range(0.0, 1.0, "0 keeps the layers unchanged, 1 regenerates them from noise"),
    "layer_index": Range(0, LAYERS_MAX - 1, "0 is the background, 1.. the foregrounds back to front", integer=True),
    "move_to": Range(0, LAYERS_MAX - 1, "a position back to front (1: just in front of the background); 0 keeps it",
                     integer=True),
    "grow": Range(0, 16, "latent pixels the region grows by", integer=True),
    "dx": Range(-SIZE_MAX, SIZE_MAX, "a shift in pixels (negative: left)", integer=True),
    "dy": Range(-SIZE_MAX, SIZE_MAX, "a shift in pixels (negative: up)", integer=True),
    "scale": Range(0.05, 8.0, "1 keeps the size, 0.5 halves it, 2 doubles it"),
    "max_batch": Range(1, 64 * LAYERS_MAX * 3, "UNet inputs per forward pass", integer=True),
    "rounds": Range(1, 100, "timing rounds", integer=True),
    "threads": Range(1, 1024, "CPU threads", integer=True),
}


# ---------------------------------------------------------------------------- showing values
def _number(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def show(value, limit: int = 40) -> str:
    """A short, safe rendering of a user's value for a message (huge integers and texts shortened)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        v = int(value)
        if v.bit_length() > 128:  # str() of a 5000-digit integer raises
            return f"{'-' if v < 0 else ''}<an integer of {v.bit_length()} bits>"
        return str(v)
    if isinstance(value, float):
        return repr(value)
    try:
        text = repr(value)
    except Exception:  # a user's object whose repr fails still gets named
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    return "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"


def cli_name(key: str) -> str:
    """The command line's name of a table key: mask_guidance_start -> --mask-guidance-start."""
    return "--" + key.replace("_", "-")


# ---------------------------------------------------------------------------- numbers
def check_int(value, name: str, key: str | None = None, *, optional: bool = False) -> int | None:
    """``value`` as an int within ``RANGES[key or name]``; None passes when ``optional``."""
    if value is None and optional:
        return None
    r = RANGES[key or name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LayerDiffError(f"{name} {show(value)} is {_kind(value)}, not a whole number: give an integer in "
                             f"{r.text()} ({r.hint})")
    v = int(value)
    if not r.low <= v <= r.high:
        raise LayerDiffError(f"{name} {show(v)} is outside {r.text()}: {r.hint}")
    return v


def check_float(value, name: str, key: str | None = None, *, optional: bool = False) -> float | None:
    """``value`` as a finite float within ``RANGES[key or name]``; None passes when ``optional``."""
    if value is None and optional:
        return None
    r = RANGES[key or name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LayerDiffError(f"{name} {show(value)} is {_kind(value)}, not a number: give a number in {r.text()} "
                             f"({r.hint})")
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float
        v = math.inf if value > 0 else -math.inf
    if math.isnan(v) or math.isinf(v):
        raise LayerDiffError(f"{name} {show(v)} is not a finite number: give a number in {r.text()} ({r.hint})")
    if not r.low <= v <= r.high or (r.below_high and v >= r.high):
        raise LayerDiffError(f"{name} {show(value if isinstance(value, numbers.Integral) else v)} is outside "
                             f"{r.text()}: {r.hint}")
    return v


def check_number(value, name: str, key: str | None = None, *, optional: bool = False):
    """check_int or check_float, as the table says."""
    r = RANGES[key or name]
    return (check_int if r.integer else check_float)(value, name, key, optional=optional)


def batch_seeds(seed: int, batch: int) -> list[int]:
    """Seeds of the samples of a batch: ``seed + b``, wrapping past 2**64 - 1 (the widget's maximum)."""
    return [(int(seed) + b) % (SEED_MAX + 1) for b in range(batch)]


def check_size(width, height, multiple: int = SIZE_MULTIPLE, names: tuple[str, str] = ("width", "height")) -> None:
    """Both sides whole numbers in 8..4096 and multiples of ``multiple`` (the VAE's factor)."""
    for name, key, v in ((names[0], "width", width), (names[1], "height", height)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            check_int(v, name, key)  # raises: the type message
        v = int(v)
        if 0 < v <= SIZE_MAX and v % multiple:
            lo = max(multiple, v // multiple * multiple)
            hi = lo + multiple if lo <= v else lo
            nearest = f"{lo} or {hi}" if lo != hi and lo < v else f"{hi}"
            raise LayerDiffError(f"{name} {v} is not a multiple of {multiple}: use {nearest}")
        top = SIZE_MAX // multiple * multiple
        if not RANGES[key].low <= v <= top:
            raise LayerDiffError(f"{name} {show(v)} is outside {max(multiple, RANGES[key].low)}..{top}: "
                                 f"{RANGES[key].hint}")


def check_run_size(width: int, height: int, layers: int, batch: int, names: tuple[str, str] = ("layers", "batch")) -> None:
    """Layer and batch counts in range, and width x height x layers x batch within RUN_PIXELS_MAX."""
    check_int(layers, names[0], "layers")
    check_int(batch, names[1], "batch")
    pixels = int(width) * int(height) * int(layers) * int(batch)
    if pixels > RUN_PIXELS_MAX:
        raise LayerDiffError(
            f"{width}x{height} pixels x {layers} layer(s) x {batch} image(s) is {pixels:,} pixels, more than one run "
            f"may hold ({RUN_PIXELS_MAX:,}, e.g. {SIZE_MAX}x{SIZE_MAX} x 16 layers): lower the size, the layers "
            "or the batch"
        )


# ---------------------------------------------------------------------------- texts, flags, callables
def _check_unicode(text: str, name: str) -> str:
    """Lone surrogates (what Python makes of non-UTF-8 bytes on a command line) reach no tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LayerDiffError(
            f"{name} {show(text)} holds a character that is not valid Unicode at position {exc.start} (a byte "
            "that is not UTF-8, from a terminal or file in another encoding?): write the text in UTF-8"
        ) from None
    return text


def check_text(value, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise LayerDiffError(f"{name} {show(value)} is {_kind(value)}, not a text: give a string")
    return _check_unicode(value, name)


def check_texts(value, name: str, example: str = "('a brick wall', 'a red star')") -> tuple[str, ...]:
    """A list or tuple of strings (one string is refused: it would be read as one layer per letter)."""
    if isinstance(value, (str, bytes)):
        raise LayerDiffError(f"{name} {show(value)} is one text, not a list of texts: give a tuple such as "
                             f"{example}")
    if not isinstance(value, Sequence):
        raise LayerDiffError(f"{name} {show(value)} is {_kind(value)}, not a list of texts: give a tuple such as "
                             f"{example}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise LayerDiffError(f"{name}[{i}] {show(item)} is {_kind(item)}, not a text: every entry of {name} "
                                 "must be a string")
        _check_unicode(item, f"{name}[{i}]")
    return tuple(value)


def check_flag(value, name: str) -> bool:
    """True or False (numpy's bools too); 'no', 0 or None are refused rather than read as truthy."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise LayerDiffError(f"{name} {show(value)} is {_kind(value)}, not True or False: give a bool")


def check_callback(callback, name: str = "callback") -> Callable | None:
    if callback is not None and not callable(callback):
        raise LayerDiffError(f"{name} {show(callback)} is not callable: give a function (step, total, preview) or None")
    return callback


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise LayerDiffError(f"unknown {name} {show(value)}: choose one of {', '.join(map(str, choices))}")
    return value


def check_path(value, name: str, *, must_exist: bool = False) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise LayerDiffError(f"{name} {show(value)} is {_kind(value)}, not a path: give a file or folder name")
    path = os.fspath(value)
    if isinstance(path, bytes):
        raise LayerDiffError(f"{name} {show(value)} is a bytes path: give a str path")
    if must_exist and not os.path.exists(path):
        raise LayerDiffError(f"{name} {path}: no such file or folder: check the path")
    return path


def check_write_args(out_dir, meta, overwrite, psd) -> None:
    """write_layer_sets' arguments: a path, a dict (or None), and two real bools ('no' is not False)."""
    check_path(out_dir, "out_dir")
    if meta is not None and not isinstance(meta, dict):
        raise LayerDiffError(f"meta {show(meta)} is {_kind(meta)}, not a dict of JSON values (or None)")
    check_flag(overwrite, "overwrite")
    check_flag(psd, "psd")


# ---------------------------------------------------------------------------- devices and dtypes
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """torch.float32/float16/bfloat16, or one of their names (fp32, fp16, bf16)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise LayerDiffError(f"{name} {show(dtype)} is not a weight precision LayerDiff runs in: use torch.float32, "
                         "torch.float16 or torch.bfloat16 (or 'fp32', 'fp16', 'bf16')")


def check_device(device, name: str = "device") -> torch.device:
    """A device this torch can run on: cpu, cuda[:N] with CUDA present, mps where available."""
    if not isinstance(device, (str, torch.device)):
        raise LayerDiffError(f"{name} {show(device)} is {_kind(device)}, not a device: use 'cpu' or 'cuda'")
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise LayerDiffError(f"{name} {show(str(device))} is not a torch device: use cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return d
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise LayerDiffError(f"{name} {show(str(device))} but this torch sees no CUDA device (a CPU-only build, "
                                 "or no GPU or driver): use cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise LayerDiffError(f"{name} {show(str(device))} but torch sees {n} CUDA device(s): use cuda:0..cuda:{n - 1}")
        return d
    if d.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise LayerDiffError(f"{name} {show(str(device))} but this torch has no usable MPS (Apple GPU): use cpu")
        return d
    raise LayerDiffError(f"{name} {show(str(device))} cannot run LayerDiff: use cpu or cuda")


def check_load_args(device, dtype, base) -> tuple[torch.device, torch.dtype]:
    """load_model's device, dtype and base (a base that names nothing is refused, not ignored)."""
    if base is not None:
        check_path(base, "base", must_exist=True)
    return check_device(device), check_dtype(dtype)


# ---------------------------------------------------------------------------- memory
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def sampling_bytes(config, batch: int, layers: int, height: int, width: int, dtype: torch.dtype = torch.float32,
                   passes: int = 3) -> int:
    """Rough peak bytes of sampling at latent size height x width: the UNet's activations for batch x
    layers x ``passes`` inputs (conditional, unconditional, self-mask guidance), which grow with the
    first block's width (skip connections, convolution buffers, feed-forward) plus a part that does not
    (attention scores over the prompt tokens, the layer modules), and the float32 latents the sampler
    keeps (x, noise, x0, eps per pass, previous x0). Fitted on the tiny and toy presets, then rounded up."""
    from layerdiff.config import LAYER_CHANNELS  # here: layerdiff.config imports this module (via settings)

    c0 = int((config.unet.get("block_out_channels") or [320])[0])
    items = batch * layers * passes
    unet = items * height * width * (c0 * 24 + 512) * _itemsize(dtype)
    latents = batch * layers * LAYER_CHANNELS * height * width * 4 * (8 + 2 * passes)
    return unet + latents


def decoding_bytes(config, batch: int, layers: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> int:
    """Rough peak bytes of decoding and keeping the result at pixel size height x width: the VAE
    decoder's full-resolution activations for all images and masks of a call, and the stack
    (images, masks, the binarised copy, the uint8 pixels written)."""
    vae = [int(c) for c in config.vae.get("block_out_channels") or [128, 256]]
    top = max(vae[:2])  # the last upsampler works at full size with the second level's width
    items = batch * layers
    decoder = items * height * width * top * 4 * _itemsize(dtype)
    stack = items * height * width * (3 + 1) * 4 * 3
    return decoder + stack


def run_bytes(config, batch: int, layers: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> int:
    """Rough peak bytes of generating batch x layers images of height x width pixels (weights excluded):
    the larger stage, and a quarter more for what one stage leaves to the next (allocator caches)."""
    f = config.vae_scale_factor
    stages = (sampling_bytes(config, batch, layers, height // f, width // f, dtype),
              decoding_bytes(config, batch, layers, height, width, dtype))
    return max(stages) * 5 // 4


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in fields:
        return None
    return fields["MemAvailable"] + fields.get("SwapFree", 0)


def _cgroup_available() -> int | None:
    """Room left under a cgroup memory limit (containers; v2, else v1), None without one."""
    for limit_file, used_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(used_file) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes a huge number for "no limit"
            return None
        return max(0, int(limit) - used)
    return None


def _address_space_available() -> int | None:
    """Room left under this process's RLIMIT_AS (ulimit -v), None without one."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(0, soft - vm)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: free RAM plus free swap, within its cgroup's memory limit
    and its address-space limit; None when the platform does not say."""
    free = None
    try:
        import psutil  # ComfyUI installs it; it also knows Windows and macOS

        free = psutil.virtual_memory().available + psutil.swap_memory().free
    except (ImportError, OSError, RuntimeError):
        free = _meminfo_available()
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = None
    limits = [v for v in (free, _cgroup_available(), _address_space_available()) if v is not None]
    return min(limits) if limits else None


def available_bytes(device) -> int | None:
    """Bytes that can still be allocated on ``device``: GPU memory free plus what torch's cache holds
    unused; host memory as the loader counts it (RAM, swap, cgroup and RLIMIT_AS); None if unknown."""
    d = torch.device(device)
    if d.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(d)
            return int(free + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d))
        except (RuntimeError, AssertionError):
            return None
    if d.type != "cpu":
        return None
    return available_memory()


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.0f} MiB"


def check_memory(need: int, device, what: str) -> None:
    """Refuse work that needs more than ``device`` has left: one line naming the need and the room."""
    room = available_bytes(device)
    if room is not None and need > room:
        raise LayerDiffError(
            f"{what} needs about {_gib(need)} of {'GPU ' if torch.device(device).type == 'cuda' else ''}memory on "
            f"{torch.device(device)} but {_gib(room)} is free: lower the batch, the size or the layers, or close "
            "other programs"
        )


def check_run_memory(config, batch: int, layers: int, height: int, width: int, dtype: torch.dtype, device,
                     extra: int = 0) -> None:
    """check_memory for a whole run (sampling and decoding) plus ``extra`` bytes (weights not yet loaded)."""
    need = run_bytes(config, batch, layers, height, width, dtype) + int(extra)
    check_memory(need, device, f"{layers} layers x {batch} image(s) at {width}x{height}")
