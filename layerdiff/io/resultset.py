"""Result sets that appear whole or not at all: staged in a hidden folder, then renamed into place.

A result set is a folder of files that belong together (one sample's PNGs, PSD and meta.json). A
reader must never see part of one: after a crash, a kill -9 or a full disk the target shows its
old state or the complete new set. Every file is written, and synced, into a hidden staging folder
first; then the set is moved into place by renames alone (no data is written at that point):

* a target folder that does not exist yet, or is empty, is replaced by the staging folder in one
  rename, so a whole batch of samples appears at once;
* a target folder that already holds files (other files of the user's, or an old set being
  overwritten) receives the new files by rename one at a time, the manifest (meta.json) last and
  the old manifest removed first: a set is complete exactly when its manifest is there. The plan
  of these renames is written into the staging folder before the first one, so that the next
  writer finishes a move that a kill interrupted (every file is in the staging folder by then).

Staging folders and temp files are named after their writer (host and process id), so the next
writer can tell a dead writer's leftovers from a live one's: :func:`clean_stale` removes the
former at the start of every write and never touches the latter.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.io.resultset")

STAGING_SUFFIX = ".partial"
_JOURNAL = ".commit.json"  # in a staging folder: the plan of a commit that has begun
# A staging folder or owner-tagged temp file older than this is a leftover even where its writer's
# liveness cannot be checked (another host on a shared folder, Windows, a recycled process id);
# writing one result set takes seconds to minutes.
STALE_AFTER_S = 6 * 3600

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_OWNER = r"(?P<host>[0-9a-f]{8})-(?P<pid>\d{1,10})"
_STAGING_RE = re.compile(rf"^\.(?:.+\.)?layerdiff-{_OWNER}-[0-9a-f]{{8}}{re.escape(STAGING_SUFFIX)}$")
# temp files of layerdiff.io.writing.atomic_write: ".<name>.<host>-<pid>.<hex>.tmp", and the
# untagged ".<name>.<hex>.tmp" of earlier versions (no writer of those is alive any more)
_TEMP_RE = re.compile(rf"^\..+\.{_OWNER}\.[0-9a-f]{{8}}\.tmp$")
_LEGACY_TEMP_RE = re.compile(r"^\..+\.(?P<pid>)[0-9a-f]{8}\.tmp$")


def owner_tag() -> str:
    """'<host hash>-<pid>': names this process's temp files and staging folders."""
    return f"{_HOST}-{os.getpid()}"


def _staging_name(prefix: str = "") -> str:
    return f".{prefix}layerdiff-{owner_tag()}-{secrets.token_hex(4)}{STAGING_SUFFIX}"


def _writer_alive(host: str, pid: int) -> bool | None:
    """Whether the writing process still runs; None where that cannot be known from here."""
    if host != _HOST or os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive under another user (or an absurd id: leave it to the age rule)
    return True


def _is_stale(entry: Path, match: re.Match) -> bool:
    if not match.group("pid"):
        return True  # an untagged temp file of an earlier version
    try:
        age = time.time() - entry.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S or _writer_alive(match.group("host"), int(match.group("pid"))) is False


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def _clean_folder(
    folder: Path, staging_prefix: str | None, temp_files: bool, out: Path, legacy: bool = True
) -> list[Path]:
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith("."):
            continue
        entry = folder / name
        m = _STAGING_RE.match(name)
        if m and staging_prefix is not None and name.startswith(staging_prefix) and _is_stale(entry, m):
            with contextlib.suppress(OSError):
                _finish_commits(entry, out)
            _remove(entry)
            removed.append(entry)
            continue
        m = _TEMP_RE.match(name) or (_LEGACY_TEMP_RE.match(name) if legacy else None)
        if m and temp_files and not entry.is_dir() and _is_stale(entry, m):
            _remove(entry)
            removed.append(entry)
    return removed


