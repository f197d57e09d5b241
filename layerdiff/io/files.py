"""Model files on disk: safetensors only, read with a validated header and written atomically.

Pickle checkpoints (.ckpt/.pt/.pth/.bin) are refused before a byte of them is unpickled, because
unpickling runs arbitrary code. Every failure is a one-line ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from layerdiff.errors import CheckpointError, LayerDiffError
from layerdiff.safe_json import parse_json

logger = logging.getLogger("layerdiff.io")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 writes a zip archive of pickles
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_HEADER_DEPTH = 3  # {name: {"shape": [...]}}; anything deeper is not a safetensors header
_MAX_RANK = 8  # dimensions of one tensor (weights have at most 5)
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
# Bytes per element of each safetensors dtype tag; used to check offsets against shapes.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

try:  # the error class is public since safetensors 0.3; fall back so an odd build still imports
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover
    _SafetensorError = RuntimeError


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle checkpoint; LayerDiff loads only .safetensors because unpickling can run "
        "arbitrary code: convert it with a trusted tool first"
    )


def _not_found(path: Path) -> CheckpointError:
    folder = path.parent
    if not folder.is_dir():
        return CheckpointError(f"model file not found: {path} (folder {folder} does not exist)")
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if not names:
        return CheckpointError(f"model file not found: {path} ({folder} holds no .safetensors files)")
    # Closest names first, so a typo shows its fix at the front of the list.
    close = difflib.get_close_matches(path.name, names, n=len(names), cutoff=0.0)[:8]
    more = f" and {len(names) - len(close)} more" if len(names) > len(close) else ""
    return CheckpointError(
        f"model file not found: {path}; .safetensors files in {folder}: {', '.join(close)}{more}"
    )


def path_exists(p: Path) -> bool:
    """``p.exists()`` that names an unusable path (too long, say) in one line instead of raising OSError."""
    try:
        return p.exists()
    except (OSError, ValueError) as e:
        shown = str(p) if len(str(p)) <= 120 else str(p)[:117] + "..."
        raise CheckpointError(
            f"model path {shown!r} cannot be used ({getattr(e, 'strerror', None) or e}): pass the path of a "
            ".safetensors file"
        ) from None


def _check_path(path: str | os.PathLike) -> Path:
    """Resolve ``path`` and refuse what is not a regular file or is a pickle by its suffix."""
    p = Path(path).expanduser()
    if not path_exists(p):
        raise _not_found(p)
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder, not a model file: pass the .safetensors file inside it")
    if not p.is_file():  # a FIFO or device would block or never end
        raise CheckpointError(f"{p} is not a regular file (a pipe, socket or device): pass a .safetensors file")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(p)
    return p


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({why}): download or export it again")


def _name(name: str) -> str:
    """A tensor name for a one-line message (names are untrusted text)."""
    shown = json.dumps(name)
    return shown if len(shown) <= 80 else shown[:77] + '..."'


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return type(value) is int  # JSON true/false are not sizes


def _check_entry(p: Path, name: str, entry, data_bytes: int) -> tuple[int, int]:
    """Check one tensor entry of a header; returns its (begin, end) in the data section."""
    where = f"tensor {_name(name)}"
    if not isinstance(entry, dict):
        raise _corrupt(p, f"{where} is described by {_show(entry)}, not by a JSON object")
    if set(entry) != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - set(entry)), sorted(set(entry) - _ENTRY_KEYS)
        raise _corrupt(p, f"{where} has keys {_show(sorted(entry)[:5])}: " + (
            f"{', '.join(missing)} missing" if missing else f"unknown key {_name(extra[0])}"))
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(
            f"{p}: {where} has dtype {_show(dtype)}, which LayerDiff cannot read (it reads "
            f"{', '.join(DTYPE_BYTES)}): convert the file with safetensors' own tools"
        )
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise _corrupt(p, f"{where} has shape {_show(shape)}; a shape is a list of at most {_MAX_RANK} "
                          "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _corrupt(p, f"{where} has data_offsets {_show(offsets)}; they are two integers [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise _corrupt(p, f"{where} spans bytes {begin}..{end} but the file has {data_bytes} data bytes")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise _corrupt(p, f"{where} holds {end - begin} bytes, its shape needs {expected}")
    return begin, end


def _read_header(p: Path) -> tuple[dict, dict[str, str]]:
    """Parse and validate the JSON header of the safetensors file ``p``; returns (entries, metadata).

    Everything is checked before any of it is used: the header length against the file, the JSON's
    nesting, every entry's dtype, shape and offsets, and that the tensors tile the data section
    exactly (no overlaps, no gaps), as safetensors itself requires.
    """
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(9)
            n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
            looks_safetensors = len(head) == 9 and n <= size - 8 and head[8:9] == b"{"
            # A zip (torch.save) or raw pickle (PROTO 0x80 + protocol 2..5) is refused before it is parsed.
            # The header length of a real safetensors file can start with those bytes too, so the JSON
            # brace after it decides first.
            is_pickle = head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
            if is_pickle and not looks_safetensors:
                raise _pickle_refusal(p)
            if len(head) < 9:
                raise _corrupt(p, f"only {size} bytes")
            if n < 2 or n > _MAX_HEADER_BYTES or n > size - 8:
                raise _corrupt(p, f"header of {n} bytes in a file of {size} bytes")
            raw = head[8:] + f.read(n - 1)
    except OSError as e:
        raise CheckpointError(f"cannot read {p} ({e.strerror or e}): check that the file is readable") from None
    if len(raw) != n:
        raise _corrupt(p, f"the header ends after {len(raw)} of {n} bytes")
    try:
        header = parse_json(raw.decode("utf-8"), max_depth=_HEADER_DEPTH)
    except UnicodeDecodeError as e:
        raise _corrupt(p, f"header is not UTF-8 text at byte {e.start}") from None
    except ValueError as e:
        raise _corrupt(p, f"bad JSON header: {' '.join(str(e).split())}") from None
    if not isinstance(header, dict):
        raise _corrupt(p, f"header is {_show(header)}, not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(p, "__metadata__ is not a map of strings to strings")
    data_bytes = size - 8 - n
    spans = sorted((*_check_entry(p, name, entry, data_bytes), name) for name, entry in header.items())
    position, previous = 0, None
    for begin, end, name in spans:  # tensors in file order must tile the data section exactly
        if begin < position:
            raise _corrupt(p, f"tensor {_name(name)} overlaps tensor {_name(previous)} (bytes {begin}..{position})")
        if begin > position:
            raise _corrupt(p, f"bytes {position}..{begin} of the data section belong to no tensor")
        position, previous = end, name
    if position != data_bytes:
        raise _corrupt(p, f"the data section has {data_bytes} bytes but its tensors end at byte {position}")
    return header, metadata


def read_safetensors_header(
    path: str | os.PathLike,
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Names -> (safetensors dtype tag such as "F16", shape), and the metadata; reads only the header."""
    p = _check_path(path)
    header, metadata = _read_header(p)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}, dict(metadata)


