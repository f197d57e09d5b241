"""The SD1.5 CLIP tokenizer (openai/clip-vit-large-patch14's BPE), found or rebuilt offline.

Search order: an explicit folder, ``$LAYERDIFF_CLIP_TOKENIZER``, the caller's ``search_dirs``
(ComfyUI passes ``comfy/sd1_tokenizer``), the LayerDiff cache, and last the BPE file that the
``open_clip_torch`` package ships, converted once to ``vocab.json`` + ``merges.txt`` exactly as
OpenAI's ``SimpleTokenizer`` builds its table (github.com/openai/CLIP, clip/simple_tokenizer.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.model")

ENV_TOKENIZER = "LAYERDIFF_CLIP_TOKENIZER"
ENV_CACHE = "LAYERDIFF_CACHE"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_N_MERGES = 49152 - 256 - 2  # SimpleTokenizer keeps lines[1 : 49152 - 256 - 2 + 1]
_OPEN_CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
_FIX = (
    f"install the BPE file with `pip install --no-deps open_clip_torch`, or point {ENV_TOKENIZER} "
    "at a folder with vocab.json and merges.txt"
)


def _has_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def _tokenizer_folder(folder: Path) -> Path | None:
    """``folder`` itself or its ``tokenizer/`` subfolder (a diffusers model folder), if it has the files."""
    for candidate in (folder, folder / "tokenizer"):
        if _has_files(candidate):
            return candidate
    return None


def cache_dir() -> Path:
    """``$LAYERDIFF_CACHE/clip_tokenizer``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``layerdiff/clip_tokenizer``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser() / "clip_tokenizer"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "layerdiff" / "clip_tokenizer"


def open_clip_bpe_path() -> Path | None:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, located without importing open_clip (it needs torchvision)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / _OPEN_CLIP_BPE
        if candidate.is_file():
            return candidate
    return None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (same order as SimpleTokenizer)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """(token -> id, merge lines "a b") from OpenAI's gzip BPE file, in SimpleTokenizer's order."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise LayerDiffError(
            f"{bpe_gz} gives {len(set(vocab))} tokens, not {VOCAB_SIZE}: reinstall open_clip_torch"
        )
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_tokenizer_files(bpe_gz: Path, folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (HF layout, "#version" header line) built from ``bpe_gz``."""
    vocab, merges = vocab_and_merges(bpe_gz)
    folder.mkdir(parents=True, exist_ok=True)
    # merges first: a folder counts as ready once vocab.json exists next to merges.txt
    _write_atomic(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    logger.info("built the CLIP tokenizer files from %s in %s", bpe_gz, folder)
    return folder


def find_clip_tokenizer_files(
    path: str | os.PathLike | None = None, search_dirs: Iterable[str | os.PathLike] | None = None
) -> Path:
    """The folder holding ``vocab.json`` + ``merges.txt`` to use, building it from open_clip's file if needed."""
    if path is not None:
        folder = _tokenizer_folder(Path(path).expanduser())
        if folder is None:
            raise LayerDiffError(
                f"CLIP tokenizer folder {path} has no vocab.json and merges.txt: pass a folder that has both"
            )
        return folder
    env = os.environ.get(ENV_TOKENIZER)
    if env:
        folder = _tokenizer_folder(Path(env).expanduser())
        if folder is None:
            raise LayerDiffError(
                f"{ENV_TOKENIZER}={env} has no vocab.json and merges.txt: point it at a folder that has both"
            )
        return folder
    if isinstance(search_dirs, (str, os.PathLike)):
        search_dirs = [search_dirs]
    for d in search_dirs or ():
        folder = _tokenizer_folder(Path(d).expanduser())
        if folder is not None:
            return folder
    cached = cache_dir()
    if _has_files(cached):
        return cached
    bpe = open_clip_bpe_path()
    if bpe is None:
        raise LayerDiffError(f"no CLIP tokenizer files found offline: {_FIX}")
    try:
        return build_tokenizer_files(bpe, cached)
    except OSError as e:
        # A read-only home must not stop generation: build a private copy instead.
        logger.warning("cannot write the CLIP tokenizer cache %s (%s); using a temporary folder", cached, e)
        return build_tokenizer_files(bpe, Path(tempfile.mkdtemp(prefix="layerdiff_clip_tokenizer_")))


def load_clip_tokenizer(
    path: str | os.PathLike | None = None, search_dirs: Iterable[str | os.PathLike] | None = None
):
    """SD1.5's ``transformers.CLIPTokenizer``: 49408 tokens, max length 77, padding with ``<|endoftext|>``."""
    from transformers import CLIPTokenizer

    folder = find_clip_tokenizer_files(path, search_dirs)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(
            str(folder), local_files_only=True, model_max_length=MAX_LENGTH, pad_token=EOS
        )
    except (OSError, ValueError) as e:
        raise LayerDiffError(f"cannot load the CLIP tokenizer from {folder} ({e}): {_FIX}") from None
    if len(tokenizer) != VOCAB_SIZE:
        raise LayerDiffError(
            f"CLIP tokenizer in {folder} has {len(tokenizer)} tokens, not {VOCAB_SIZE}: {_FIX}"
        )
    logger.debug("CLIP tokenizer from %s", folder)
    return tokenizer
