"""Tokenizers and prompt encoding.

SD 1.5 uses CLIP's BPE tokenizer (``layerdiff.io.clip_tokenizer`` finds it offline). The toy and
tiny presets use a word-level tokenizer built from a word list stored in the model's config, so a
built-in model needs no file but its own checkpoint.
"""

from __future__ import annotations

from typing import Any

from layerdiff.errors import LayerDiffError

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"


def build_word_tokenizer(words: list[str], max_length: int):
    """A fast word-level tokenizer: lower-cased, split on whitespace/punctuation, BOS ... EOS, padded."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )


def build_tokenizer(spec: dict[str, Any], search_dirs: list[str] | None = None):
    """The tokenizer a config names: ``{"type": "words", ...}`` or ``{"type": "clip_bpe"}``."""
    kind = spec.get("type")
    if kind == "words":
        return build_word_tokenizer(list(spec["words"]), int(spec["max_length"]))
    if kind == "clip_bpe":
        from layerdiff.io.clip_tokenizer import load_clip_tokenizer

        return load_clip_tokenizer(spec.get("path"), search_dirs=search_dirs)
    raise LayerDiffError(f"unknown tokenizer type {kind!r} in the model config: expected 'words' or 'clip_bpe'")


def tokenize(tokenizer, prompts: list[str]):
    """input_ids (N, max_length), padded and truncated to the tokenizer's model_max_length."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
