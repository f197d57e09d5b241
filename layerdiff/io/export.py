"""Write a LayerStack as a folder of files: composite, per-layer PNGs, masks, a PSD and meta.json.

A set of files is written whole or not at all (see layerdiff.io.resultset): everything goes into a
hidden staging folder first and is renamed into place at the end, meta.json last, so a crash, a
kill or a full disk never leaves PNGs without their PSD or meta.json. Single files are written
atomically (layerdiff.io.writing: a temp file in the same folder, then os.replace). Existing files
are refused unless overwrite=True, and all target names are checked before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from layerdiff.errors import LayerDiffError
from layerdiff.io import writing
from layerdiff.io.psd import check_psd_size, require_psd_tools, save_psd
from layerdiff.io.resultset import write_result_set
from layerdiff.io.writing import check_export_args, check_free, ensure_dir, png_bytes, to_uint8
from layerdiff.stack import LayerStack

logger = logging.getLogger("layerdiff.io.export")

COMPOSITE_FILE = "composite.png"
PSD_FILE = "layers.psd"
META_FILE = "meta.json"
# keys that write_layer_set puts into meta.json; a caller's meta with the same key is overridden
STACK_META_KEYS = (
    "width",
    "height",
    "num_layers",
    "batch_index",
    "global_prompt",
    "composite",
    "psd",
    "layers",
)


def layer_file(i: int) -> str:
    return f"layer_{i:02d}.png"


def mask_file(i: int) -> str:
    return f"mask_{i:02d}.png"


def layer_set_files(stack: LayerStack, out_dir: str | os.PathLike, psd: bool = True) -> list[Path]:
    """The paths write_layer_set writes, in write order (meta.json last)."""
    out = Path(out_dir)
    names = [COMPOSITE_FILE] + [layer_file(i) for i in range(stack.num_layers)]
    names += [mask_file(i) for i in range(1, stack.num_layers)]
    names += [PSD_FILE] * psd + [META_FILE]
    return [out / n for n in names]


def _meta_json(stack: LayerStack, meta: dict | None, batch_index: int, psd: bool) -> bytes:
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise LayerDiffError(f"meta must be a dict of JSON values, got {type(meta).__name__}")
    clash = [k for k in STACK_META_KEYS if k in meta]
    if clash:
        logger.warning("meta keys %s are replaced by the stack's own values in %s", clash, META_FILE)
    layers = [
        {
            "index": i,
            "name": stack.names[i],
            "prompt": stack.prompts[i],
            # seeds describe batch sample 0; other samples' seeds are not known here
            "seed": stack.seeds[i] if batch_index == 0 else None,
            "image": layer_file(i),
            "mask": mask_file(i) if i else None,
        }
        for i in range(stack.num_layers)
    ]
    data = {
        **meta,
        "width": stack.width,
        "height": stack.height,
        "num_layers": stack.num_layers,
        "batch_index": batch_index,
        "global_prompt": stack.global_prompt,
        "composite": COMPOSITE_FILE,
        "psd": PSD_FILE if psd else None,
        "layers": layers,
    }
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise LayerDiffError(
            f"meta cannot be written as JSON ({e}); pass only str, int, finite float, bool, None, list "
            f"and dict values"
        ) from e
    # Lone surrogates (command-line bytes that are not UTF-8 arrive as such) have no UTF-8 form;
    # inside a JSON string their \udcXX escape is valid JSON and reads back as the same text.
    return (text + "\n").encode("utf-8", "backslashreplace")


_SET_FILE_RE = re.compile(r"^(?:composite\.png|layers\.psd|(?:layer|mask)_\d{2,}\.png)$")


def _old_set_files(folder: Path) -> list[str]:
    """Files named by the meta.json already in `folder` (an old set that overwrite replaces); only
    names this module writes, so a hand-edited meta.json can never name another file."""
    try:
        with open(folder / META_FILE, "rb") as f:
            old = json.loads(f.read(1 << 20))
        names = [old.get("composite"), old.get("psd")]
        names += [layer.get(k) for layer in old.get("layers", []) for k in ("image", "mask")]
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return []
    return [n for n in names if isinstance(n, str) and _SET_FILE_RE.match(n)]


def _check_set_args(stack, meta, batch_index, psd) -> bytes:
    """Everything that can fail before a write; returns meta.json's bytes."""
    check_export_args(stack, batch_index)
    meta_bytes = _meta_json(stack, meta, batch_index, psd)  # bad meta fails before any write
    if psd:
        require_psd_tools()
        check_psd_size(stack.width, stack.height)
    return meta_bytes


