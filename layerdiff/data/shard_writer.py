"""Writing layered samples into ``.tar`` shards (the format: :mod:`layerdiff.data.format`).

A shard is written atomically: members go to a hidden temporary file in the same folder, which is
fsynced and then renamed onto ``NAME.tar`` with :func:`os.replace`, so a reader sees a shard complete
or not at all and a killed writer leaves at most a hidden ``.NAME.tar.*.tmp`` file. Tar headers carry
fixed owner and time fields and PNGs a fixed compression level, so the same samples always give the
same bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from layerdiff.data.format import KEY_PATTERN, LayeredSample, sample_metadata
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data")

PNG_COMPRESS_LEVEL = 4  # a fair size/speed trade-off; fixed so bytes are reproducible

__all__ = ["ShardWriter", "shard_path", "write_shard"]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _encode_members(sample: LayeredSample) -> list[tuple[str, bytes]]:
    sample.validate()
    meta = json.dumps(sample_metadata(sample), ensure_ascii=False, sort_keys=True).encode("utf-8")
    members = [(f"{sample.key}.json", meta), (f"{sample.key}.bg.png", _png_bytes(sample.background))]
    for i, (fg, mask) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        members.append((f"{sample.key}.fg{i}.png", _png_bytes(fg)))
        members.append((f"{sample.key}.mask{i}.png", _png_bytes(mask)))
    return members


class _AtomicShard:
    """A tar file being written to a hidden temporary name; ``commit`` renames it into place."""

    def __init__(self, path: Path, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        if path.exists() and not overwrite:
            raise LayerDiffError(
                f"shard {str(path)!r} already exists: pass overwrite=True (--overwrite) to replace it, "
                "or write to an empty folder"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.keys: set[str] = set()
        self.count = 0

    def add(self, sample: LayeredSample) -> None:
        if sample.key in self.keys:
            raise LayerDiffError(f"sample key {sample.key!r} appears twice in shard {self.path.name}: keys must be unique")
        for name, data in _encode_members(sample):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # fixed header fields -> reproducible bytes
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.add(sample.key)
        self.count += 1

    def commit(self) -> Path:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.tmp, 0o644)  # mkstemp makes 0600; shards are meant to be shared
        os.replace(self.tmp, self.path)
        logger.debug("wrote shard %s (%d samples)", self.path, self.count)
        return self.path

    def abort(self) -> None:
        for closer in (self._tar.close, self._file.close):
            try:
                closer()
            except Exception:  # best effort while discarding
                pass
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


def write_shard(path, samples: Iterable[LayeredSample], overwrite: bool = False) -> int:
    """Write ``samples`` into one shard at ``path`` atomically; return the number of samples.

    Refuses to replace an existing shard unless ``overwrite``. On any error (including a bad
    sample) nothing appears at ``path`` and the temporary file is removed.
    """
    shard = _AtomicShard(Path(path), overwrite)
    try:
        for sample in samples:
            shard.add(sample)
        shard.commit()
    except BaseException:
        shard.abort()
        raise
    return shard.count


def shard_path(out_dir, prefix: str, index: int) -> Path:
    """``out_dir/{prefix}-{index:06d}.tar``."""
    return Path(out_dir) / f"{prefix}-{index:06d}.tar"


class ShardWriter:
    """Write samples into ``out_dir/{prefix}-{index:06d}.tar``, ``samples_per_shard`` each.

    Every shard is atomic. Use as a context manager: on an exception inside the ``with`` block the
    shard being filled is discarded (completed shards stay, each complete); on a clean exit the
    last partial shard is committed. Members stream to disk, so memory stays at one sample.
    """

    def __init__(self, out_dir, prefix: str = "shard", samples_per_shard: int = 1000, start_index: int = 0,
                 overwrite: bool = False):
        if not KEY_PATTERN.match(prefix):
            raise LayerDiffError(f"shard prefix {prefix!r} is not valid: use only letters, digits, '_' and '-'")
        if samples_per_shard < 1:
            raise LayerDiffError(f"samples_per_shard {samples_per_shard} must be at least 1")
        if start_index < 0:
            raise LayerDiffError(f"start_index {start_index} must be 0 or more")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise LayerDiffError(f"output folder {str(self.out_dir)!r} is a file: give a folder path")
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.index = start_index
        self.overwrite = overwrite
        self.paths: list[Path] = []
        self._current: _AtomicShard | None = None
        self._closed = False
        first = shard_path(self.out_dir, prefix, start_index)
        if first.exists() and not overwrite:  # fail before any work is done
            raise LayerDiffError(
                f"shard {str(first)!r} already exists: pass overwrite=True (--overwrite) to replace it, "
                "or write to an empty folder"
            )

    def write(self, sample: LayeredSample) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter.write after close")
        if self._current is None:
            self._current = _AtomicShard(shard_path(self.out_dir, self.prefix, self.index), self.overwrite)
        try:
            self._current.add(sample)
        except BaseException:
            self.abort()
            raise
        if self._current.count >= self.samples_per_shard:
            self._commit()

    def _commit(self) -> None:
        assert self._current is not None
        self.paths.append(self._current.commit())
        self._current = None
        self.index += 1

    def abort(self) -> None:
        """Discard the shard being filled; completed shards stay."""
        if self._current is not None:
            self._current.abort()
            self._current = None
        self._closed = True

    def close(self) -> list[Path]:
        """Commit the last partial shard; return every shard path written, in order."""
        if not self._closed:
            if self._current is not None:
                self._commit()
            self._closed = True
        return list(self.paths)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
        return False

    def __del__(self):  # an abandoned writer never leaves a temporary file behind
        try:
            if self._current is not None:
                self._current.abort()
        except Exception:
            pass
