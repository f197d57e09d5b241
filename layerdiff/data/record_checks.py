"""Checks of one shard record from a file nobody vouches for, before anything is decoded.

A shard is untrusted input: its tar headers may claim any sizes, its ``KEY.json`` may be any JSON
and its PNG members may claim any dimensions. These functions bound all of that and name what is
wrong in one line (the shard, the member, the field, the value and the fix); nothing here decodes a
pixel. The limits are also what the writer accepts, so every shard written can be read back.
"""

from __future__ import annotations

import json
import struct
import tarfile
import zlib
from pathlib import Path

from layerdiff.errors import LayerDiffError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_LAYERS",
    "MAX_LAYER_PIXELS",
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "MAX_SIDE",
    "META_DEPTH",
    "CUT",
    "TOO_MANY",
    "Oversized",
    "check_metadata",
    "check_png_member",
    "check_tar_end",
    "json_depth",
    "member_bytes",
    "member_limit",
    "member_name",
]

MAX_LAYERS = 16  # background + foregrounds of one sample
MAX_SIDE = 16384  # pixels, either side of a layer
MAX_LAYER_PIXELS = 8192 * 8192
MAX_JSON_BYTES = 2**20  # one KEY.json member
MAX_MEMBER_BYTES = 256 * 2**20  # one PNG member
META_DEPTH = 32  # nesting of KEY.json (its "extra" holds the builder's lists and labels)
MAX_MEMBERS = 4 * MAX_LAYERS  # members of one sample (it needs 2 * layers)

# keys that no member name gives, set by the tar reader: a record of too many members, and the
# error that cut the shard short after this record's members
TOO_MANY, CUT = "\0too-many", "\0cut"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Oversized(int):
    """Stands in for a member too large to read (its size); :func:`member_bytes` names it."""


def member_limit(suffix: str) -> int:
    return MAX_JSON_BYTES if suffix == "json" else MAX_MEMBER_BYTES


def member_name(key: str, suffix: str) -> str:
    """``KEY.SUFFIX`` for a message; quoted when the key holds what would break the line."""
    name = f"{key}.{suffix}"
    return name if name.isprintable() else repr(name)


def json_depth(value, limit: int = META_DEPTH) -> int:
    """Nesting depth of dicts and lists, counted up to just past ``limit`` (iterative: a deep
    object cannot exhaust the stack)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, d = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)):
            deepest = max(deepest, d)
            if d > limit:
                break
            todo.extend((v, d + 1) for v in item)
    return deepest


def check_tar_end(f, offset: int, path: Path) -> None:
    """After the last member come only zero bytes, at least the two zero blocks that end a tar file.
    (tarfile's stream mode stops quietly at a damaged header or at a cut on a block boundary.)"""
    f.seek(offset)
    zeros = 0
    while chunk := f.read(1 << 16):
        if chunk.count(0) != len(chunk):
            raise LayerDiffError(f"shard {str(path)!r} is damaged at byte {offset}: the tar header there is not "
                                 "valid, so the rest of the shard cannot be read: rewrite or remove it")
        zeros += len(chunk)
    if zeros < 2 * tarfile.BLOCKSIZE:
        raise LayerDiffError(f"shard {str(path)!r} is truncated after byte {offset} (it lacks the tar end marker): "
                             "rewrite or remove it")


def member_bytes(members: dict, suffix: str, key: str, path) -> bytes:
    """The bytes of member ``KEY.SUFFIX``; LayerDiffError when it is missing or was too large to read."""
    if TOO_MANY in members:
        raise LayerDiffError(f"shard {str(path)!r}: sample {key!r} has more than {MAX_MEMBERS} members: rewrite the shard")
    if suffix not in members:
        if CUT in members:  # blamed on the damage that cut the shard short, not on the record
            raise LayerDiffError(str(members[CUT]))
        raise LayerDiffError(f"shard {str(path)!r}: sample {key!r} lacks member {member_name(key, suffix)}: "
                             "rewrite the shard")
    data = members[suffix]
    if isinstance(data, Oversized):
        raise LayerDiffError(f"shard {str(path)!r}: member {member_name(key, suffix)} holds {int(data)} bytes, more "
                             f"than the {member_limit(suffix)} a sample's member may: rewrite the shard")
    return data


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def check_metadata(meta, key: str, path="<shard>") -> dict:
    """Raise :class:`LayerDiffError` naming the field unless ``meta`` is a ``KEY.json`` this format
    can read (the fields ``sample_metadata`` writes, of the right types and in range)."""
    where = f"shard {str(path)!r}: {member_name(key, 'json')}"
    if not isinstance(meta, dict):
        raise LayerDiffError(f"{where} is {_kind(meta)}, not a JSON object: rewrite the shard")

    def bad(field_name: str, rule: str):
        shown = json.dumps(meta[field_name]) if field_name in meta else "missing"
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return LayerDiffError(f"{where}: {field_name} is {shown}, {rule}: rewrite the shard")

    n = meta.get("num_layers")
    if type(n) is not int or not 1 <= n <= MAX_LAYERS:
        raise bad("num_layers", f"not a layer count from 1 to {MAX_LAYERS}")
    for name in ("width", "height"):
        v = meta.get(name)
        if type(v) is not int or not 1 <= v <= MAX_SIDE:
            raise bad(name, f"not a size in pixels from 1 to {MAX_SIDE}")
    if meta["width"] * meta["height"] > MAX_LAYER_PIXELS:
        raise bad("width", f"and height {meta['height']} make more than {MAX_LAYER_PIXELS} pixels a layer")
    for name in ("global_prompt", "background_prompt", "source"):
        if not isinstance(meta.get(name, ""), str):
            raise bad(name, "not a string")
    fg = meta.get("foreground_prompts", [])
    if not isinstance(fg, list) or not all(isinstance(p, str) for p in fg):
        raise bad("foreground_prompts", "not a list of strings")
    if len(fg) != n - 1:
        raise bad("foreground_prompts", f"{len(fg)} prompts for {n - 1} foregrounds (num_layers {n})")
    if not isinstance(meta.get("extra") or {}, dict):
        raise bad("extra", "not an object")
    return meta


def check_png_member(data: bytes, size: tuple[int, int], key: str, suffix: str, path) -> None:
    """A PNG whose header gives ``size`` and whose chunks are whole with right checksums; no pixel is
    decoded, so a small file claiming a huge image costs nothing."""
    where = f"shard {str(path)!r}: {member_name(key, suffix)}"
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise LayerDiffError(f"{where} is not a PNG image: rewrite the shard")
    claimed = struct.unpack(">II", data[16:24])
    if claimed != tuple(size):
        raise LayerDiffError(f"{where} is {claimed[0]}x{claimed[1]} pixels but {member_name(key, 'json')} says "
                             f"{size[0]}x{size[1]}: rewrite the shard")
    why = _png_chunks_damage(data)
    if why:
        raise LayerDiffError(f"{where} is damaged ({why}): rewrite the shard")


def _png_chunks_damage(data: bytes) -> str:
    """'' when the PNG's chunks are whole, their checksums right and IEND ends them; else what is wrong."""
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return f"chunk {kind!r} at byte {pos} runs past the end: truncated"
        if zlib.crc32(data[pos + 4:end - 4]) != struct.unpack(">I", data[end - 4:end])[0]:
            return f"chunk {kind!r} at byte {pos} fails its checksum"
        if kind == b"IEND":
            return ""
        pos = end
    return "no IEND chunk: truncated"