def _write_set_files(stack: LayerStack, folder: Path, meta_bytes: bytes, batch_index: int, psd: bool) -> None:
    """Write sample `batch_index`'s files into `folder` (in a staging folder)."""
    folder.mkdir(exist_ok=True)
    one = stack.select_batch([batch_index])
    k = stack.num_layers
    targets = layer_set_files(stack, folder, psd)
    writing.atomic_write(targets[0], png_bytes(to_uint8(one.composite()[0])))  # (H, W, 3)
    writing.atomic_write(targets[1], png_bytes(to_uint8(one.images[0, 0])))  # (H, W, 3)
    for i in range(1, k):
        writing.atomic_write(targets[1 + i], png_bytes(to_uint8(one.layer_rgba(i)[0])))  # (H, W, 4)
    for i in range(1, k):
        writing.atomic_write(targets[k + i], png_bytes(to_uint8(one.masks[0, i - 1])))  # (H, W)
    if psd:
        save_psd(stack, targets[-2], batch_index=batch_index, overwrite=True)
    writing.atomic_write(targets[-1], meta_bytes)


def write_layer_set(
    stack: LayerStack,
    out_dir: str | os.PathLike,
    meta: dict | None = None,
    batch_index: int = 0,
    overwrite: bool = False,
    psd: bool = True,
) -> list[Path]:
    """Write sample `batch_index` of `stack` into `out_dir` (created if missing):
    composite.png (RGB), layer_00.png (background, RGB), layer_01.png... (foregrounds, RGBA with
    the mask as alpha), mask_01.png... (8-bit L, 255 = object), layers.psd (if psd) and meta.json
    (meta plus sizes, names, prompts, seeds of sample 0 only). The set appears whole or not at all
    (meta.json last). Returns the written paths."""
    meta_bytes = _check_set_args(stack, meta, batch_index, psd)
    targets = layer_set_files(stack, out_dir, psd)
    check_free(targets, overwrite, Path(out_dir))
    ensure_dir(out_dir)
    write_result_set(
        out_dir, [""], lambda stage: _write_set_files(stack, stage, meta_bytes, batch_index, psd),
        overwrite=overwrite, manifest=META_FILE, replaced=_old_set_files,
    )
    logger.info("wrote %d files for sample %d to %s", len(targets), batch_index, out_dir)
    return targets


def sample_dir(out_dir: str | os.PathLike, batch_index: int) -> Path:
    return Path(out_dir) / f"sample_{batch_index:03d}"


def write_layer_sets(
    stack: LayerStack,
    out_dir: str | os.PathLike,
    meta: dict | None = None,
    overwrite: bool = False,
    psd: bool = True,
) -> list[Path]:
    """Write every sample: B == 1 directly into out_dir, B > 1 into out_dir/sample_000, sample_001,
    ... (see write_layer_set). All targets are checked before anything is written, and every file
    is written before the first set is moved into place."""
    from layerdiff.limits import check_write_args

    check_export_args(stack, 0)
    check_write_args(out_dir, meta, overwrite, psd)  # overwrite='no' must not read as True
    if stack.batch_size == 1:
        return write_layer_set(stack, out_dir, meta, 0, overwrite, psd)
    metas = [_check_set_args(stack, meta, b, psd) for b in range(stack.batch_size)]
    dirs = [sample_dir(out_dir, b) for b in range(stack.batch_size)]
    targets = [p for d in dirs for p in layer_set_files(stack, d, psd)]
    check_free(targets, overwrite, Path(out_dir))
    ensure_dir(out_dir)

    def write(stage: Path) -> None:
        for b, d in enumerate(dirs):
            _write_set_files(stack, stage / d.name, metas[b], b, psd)

    write_result_set(
        out_dir, [d.name for d in dirs], write,
        overwrite=overwrite, manifest=META_FILE, replaced=_old_set_files,
    )
    logger.info("wrote %d files for %d samples to %s", len(targets), stack.batch_size, out_dir)
    return targets