def clean_stale(out: str | os.PathLike, subfolders: Sequence[str] = ()) -> list[Path]:
    """Remove what dead writers left: their staging folders inside `out` and beside it (named after
    `out`), and their temp files in `out` and in its `subfolders`. A set whose move into place had
    begun is finished first (its files are all in the staging folder). Returns the removed paths."""
    out = Path(out)
    removed = _clean_folder(out, ".layerdiff-", True, out)
    if out.name:
        removed += _clean_folder(out.parent, f".{out.name}.layerdiff-", False, out)
    for sub in subfolders:
        if (out / sub).is_dir() and not (out / sub).is_symlink():
            removed += _clean_folder(out / sub, None, True, out)
    if removed:
        logger.info("removed %d leftovers of interrupted writes in %s", len(removed), out)
    return removed


def clean_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that dead writers of this package (atomic_write) left in `folder`, a
    folder shared with others (ComfyUI's output): only files tagged with a writer that is gone."""
    return _clean_folder(Path(folder), None, True, Path(folder), legacy=False)


def _same_device(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


def _swappable(out: Path) -> bool:
    """`out` is an empty real folder that one rename may replace (not the working folder, not a
    mount point, not a symlink)."""
    try:
        if out.is_symlink() or not out.is_dir() or any(out.iterdir()):
            return False
        real = out.resolve()
        return real.parent != real and real != Path.cwd().resolve() and _same_device(out, out.parent)
    except OSError:
        return False


def _make_staging(out: Path) -> tuple[Path, bool]:
    """(staging folder, whole): beside `out` when `out` may be replaced in one rename, else inside."""
    if _swappable(out):
        stage = out.parent / _staging_name(f"{out.name}.")
        try:
            stage.mkdir()
            return stage, True
        except OSError:
            pass  # the parent folder is not writable: stage inside `out` instead
    stage = out / _staging_name()
    stage.mkdir()
    return stage, False


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable where the platform allows (POSIX); best effort."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_empty_dir(stage: Path, target: Path) -> bool:
    """Rename `stage` onto `target` if that is still an empty folder (or absent); False otherwise."""
    try:
        os.rename(stage, target)  # POSIX replaces an empty folder in one step
        return True
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EACCES, errno.EPERM) and os.name == "posix":
            raise
    try:  # Windows: rename never replaces a folder, so remove the empty one first
        os.rmdir(target)
        os.rename(stage, target)
        return True
    except OSError:
        return False


def _commit_files(
    stage: Path, target: Path, overwrite: bool, manifest: str, replaced: Callable[[Path], list[str]]
) -> None:
    """Move the files of `stage` into the existing folder `target`, the manifest last. The plan is
    written into `stage` first, so that a writer killed half way is finished by the next one."""
    names = sorted(p.name for p in stage.iterdir() if p.name not in (manifest, _JOURNAL))
    if not overwrite:
        taken = [n for n in [*names, manifest] if (target / n).exists() or (target / n).is_symlink()]
        if taken:
            raise LayerDiffError(
                f"{target / taken[0]} appeared while the results were being written: pass overwrite=True "
                f"(--overwrite) to replace it, or choose another folder"
            )
    retire = [n for n in (replaced(target) if overwrite else []) if n not in names and n != manifest]
    plan = {"move": names, "retire": retire, "manifest": manifest}
    with open(stage / _JOURNAL, "w", encoding="utf-8") as f:
        json.dump(plan, f)
        f.flush()
        os.fsync(f.fileno())
    _roll_forward(stage, target, plan)


def _roll_forward(stage: Path, target: Path, plan: dict) -> None:
    """Carry out a commit plan; every step may run again after a kill (it skips what is done)."""
    manifest = plan["manifest"]
    if (stage / manifest).exists():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target / manifest)  # from here on the old set is incomplete, visibly
    for name in plan["move"]:
        if (stage / name).exists():
            os.replace(stage / name, target / name)
    for name in plan["retire"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target / name)  # a file of the replaced set that the new set lacks
    if (stage / manifest).exists():
        os.replace(stage / manifest, target / manifest)
    _fsync_dir(target)


