"""Single-file writing shared by the layer-set writer (:mod:`layerdiff.io.export`) and the PSD
writer (:mod:`layerdiff.io.psd`): 8-bit pixels, PNG bytes, atomic writes and output-folder checks.

A file is written atomically: a temp file in the same folder (named after this process, so a later
writer can tell a dead writer's leftover, see :mod:`layerdiff.io.resultset`), then os.replace.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from layerdiff.errors import LayerDiffError
from layerdiff.io.resultset import owner_tag
from layerdiff.stack import LayerStack


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """Float 0..1 tensor -> uint8 numpy array of the same shape (round to nearest; NaN -> 0)."""
    t = torch.nan_to_num(t.detach().to("cpu", torch.float32), nan=0.0).clamp(0, 1)
    return (t * 255).round().to(torch.uint8).numpy()


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an (H, W) L, (H, W, 3) RGB or (H, W, 4) RGBA uint8 array. No text chunks or time
    stamps, so identical pixels give identical bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new temp file beside `path`. os.open with mode 0o666 lets the umask decide the final
    permissions, as for any file the user writes (mkstemp would leave 0600, and reading the umask
    means setting it, which races with other threads in the host)."""
    for _ in range(100):  # named after this process, so a later writer knows when it is a leftover
        tmp = path.with_name(f".{path.name}.{owner_tag()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {path}")


def ensure_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` (and parents) if missing; LayerDiffError naming it if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise LayerDiffError(f"output folder {folder} exists as a file: choose a folder path") from e
    except OSError as e:
        raise LayerDiffError(
            f"cannot create output folder {folder}: {e.strerror or e}; choose a writable folder"
        ) from e
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None] | bytes) -> Path:
    """Write `path` atomically: `write(fileobj)` (or the given bytes) goes to a temp file in the
    same folder, which then replaces `path`. Does not check for an existing file."""
    path = Path(path)
    folder = path.parent
    try:
        fd, tmp = _open_temp(path)
    except OSError as e:
        raise LayerDiffError(
            f"cannot write into folder {folder}: {e.strerror or e}; choose a writable folder"
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, (bytes, bytearray)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LayerDiffError(
            f"could not write {path}: {e.strerror or e}; check free space and permissions"
        ) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def check_free(paths: list[Path], overwrite: bool, folder: str | os.PathLike) -> None:
    """LayerDiffError listing (relative to `folder`) the paths that exist already, unless overwrite."""
    if overwrite:
        return
    taken = [p for p in paths if p.exists() or p.is_symlink()]
    if taken:
        rel = [str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in taken]
        shown = ", ".join(rel[:4]) + (f" (and {len(rel) - 4} more)" if len(rel) > 4 else "")
        raise LayerDiffError(
            f"output folder {folder} already holds {shown}: pass overwrite=True to replace them, "
            f"or choose another folder"
        )


def check_export_args(stack: LayerStack, batch_index: int) -> None:
    """The stack is a LayerStack and batch_index one of its samples (PNG, PSD and JSON writers)."""
    if not isinstance(stack, LayerStack):
        raise LayerDiffError(f"expected a LayerStack to export, got {type(stack).__name__}")
    if (
        isinstance(batch_index, bool)
        or not isinstance(batch_index, int)
        or not 0 <= batch_index < stack.batch_size
    ):
        raise LayerDiffError(
            f"batch_index {batch_index!r} is out of range for a batch of {stack.batch_size} samples "
            f"(0..{stack.batch_size - 1})"
        )
