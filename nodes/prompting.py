"""Layer Prompt (a chain of per-layer prompts) and Prompt Enhancer (prompts -> conditioning)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from layerdiff.conditioning import LayerPrompts, describe_scene, encode_prompts
from layerdiff.errors import LayerDiffError

from . import _host, convert


class _UnknownWordNotes(logging.Handler):
    """Keeps the library's unknown-word warnings (encode_prompts tags them); they still reach the log."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        note = getattr(record, "layerdiff_unknown_words", None)
        if note and note not in self.notes:
            self.notes.append(note)


@contextmanager
def unknown_word_notes() -> Iterator[list[str]]:
    """The unknown-word warnings logged while the block runs (ComfyUI's log shows them as well)."""
    handler = _UnknownWordNotes()
    logger = logging.getLogger("layerdiff")
    logger.addHandler(handler)
    try:
        yield handler.notes
    finally:
        logger.removeHandler(handler)


def with_notes(result: tuple, notes: list[str]):
    """A node's return value: the outputs, and with notes ComfyUI's ``ui`` form, whose ``text`` goes
    to the browser with the node's results (the outputs, sockets and order, stay the same)."""
    return {"ui": {"text": list(notes)}, "result": result} if notes else result


class LayerDiffLayerPrompt:
    DESCRIPTION = (
        "Adds one layer's prompt to a chain. The first Layer Prompt of a chain (nothing connected to 'previous') "
        "is the BACKGROUND; each following one adds a foreground in front of the layers before it. The scene as "
        "a whole (global prompt) and the negative prompt are set on the Prompt Enhancer."
    )
    CATEGORY = "LayerDiff/conditioning"
    RETURN_TYPES = ("LAYERDIFF_PROMPTS", "INT")
    RETURN_NAMES = ("prompts", "layer_index")
    OUTPUT_TOOLTIPS = (
        "The chain so far: background first, then the foregrounds back to front.",
        "This layer's index in the chain (0 = background): connect it to Layer Edit / Split Layers.",
    )
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "What this layer shows, e.g. 'a brick wall' for the background or 'a red star' for a "
                    "foreground.")}),
            },
            "optional": {
                "previous": ("LAYERDIFF_PROMPTS", {"tooltip": (
                    "The layers behind this one (another Layer Prompt). Leave empty on the first node: that "
                    "layer is the background.")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompt):
        if prompt is not None and not str(prompt).strip():
            return "prompt is empty: describe what this layer shows (the first Layer Prompt is the background)"
        return True

    def add(self, prompt, previous=None):
        chain = LayerPrompts() if previous is None else previous
        if not isinstance(chain, LayerPrompts):
            raise LayerDiffError(f"previous must be a Layer Prompt output (LAYERDIFF_PROMPTS), got {type(chain).__name__}")
        if not prompt.strip():
            raise LayerDiffError(self.VALIDATE_INPUTS(prompt))
        return chain.add_layer(prompt.strip()), len(chain.layers)


class LayerDiffPromptEnhancer:
    DESCRIPTION = (
        "Encodes the global prompt and every layer prompt with the model's text encoder and runs the "
        "layer-specific prompt enhancer (each layer prompt attends to the global prompt). Checks the layer "
        "count against the model, and names the prompt words the model does not know in ComfyUI's log and in "
        "this node's 'text' result: the built-in model knows only its toy world's words."
    )
    CATEGORY = "LayerDiff/conditioning"
    RETURN_TYPES = ("LAYERDIFF_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Encoded and enhanced prompts for the Layered KSampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("LAYERDIFF_MODEL", {"tooltip": "The LayerDiff model (Load LayerDiff)."}),
                "prompts": ("LAYERDIFF_PROMPTS", {"tooltip": "The layer prompts: the last Layer Prompt of a chain."}),
                "global_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "The whole scene, e.g. 'a red star in front of a brick wall'. Empty: built from the layer "
                    "prompts ('<foregrounds> in front of <background>').")}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "What to avoid, for the whole scene and every layer (optional).")}),
            }
        }

    def encode(self, model, prompts, global_prompt="", negative_prompt=""):
        if not isinstance(prompts, LayerPrompts):
            raise LayerDiffError(f"prompts must come from Layer Prompt (LAYERDIFF_PROMPTS), got {type(prompts).__name__}")
        scene = global_prompt.strip() or prompts.global_prompt.strip() or describe_scene(prompts.layers)
        negative = negative_prompt.strip() or prompts.negative
        full = LayerPrompts(scene, prompts.layers, negative, prompts.names)
        _host.ready(model)
        with unknown_word_notes() as notes:
            cond = encode_prompts(model, full)
        return with_notes((convert.conditioning_to(cond, _host.intermediate_device()),), notes)