_TORCH_DTYPES = {
    tag: getattr(torch, name, None) for tag, name in {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
        "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
        "F8_E8M0": "float8_e8m0fnu",
    }.items()
}  # fmt: skip


def _read_into(f, offset: int, out: torch.Tensor) -> None:
    """Fill the CPU tensor ``out`` with the file's bytes from ``offset`` (plain reads, no memory map)."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"the file ends {len(view) - done} bytes early")
        done += n


def read_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, keys: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ``keys`` reads only those tensors (all must exist);
    ``dtype`` converts floating-point tensors one by one as they are read (the peak is the result
    plus one tensor, not the file plus the result).

    Each tensor is read into memory of its own with plain reads: no memory map stays behind the
    weights (a mapped file's pages would count twice beside converted copies), and every tensor is
    aligned as torch aligns its own allocations.
    """
    p = _check_path(path)
    header, metadata = _read_header(p)
    wanted = list(header) if keys is None else list(keys)
    absent = [k for k in wanted if k not in header]
    if absent:
        raise CheckpointError(f"{p} has no tensor {absent[0]!r} ({len(absent)} requested tensors are absent)")
    tensors = {}
    try:
        with open(p, "rb") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
            for k in wanted:
                entry = header[k]
                stored = _TORCH_DTYPES.get(entry["dtype"])
                if stored is None:
                    raise CheckpointError(f"{p}: tensor {_name(k)} has dtype {entry['dtype']}, which this torch cannot hold")
                t = torch.empty(tuple(entry["shape"]), dtype=stored)
                if t.numel():
                    _read_into(f, start + entry["data_offsets"][0], t)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[k] = t if str(device) == "cpu" else t.to(device)
    except (OSError, RuntimeError, ValueError) as e:
        raise _corrupt(p, f"{type(e).__name__}: {e}") from None
    logger.debug("read %d tensors from %s", len(tensors), p)
    return tensors, dict(metadata)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise LayerDiffError(f"output path {p} has a pickle suffix: name it *.safetensors")
    if p.is_dir():
        raise CheckpointError(
            f"output path {p} is a folder: pass a file name such as {p / 'model.safetensors'}"
        )
    if p.exists() and not overwrite:
        raise CheckpointError(f"{p} already exists: pass overwrite=True (--overwrite) or choose another name")
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LayerDiffError(
                f"metadata entry {k!r} has a {type(v).__name__} value: metadata values must be str"
            )

    # safetensors refuses tensors that share memory (tied weights, views of one buffer): clone all but
    # the first of each storage, and make everything contiguous on the CPU.
    seen: set[tuple[str, int]] = set()
    flat: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise LayerDiffError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        key = _storage_key(t)
        t = t.detach()
        t = t.clone() if key in seen and t.numel() > 0 else t
        seen.add(key)
        flat[name] = t.to("cpu").contiguous()

    folder = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as e:
        raise CheckpointError(
            f"cannot write to folder {folder} ({e.strerror or e}): choose a writable folder"
        ) from None
    tmp = Path(tmp_name)
    try:
        save_file(flat, str(tmp), metadata=meta or None)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model file is as readable as any other output
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reaches the disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError as e:
        raise CheckpointError(
            f"cannot write {p} ({e.strerror or e}): check free space and permissions"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("saved %d tensors to %s", len(flat), p)
    return p
