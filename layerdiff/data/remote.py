"""Shards at URLs: any filesystem fsspec knows (``s3://``, ``gs://``, ``https://``, ``memory://`` ...).

Training reads shards as streams, so a shard at a URL is read the same way as a local file, through
``fsspec.open``. A folder URL lists the shards (``NAME-000123.tar``) directly inside it; a URL with
``*`` is a glob. fsspec is optional (``pip install fsspec``, plus the filesystem's own package, e.g.
``s3fs`` for ``s3://``), and nothing is read from a URL the user did not give.
"""

from __future__ import annotations

import re

from layerdiff.errors import LayerDiffError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(item) -> bool:
    """True for ``scheme://...`` strings (``file://`` too); local paths are not URLs."""
    return isinstance(item, str) and bool(_URL.match(item))


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise LayerDiffError(f"data path {url!r} is a URL: reading shards from URLs needs fsspec "
                             "(pip install fsspec, plus e.g. s3fs for s3:// or gcsfs for gs://)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown scheme, or its package missing
        why = " ".join(str(exc).split())[:200]
        raise LayerDiffError(f"data path {url!r}: fsspec cannot open this URL ({why}): install the package for its "
                             "scheme (e.g. s3fs for s3://) or check the URL") from None


def list_url_shards(url: str, pattern: re.Pattern) -> list[str]:
    """The shard URLs of a folder URL (names matching ``pattern``), of a glob, or the one ``.tar`` URL."""
    fs, root = _filesystem(url)
    full = fs.unstrip_protocol

    try:
        if "*" in root:
            return sorted(full(p) for p in fs.glob(root) if pattern.match(p.rsplit("/", 1)[-1]))
        if fs.isdir(root):
            return sorted(full(p) for p in fs.ls(root, detail=False) if pattern.match(p.rstrip("/").rsplit("/", 1)[-1]))
        if root.endswith(".tar") and fs.exists(root):
            return [url]
    except OSError as exc:
        raise LayerDiffError(f"data path {url!r} cannot be listed ({exc}): check the URL and its credentials") from None
    raise LayerDiffError(f"data URL {url!r} is neither a folder of shards nor a .tar shard: check the URL")


def open_url(url: str):
    """A binary, seekable file object of the shard at ``url`` (close it after use)."""
    fs, root = _filesystem(url)
    try:
        return fs.open(root, "rb")
    except (OSError, ValueError) as exc:
        raise LayerDiffError(f"shard {url!r} cannot be opened ({exc}): check the URL and its credentials") from None
