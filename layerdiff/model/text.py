"""Tokenizers and prompt encoding.

SD 1.5 uses CLIP's BPE tokenizer (``layerdiff.model.clip_tokenizer`` finds it offline). The toy and
tiny presets use a word-level tokenizer built from a word list stored in the model's config, so a
built-in model needs no file but its own checkpoint.

:func:`unknown_words` names the words of a prompt that a tokenizer can only read as its unknown
token: with a word-level tokenizer the model sees no difference between "a pink hexagon" and "a
[UNK] [UNK]", so callers warn (``layerdiff.pipeline.encode_prompts``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from layerdiff.errors import LayerDiffError
from layerdiff.model.clip_tokenizer import load_clip_tokenizer

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


def unknown_words(tokenizer, prompt: str, trained: Iterable[str] | None = None) -> list[str]:
    """Pieces of ``prompt`` that ``tokenizer`` maps to its unknown id, as written, in order, each once;
    with ``trained`` (the words a word-level model was trained on), also the tokens outside it.

    The tokenizer itself decides (its normaliser, its splitting): "LEFT" is the known word "left",
    and in "a star." the known "star" is kept apart from the unknown ".". Unknown pieces that touch
    are joined ("don't" is one piece, not "don", "'" and "t"). A byte-level BPE (SD 1.5's CLIP) has a
    token for every byte and never answers anything; a special token typed literally is not a word.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    known = None if trained is None else {w.lower() for w in trained}
    if (unk is None and known is None) or not prompt or not prompt.strip():
        return []
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        spans = [span for i, t, span in zip(ids, tokens, enc["offset_mapping"])
                 if i == unk or (known is not None and t.lower() not in known)]
        pieces = _join_touching(prompt, spans)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets: whole words holding an unknown id
        pieces = [w for w in prompt.split()
                  if any(tokenizer.convert_tokens_to_ids(t) == unk or (known is not None and t.lower() not in known)
                         for t in tokenizer.tokenize(w))]
    out, seen = [], set()
    for piece in pieces:
        if piece and piece not in special and piece.lower() not in seen:
            seen.add(piece.lower())
            out.append(piece)
    return out


def _join_touching(text: str, spans) -> list[str]:
    """Character spans (start, end), in order -> the text of each run of spans with no gap between."""
    runs: list[list[int]] = []
    for start, end in spans:
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [text[a:b] for a, b in runs]