def _plain(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not re.search(r"[/\\\x00]", name)


def _finish_commits(stage: Path, out: Path) -> None:
    """Finish the commits a dead writer had begun in `stage` (their plans name them); the rest of
    its staging folder is dropped."""
    for folder in [stage, *(p for p in stage.iterdir() if p.is_dir() and not p.is_symlink())]:
        journal = folder / _JOURNAL
        if not journal.is_file():
            continue
        try:
            plan = json.loads(journal.read_text("utf-8"))
            names = [plan["manifest"], *plan["move"], *plan["retire"]]
            target = out if folder == stage else out / folder.name
            if not (all(_plain(n) for n in names) and _plain(folder.name) and target.is_dir()):
                continue
            _roll_forward(folder, target, plan)
            logger.info("finished writing %s, which an interrupted run had begun", target)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("could not finish the interrupted write into %s: %s", out, e)


def _commit_unit(stage: Path, target: Path, overwrite: bool, manifest: str, replaced) -> None:
    if not target.exists() and not target.is_symlink():
        os.rename(stage, target)
        _fsync_dir(target.parent)
    elif target.is_dir() and _swappable(target) and _replace_empty_dir(stage, target):
        _fsync_dir(target.parent)
    elif target.is_dir():
        _commit_files(stage, target, overwrite, manifest, replaced)
    else:
        raise LayerDiffError(
            f"{target} exists and is not a folder: remove it or choose another output folder"
        )


def _os_error(e: BaseException) -> OSError | None:
    if isinstance(e, OSError):
        return e
    return e.__cause__ if isinstance(e.__cause__, OSError) else None


def write_result_set(
    out: str | os.PathLike,
    units: Sequence[str],
    write: Callable[[Path], None],
    overwrite: bool = False,
    manifest: str = "meta.json",
    replaced: Callable[[Path], list[str]] = lambda folder: [],
) -> None:
    """Write a result set into the existing folder `out`, whole or not at all.

    `write(stage)` writes every file under `stage` as it must appear under `out`: unit "" is `out`
    itself, another unit a subfolder (such as sample_000). Each unit holds a `manifest` file,
    moved in last. `replaced(folder)` names the files of an old set in `folder` that overwriting
    retires (removed when the new set lacks them). Staging leftovers of dead writers are cleaned
    first; on any failure (a full disk, an exception, Ctrl-C) the staging folder is removed and
    `out` is as it was.
    """
    out = Path(out)
    clean_stale(out, [u for u in units if u])
    done = False
    try:
        stage, whole = _make_staging(out)
    except OSError as e:
        raise LayerDiffError(
            f"cannot write into folder {out}: {e.strerror or e}; choose a writable folder"
        ) from e
    try:
        try:
            write(stage)
        except (OSError, LayerDiffError) as e:
            cause = _os_error(e)
            if cause is None:
                raise
            raise LayerDiffError(
                f"could not write the results into {out} ({cause.strerror or cause}); nothing was "
                f"written: free some disk space or choose another folder"
            ) from e
        _fsync_dir(stage)
        if whole and _replace_empty_dir(stage, out):
            _fsync_dir(out.parent)
            return
        for unit in units:
            source, target = (stage / unit, out / unit) if unit else (stage, out)
            _commit_unit(source, target, overwrite, manifest, replaced)
        done = True
    except OSError as e:
        raise LayerDiffError(
            f"could not move the results into {out} ({e.strerror or e}); check the folder's permissions"
        ) from e
    finally:
        # A move into place that began and failed (or was interrupted) keeps its staging folder:
        # the next writer finishes it from there once this process has ended.
        if stage.exists() and (done or not any(stage.glob(f"**/{_JOURNAL}"))):
            _remove(stage)
