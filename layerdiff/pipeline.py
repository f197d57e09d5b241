"""Text -> LayerStack: encode prompts, enhance them, sample, decode images and masks.

METHOD.md sections 1 and 4. The pieces are separate functions so that the ComfyUI nodes (Prompt
Enhancer -> Layered KSampler) and the command line share them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from layerdiff import limits
from layerdiff.config import trained_words
from layerdiff.errors import LayerDiffError
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.model.text import unknown_words
from layerdiff.sampling import SCHEDULERS, Callback, LayerConditioning, Lock, sample
from layerdiff.stack import LayerStack

logger = logging.getLogger("layerdiff.pipeline")


@dataclass(frozen=True)
class LayerPrompts:
    """Prompts of one composable image (ComfyUI type ``LAYERDIFF_PROMPTS``).

    ``layers[0]`` is the background prompt, then the foregrounds back to front.
    """

    global_prompt: str = ""
    layers: tuple[str, ...] = ()
    negative: str = ""
    names: tuple[str, ...] = field(default=())

    def __post_init__(self):
        # a string for ``layers`` would otherwise be one layer per letter; lists become tuples (hashable)
        set_ = object.__setattr__
        set_(self, "global_prompt", limits.check_text(self.global_prompt, "global_prompt"))
        set_(self, "layers", limits.check_texts(self.layers, "layers"))
        set_(self, "negative", limits.check_text(self.negative, "negative"))
        set_(self, "names", limits.check_texts(self.names, "names", "('background', 'star')"))

    def add_layer(self, prompt: str, name: str = "") -> LayerPrompts:
        names = tuple(self.names) + ("",) * (len(self.layers) - len(self.names))
        return LayerPrompts(self.global_prompt, tuple(self.layers) + (prompt,), self.negative, names + (name,))

    def layer_names(self) -> tuple[str, ...]:
        out = []
        for i, prompt in enumerate(self.layers):
            given = self.names[i] if i < len(self.names) else ""
            out.append(given or default_name(i, prompt))
        return tuple(out)


def default_name(index: int, prompt: str) -> str:
    """'background: a brick wall', 'layer 1: a red star' (PSD layer names; 60 characters at most)."""
    head = "background" if index == 0 else f"layer {index}"
    return f"{head}: {prompt}"[:60] if prompt else head


def check_prompts(prompts: LayerPrompts, max_layers: int) -> None:
    n = len(prompts.layers)
    if n == 0:
        raise LayerDiffError("no layer prompts: give at least a background prompt (the first layer)")
    if n > max_layers:
        raise LayerDiffError(
            f"{n} layer prompts but this model generates at most {max_layers} layers (background + "
            f"{max_layers - 1} foregrounds): remove {n - max_layers} layer prompt(s)"
        )
    if not prompts.global_prompt.strip():
        raise LayerDiffError("the global prompt is empty: describe the whole scene, e.g. 'a red star in front of a brick wall'")
    for i, p in enumerate(prompts.layers):
        if not p.strip():
            what = "background" if i == 0 else f"foreground {i}"
            raise LayerDiffError(f"the prompt of layer {i} ({what}) is empty: describe what that layer shows")


def check_size(width: int, height: int, multiple: int = 8) -> None:
    """Whole numbers of pixels, multiples of ``multiple``, within limits.RANGES (8..4096)."""
    limits.check_size(width, height, multiple)


PROMPTS_EXAMPLE = "LayerPrompts('a red star in front of a brick wall', ('a brick wall', 'a red star'))"


def check_model(model) -> LayerDiffModel:
    if not isinstance(model, LayerDiffModel):
        raise LayerDiffError(f"model {limits.show(model)} is not a LayerDiff model: load one with "
                             "layerdiff.io.checkpoint.load_model('layerdiff-toy')")
    return model


def check_prompt_sets(prompts) -> list[LayerPrompts]:
    """One LayerPrompts, or a non-empty list of them, as a list."""
    if isinstance(prompts, LayerPrompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, LayerPrompts) for p in prompts):
        return list(prompts)
    raise LayerDiffError(f"prompts {limits.show(prompts)} is not a LayerPrompts (or a list of them): give e.g. "
                         f"{PROMPTS_EXAMPLE}")


VOCABULARY_HINT = "the built-in model's words: README 'Built-in model vocabulary'"


def _labelled_prompts(sets: list[LayerPrompts]) -> list[tuple[str, str]]:
    """(label, text) of every prompt of the sets: global, background, layer 1.., negative."""
    out = []
    for b, p in enumerate(sets):
        head = f"image {b} " if len(sets) > 1 else ""
        out.append((f"{head}global prompt", p.global_prompt))
        out += [(f"{head}{'background' if i == 0 else f'layer {i}'} prompt", t) for i, t in enumerate(p.layers)]
        out.append((f"{head}negative prompt", p.negative))
    return out


def _quote(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())  # one line, even from a multiline widget
    return f'"{flat if len(flat) <= limit else flat[:limit - 3] + "..."}"'


def unknown_words_warning(model: LayerDiffModel, prompts: LayerPrompts | list[LayerPrompts]) -> str:
    """One line naming the prompt words the model's tokenizer reads as its unknown token, and
    where they are; "" when there are none (always, for SD 1.5's CLIP tokenizer)."""
    sets = [prompts] if isinstance(prompts, LayerPrompts) else list(prompts)
    config = getattr(model, "config", None)
    trained = trained_words(config) if config is not None else None
    groups: dict[tuple[str, ...], list[tuple[str, str]]] = {}  # unknown words -> prompts holding them
    for label, text in _labelled_prompts(sets):
        words = tuple(unknown_words(model.tokenizer, text, trained))
        if words and (label, text) not in groups.get(words, []):
            groups.setdefault(words, []).append((label, text))
    if not groups:
        return ""
    parts = []
    for words, where in groups.items():
        shown = ", ".join(w if w.replace("'", "").replace("-", "").isalnum() else repr(w) for w in words)
        place = f"{where[0][0]} {_quote(where[0][1])}" if len(where) == 1 else ", ".join(label for label, _ in where)
        parts.append(f"{shown} ({place})")
    return (f"words the model does not know (not in its training prompts; they steer nothing): {'; '.join(parts)}; "
            f"{VOCABULARY_HINT}")


@torch.no_grad()
def encode_prompts(model: LayerDiffModel, prompts: LayerPrompts | list[LayerPrompts]) -> LayerConditioning:
    """Prompts of B images -> conditioning with enhanced layer tokens (B, L, T, D).

    Several prompt sets may have different layer counts: they are padded to the largest with
    empty slots (valid = False). The unconditional side uses the negative prompt (or "") for the
    global prompt and for every layer, as in training's prompt dropout. Words the tokenizer does not
    know are logged as one warning (:func:`unknown_words_warning`).
    """
    check_model(model)
    sets = check_prompt_sets(prompts)
    for p in sets:
        check_prompts(p, model.max_layers)
    warning = unknown_words_warning(model, sets)
    if warning:
        logger.warning(warning, extra={"layerdiff_unknown_words": warning})
    B, L = len(sets), max(len(p.layers) for p in sets)
    layer_texts = [list(p.layers) + [""] * (L - len(p.layers)) for p in sets]
    valid = torch.tensor([[i < len(p.layers) for i in range(L)] for p in sets], device=model.device)
    negs = [p.negative for p in sets]
    texts = [p.global_prompt for p in sets] + [t for row in layer_texts for t in row]
    uniq = sorted(set(texts) | set(negs))
    enc = dict(zip(uniq, model.encode_text(uniq)))  # each distinct text encoded once
    glob = torch.stack([enc[p.global_prompt] for p in sets])  # (B, T, D)
    n = model.config.layer_prompt_tokens or None  # layer prompts keep their first n token states
    lay = torch.stack([torch.stack([enc[t][:n] for t in row]) for row in layer_texts])  # (B, L, T', D)
    u_glob = torch.stack([enc[n_] for n_ in negs])
    u_lay = torch.stack([enc[n_][:n] for n_ in negs])[:, None].expand(-1, L, -1, -1)
    both = model.unet.enhance(torch.cat([glob, u_glob]), torch.cat([lay, u_lay]))  # one enhancer call
    return LayerConditioning(
        glob, both[:B], u_glob, both[B:], valid,
        global_prompts=tuple(p.global_prompt for p in sets),
        layer_prompts=tuple(tuple(p.layers) for p in sets),
        negative_prompt=negs[0],
    )


@torch.no_grad()
def decode_stack(
    model: LayerDiffModel,
    latents: torch.Tensor,
    prompts: tuple[str, ...] = (),
    names: tuple[str, ...] = (),
    global_prompt: str = "",
    seeds: tuple[int | None, ...] = (),
    binarize: bool = True,
) -> LayerStack:
    """Latents (B, L, 8, h, w) -> LayerStack; masks binarised with overlaps resolved front-first."""
    images, masks = model.decode_layers(latents)
    stack = LayerStack(
        images=images.float().cpu(),
        masks=masks.float().cpu(),
        latents=latents.float().cpu(),
        names=tuple(names),
        prompts=tuple(prompts),
        global_prompt=global_prompt,
        seeds=tuple(seeds),
    )
    return stack.binarized() if binarize else stack


def sampler_kwargs(
    model: LayerDiffModel,
    steps: int | None = None,
    cfg: float | None = None,
    background_cfg: float | None = None,
    scheduler: str | None = None,
    mask_guidance: float | None = None,
    mask_guidance_start: float | None = None,
    layout_cleanup: float | None = None,
    layout_cleanup_start: float | None = None,
    empty_layer_retries: int | None = None,
) -> dict:
    """Keyword arguments of :func:`layerdiff.sampling.sample` for this model: every None takes the
    model's default (``config.sampling``), and the latents that self-mask guidance and layout
    cleanup read come along when they are on. Given values are checked against limits.RANGES first."""
    check_model(model)
    for name, value in (("steps", steps), ("cfg", cfg), ("background_cfg", background_cfg),
                        ("mask_guidance", mask_guidance), ("mask_guidance_start", mask_guidance_start),
                        ("layout_cleanup", layout_cleanup), ("layout_cleanup_start", layout_cleanup_start),
                        ("empty_layer_retries", empty_layer_retries)):
        limits.check_number(value, name, optional=True)
    if scheduler is not None:
        limits.check_choice(scheduler, "scheduler", SCHEDULERS)
    d = model.config.sampling
    smg = d.mask_guidance if mask_guidance is None else mask_guidance
    cleanup = d.layout_cleanup if layout_cleanup is None else layout_cleanup
    retries = d.empty_layer_retries if empty_layer_retries is None else empty_layer_retries
    return {
        "steps": d.steps if steps is None else steps,
        "cfg": d.cfg if cfg is None else cfg,
        "background_cfg": d.background_cfg if background_cfg is None else background_cfg,
        "scheduler": d.scheduler if scheduler is None else scheduler,
        "scheduler_config": model.config.scheduler,
        "mask_guidance": smg,
        "mask_guidance_start": d.mask_guidance_start if mask_guidance_start is None else mask_guidance_start,
        "mask_guidance_blur": d.mask_guidance_blur_sigma,
        "mask_guidance_erode": d.mask_guidance_erode,
        "mask_axis": model.mask_axis() if smg or cleanup or retries else None,
        "layout_cleanup": cleanup,
        "layout_cleanup_start": d.layout_cleanup_start if layout_cleanup_start is None else layout_cleanup_start,
        "empty_latent": model.empty_layer_latent() if cleanup else None,
        "empty_layer_retries": retries,
        "empty_layer_check": d.empty_layer_check,
        "eta": d.eta,
    }


def generate(
    model: LayerDiffModel,
    prompts: LayerPrompts,
    width: int | None = None,
    height: int | None = None,
    seed: int = 0,
    batch: int = 1,
    steps: int | None = None,
    cfg: float | None = None,
    mask_guidance: float | None = None,
    mask_guidance_start: float | None = None,
    scheduler: str | None = None,
    background_cfg: float | None = None,
    layout_cleanup: float | None = None,
    callback: Callback | None = None,
    conditioning: LayerConditioning | None = None,
    lock: Lock | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    empty_layer_retries: int | None = None,
) -> LayerStack:
    """Generate ``batch`` composable images; sample b uses seed ``seed + b`` (mod 2**64). Defaults (None):
    the model config's sampling settings. Every argument is checked (limits.RANGES) before any work,
    and a run that cannot fit the device's memory is refused before sampling."""
    check_model(model)
    if not isinstance(prompts, LayerPrompts):
        raise LayerDiffError(f"prompts {limits.show(prompts)} is not a LayerPrompts: give e.g. {PROMPTS_EXAMPLE}")
    if conditioning is None:
        check_prompts(prompts, model.max_layers)
    elif not isinstance(conditioning, LayerConditioning):
        raise LayerDiffError(f"conditioning {limits.show(conditioning)} is not a LayerConditioning: give the output "
                             "of encode_prompts, or None")
    width = model.config.image_size if width is None else width
    height = model.config.image_size if height is None else height
    check_size(width, height, model.vae_scale_factor)
    seed = limits.check_int(seed, "seed")
    batch = limits.check_int(batch, "batch")
    layers = conditioning.num_layers if conditioning is not None else len(prompts.layers)
    limits.check_run_size(width, height, layers, batch)
    kwargs = sampler_kwargs(model, steps=steps, cfg=cfg, background_cfg=background_cfg, scheduler=scheduler,
                            mask_guidance=mask_guidance, mask_guidance_start=mask_guidance_start,
                            layout_cleanup=layout_cleanup, empty_layer_retries=empty_layer_retries)
    strength = limits.check_float(strength, "strength")
    limits.check_callback(callback)
    limits.check_run_memory(model.config, batch, layers, height, width, model.dtype, model.device)
    cond = conditioning if conditioning is not None else encode_prompts(model, prompts)
    if cond.batch_size == 1 and batch > 1:
        cond = cond.repeat(batch)
    elif cond.batch_size != batch:
        raise LayerDiffError(f"conditioning holds {cond.batch_size} prompt sets but batch is {batch}")
    f = model.vae_scale_factor
    latents = sample(
        model.unet, cond, height // f, width // f, limits.batch_seeds(seed, batch), **kwargs,
        lock=lock, init_latents=init_latents, strength=strength, callback=callback,
    )
    return decode_stack(
        model, latents, prompts=tuple(prompts.layers), names=prompts.layer_names(),
        global_prompt=prompts.global_prompt, seeds=tuple([seed] * len(prompts.layers)),
    )


def describe_scene(layer_prompts) -> str:
    """A global prompt from layer prompts (background first), phrased like the training data's:
    'a red star and a blue circle in front of a brick wall' (foregrounds back to front)."""
    prompts = [p.strip() for p in layer_prompts if p and p.strip()]
    if len(prompts) <= 1:
        return prompts[0] if prompts else ""
    things = prompts[1:]
    joined = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    return f"{joined} in front of {prompts[0]}"


class PreviewDecoder:
    """Cheap preview of a sampler step: predicted x0 (B, L, 8, h, w) -> composite RGB (h, w, 3) in
    0..1 of sample 0, at latent resolution, without a VAE decode.

    Colours: a linear latent -> RGB map fitted (least squares) on the latents of flat colour images
    (the corners of the RGB cube and mid grey), so it works for any VAE, like ComfyUI's
    latent_rgb_factors. Masks: the mask-axis projection of self-mask guidance (sampling.read_masks).
    Built once per run (one small VAE encode), then an einsum per step.
    """

    def __init__(self, model: LayerDiffModel):
        from layerdiff.sampling import read_masks

        self._read_masks = read_masks
        colours = torch.tensor(
            [[r, g, b] for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)] + [[0.5, 0.5, 0.5]]
        )  # (9, 3)
        size = model.vae_scale_factor * 4
        flat = (colours * 2 - 1)[:, :, None, None].expand(-1, -1, size, size)  # (9, 3, S, S)
        lat = model.encode_images(flat).float().mean(dim=(2, 3)).cpu()  # (9, 4)
        design = torch.cat([lat, torch.ones(len(lat), 1)], dim=1)  # (9, 5): latent + bias
        gram = design.T @ design  # ridge keeps a near-degenerate (random) VAE's map bounded
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0])
        self.factors = torch.linalg.solve(gram + ridge, design.T @ colours)  # (5, 3)
        self.white, self.black = (t.float().cpu() for t in model.mask_axis())

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0[0].detach().float().cpu()  # (L, 8, h, w)
        w = self.factors
        rgb = (torch.einsum("lchw,cd->lhwd", x[:, :4], w[:4]) + w[4]).clamp(0, 1)  # (L, h, w, 3)
        masks = self._read_masks(x[None], self.white, self.black)[0].clamp(0, 1)  # (L-1, h, w)
        out = rgb[0]
        for k in range(1, x.shape[0]):  # back to front, METHOD.md section 1
            m = masks[k - 1, ..., None]
            out = m * rgb[k] + (1 - m) * out
        return out
