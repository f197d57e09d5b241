"""Reading files that users and other machines hand to the data tools: regular files only, read
with a size bound, and JSON parsed with a nesting bound.

A folder of photos may hold anything a file system can: a named pipe (reading it blocks for ever),
a socket, a device (``/dev/zero`` never ends), a folder named like an image, a symbolic link loop,
a file the user cannot read, a file far larger than any image. :func:`read_regular_file` looks at
what the path is before opening it, opens without blocking, checks again on the open descriptor
(the path may have been swapped in between) and reads at most ``limit`` bytes. Every refusal is an
:class:`InputFileError` whose ``reason`` is a short word the builder counts by.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from layerdiff.errors import LayerDiffError
from layerdiff.safe_json import parse_json

__all__ = [
    "MISSING",
    "NOT_A_FILE",
    "TOO_LARGE",
    "UNREADABLE",
    "InputFileError",
    "open_regular_file",
    "parse_untrusted_json",
    "read_regular_file",
]

# why a file gives no bytes (the builder's summary counts them by these names)
MISSING = "missing"
NOT_A_FILE = "not_a_regular_file"
UNREADABLE = "unreadable"
TOO_LARGE = "too_large"

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


class InputFileError(LayerDiffError):
    """A file that cannot be used as input; ``reason`` is one of the names above."""

    def __init__(self, path, reason: str, why: str):
        super().__init__(f"{str(path)!r} {why}")
        self.path, self.reason, self.why = Path(path), reason, why


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _os_error(path, exc: OSError) -> InputFileError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return InputFileError(path, MISSING, "does not exist")
    if exc.errno == errno.ELOOP:
        return InputFileError(path, UNREADABLE, "is a loop of symbolic links")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InputFileError(path, UNREADABLE, "cannot be read (permission denied)")
    if exc.errno == errno.ENXIO:  # a socket, or a device with nothing behind it
        return InputFileError(path, NOT_A_FILE, "is not a regular file")
    return InputFileError(path, UNREADABLE, f"cannot be read ({exc.strerror or exc})")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def open_regular_file(path, limit: int | None = None) -> int:
    """A read-only descriptor of the regular file ``path`` (of at most ``limit`` bytes when given);
    :class:`InputFileError` for anything else. Never blocks on a pipe or device."""
    try:
        st = os.stat(path)  # follows links: a link to a regular file is a regular file
    except OSError as exc:
        raise _os_error(path, exc) from None
    if not stat.S_ISREG(st.st_mode):  # looked at before opening: opening some devices has effects
        raise InputFileError(path, NOT_A_FILE, f"is {_kind(st.st_mode)}, not a regular file")
    if limit is not None and st.st_size > limit:
        raise InputFileError(path, TOO_LARGE, f"holds {_mib(st.st_size)}, more than the {_mib(limit)} allowed")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise _os_error(path, exc) from None
    if not stat.S_ISREG(st.st_mode):  # swapped for something else since the first look
        os.close(fd)
        raise InputFileError(path, NOT_A_FILE, f"is {_kind(st.st_mode)}, not a regular file")
    return fd


def read_regular_file(path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; :class:`InputFileError`
    for anything else (never blocks on a pipe or device, never reads past ``limit``)."""
    fd = open_regular_file(path, limit)
    chunks, size = [], 0
    try:
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _os_error(path, exc) from None
    finally:
        os.close(fd)
    if size > limit:  # it grew since it was looked at
        raise InputFileError(path, TOO_LARGE, f"holds more than the {_mib(limit)} allowed")
    return b"".join(chunks)


def parse_untrusted_json(data: bytes, max_depth: int) -> Any:
    """JSON from a file nobody vouches for: UTF-8, nested at most ``max_depth`` deep, no NaN or
    infinities, no repeated keys. ValueError with a one-line reason otherwise."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        return parse_json(text, max_depth=max_depth)
    except (ValueError, RecursionError) as exc:
        why = str(exc)
    if why.startswith("brackets nested"):  # too deep, or a bracket missing: say which
        try:
            json.loads(text)
            why = f"nested deeper than {max_depth} levels"
        except json.JSONDecodeError as exc:
            why = str(exc)
        except RecursionError:
            why = f"nested far deeper than {max_depth} levels"
    raise ValueError(f"not valid JSON ({' '.join(why.split())[:160]})")
