"""Prompts and their encoding: LayerPrompts (what the user asks for) -> LayerConditioning (the
encoded, enhanced tokens the sampler reads). METHOD.md sections 1 and 3.
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
from layerdiff.stack import default_name

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


def unknown_words_warning(model, prompts: LayerPrompts | list[LayerPrompts]) -> str:
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


@dataclass
class LayerConditioning:
    """Encoded prompts for a batch (ComfyUI type ``LAYERDIFF_CONDITIONING``).

    global_tokens (B, T, D); layer_tokens (B, L, T, D) *enhanced*; the unconditional (or negative)
    versions of both; valid (B, L) bool; layer_words (B, L, T, D) the layer prompts' input word
    embeddings, for a model with a layout prior (else None).
    """

    global_tokens: torch.Tensor
    layer_tokens: torch.Tensor
    uncond_global_tokens: torch.Tensor
    uncond_layer_tokens: torch.Tensor
    valid: torch.Tensor
    global_prompts: tuple[str, ...] = ()
    layer_prompts: tuple[tuple[str, ...], ...] = ()
    negative_prompt: str = ""
    layer_names: tuple[tuple[str, ...], ...] = ()  # per prompt set: LayerPrompts.layer_names()
    layer_words: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.global_tokens.shape[0]

    @property
    def num_layers(self) -> int:
        return self.layer_tokens.shape[1]

    def repeat(self, n: int) -> LayerConditioning:
        """Each sample repeated n times (sample-major), for batch generation from one prompt set."""
        if n == 1:
            return self
        r = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return LayerConditioning(
            r(self.global_tokens), r(self.layer_tokens), r(self.uncond_global_tokens), r(self.uncond_layer_tokens),
            r(self.valid), tuple(p for p in self.global_prompts for _ in range(n)),
            tuple(p for p in self.layer_prompts for _ in range(n)), self.negative_prompt,
            tuple(p for p in self.layer_names for _ in range(n)),
            None if self.layer_words is None else r(self.layer_words),
        )


@torch.no_grad()
def encode_prompts(model, prompts: LayerPrompts | list[LayerPrompts]) -> LayerConditioning:
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
    words = None
    if getattr(model.unet.prompt_enhancer, "layout", None) is not None:
        flat = [t for row in layer_texts for t in row]
        words = model.embed_words(flat)[:, :n].unflatten(0, (B, L))  # (B, L, T', D)
    return LayerConditioning(
        glob, both[:B], u_glob, both[B:], valid,
        global_prompts=tuple(p.global_prompt for p in sets),
        layer_prompts=tuple(tuple(p.layers) for p in sets),
        layer_names=tuple(p.layer_names() for p in sets),
        negative_prompt=negs[0],
        layer_words=words,
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
