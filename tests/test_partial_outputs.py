"""Partial outputs (issue 25, class 5): a result set appears whole or not at all.

A crash (an exception in the PSD step), a kill -9 at any write or rename, and a full disk (ENOSPC,
or EFBIG from a file size limit in a real process) must leave the output folder as it was or holding
complete sets, never PNGs without their PSD or meta.json; the next run removes what a dead writer
left and never what a live one is writing; --overwrite semantics hold (nothing replaced without
it; with it, the old set is replaced whole and the user's other files are kept). Set
LAYERDIFF_FUZZ_REPORT=1 to print the counts per case kind.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fuzz_support import print_fuzz_report
from PIL import Image

from layerdiff.errors import LayerDiffError
from layerdiff.io import writing
from layerdiff.io.export import META_FILE, layer_set_files, sample_dir, write_layer_set, write_layer_sets
from layerdiff.io.resultset import STALE_AFTER_S, clean_stale, owner_tag
from layerdiff.stack import LayerStack

psd_tools = pytest.importorskip("psd_tools")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 3 * 2**30
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
CLI = ["generate", "--model", "tiny", "--steps", "1", "--prompt", "a red star in front of a brick wall",
       "--layer", "a brick wall", "--layer", "a red star"]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print_fuzz_report(COUNTS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def make_stack(batch: int = 1, layers: int = 3, seed: int = 0) -> LayerStack:
    g = torch.Generator().manual_seed(seed)
    return LayerStack(images=torch.rand(batch, layers, 4, 6, 3, generator=g),
                      masks=(torch.rand(batch, layers - 1, 4, 6, generator=g) > 0.5).float(),
                      prompts=("wall", "star", "moon", "sun")[:layers], global_prompt="scene")


# ---------------------------------------------------------------------------- what a reader sees
def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too) with a digest of its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def visible(snap: dict[str, str]) -> dict[str, str]:
    """What a reader listing the folder sees: `snap` without hidden entries."""
    return {k: v for k, v in snap.items() if not any(part.startswith(".") for part in Path(k).parts)}


def leftovers(out: Path) -> list[str]:
    """Hidden staging folders and temp files in and beside `out`."""
    found = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out.parent.exists() else []
    if out.is_dir():
        found += [str(p.relative_to(out)) for p in out.rglob(".*")]
    return found


def set_state(folder: Path) -> str:
    """'complete' (meta.json and every file it names, each readable), 'none' (no file of a set)
    or 'PARTIAL'."""
    meta_path = folder / META_FILE
    set_files = [p for p in folder.glob("*") if p.name in ("composite.png", "layers.psd")
                 or p.name.startswith(("layer_", "mask_"))] if folder.is_dir() else []
    if not meta_path.exists():
        return "none" if not set_files else "PARTIAL"
    meta = json.loads(meta_path.read_text("utf-8"))
    names = [meta["composite"], *(x for layer in meta["layers"] for x in (layer["image"], layer["mask"]) if x)]
    for name in names:
        Image.open(folder / name).load()
    if meta["psd"]:
        psd_tools.PSDImage.open(folder / meta["psd"])
        names.append(meta["psd"])
    assert sorted(p.name for p in set_files) == sorted(names), "files of another set beside this one"
    return "complete"


def states(out: Path, batch: int) -> list[str]:
    return [set_state(out if batch == 1 else sample_dir(out, b)) for b in range(batch)]


def assert_whole(out: Path, batch: int, before: dict[str, str] | None = None) -> str:
    """Nothing of a new set (the folder as `before`) or every set complete."""
    got = states(out, batch)
    assert "PARTIAL" not in got, got
    if set(got) == {"none"}:
        if before is not None:
            assert visible(snapshot(out)) == visible(before)
        return "nothing"
    assert set(got) == {"complete"}, f"some samples missing: {got}"
    return "complete"


# ---------------------------------------------------------------------------- a crash in the PSD step
PRESTATES = ["missing", "empty", "other files", "old set + overwrite"]


def prepare(out: Path, prestate: str, batch: int) -> bool:
    """Set `out` up; returns the overwrite flag the case writes with."""
    if prestate != "missing":
        out.mkdir(parents=True)
    if prestate == "other files":
        (out / "notes.txt").write_text("the user's own file")
        (out / "sample_007").mkdir()
        (out / "sample_007" / "keep.bin").write_bytes(b"\x00\x01")
    if prestate == "old set + overwrite":
        write_layer_sets(make_stack(batch, layers=4, seed=9), out, {"old": True})
        return True
    return False


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prestate", PRESTATES)
def test_an_exception_in_the_psd_step_leaves_the_folder_as_it_was(tmp_path, monkeypatch, batch, prestate):
    out = tmp_path / "out"
    overwrite = prepare(out, prestate, batch)
    before = snapshot(out)

    def boom(self, fp, *args, **kwargs):
        raise RuntimeError("injected crash while writing the PSD")

    monkeypatch.setattr(psd_tools.PSDImage, "save", boom)
    with pytest.raises(RuntimeError, match="injected crash"):
        write_layer_sets(make_stack(batch), out, {"run": 1}, overwrite=overwrite)
    assert snapshot(out) == before or (prestate == "missing" and snapshot(out) == {})
    assert leftovers(out) == []
    COUNTS["exception in the PSD step"]["folder as it was"] += 1


# ---------------------------------------------------------------------------- a full disk
def count_writes(batch: int, layers: int = 3, psd: bool = True) -> int:
    return batch * len(layer_set_files(make_stack(1, layers), ".", psd))


@FUZZ
@given(batch=st.integers(1, 3), prestate=st.sampled_from(PRESTATES), psd=st.booleans(), data=st.data())
def test_a_full_disk_at_any_write_leaves_no_partial_set(tmp_path_factory, monkeypatch, batch, prestate, psd, data):
    fail_at = data.draw(st.integers(0, count_writes(batch, psd=psd) - 1), label="failing write")
    out = tmp_path_factory.mktemp("enospc") / "out"
    overwrite = prepare(out, prestate, batch)
    before = snapshot(out)
    calls = []
    real = writing.atomic_write

    def atomic_write(path, write):
        calls.append(path)
        if len(calls) - 1 == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    monkeypatch.setattr(writing, "atomic_write", atomic_write)
    with pytest.raises(LayerDiffError) as err:
        write_layer_sets(make_stack(batch), out, {"run": 1}, overwrite=overwrite, psd=psd)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message and str(out) in message, message
    assert "nothing was written" in message
    assert snapshot(out) == before or (prestate == "missing" and snapshot(out) == {})
    assert leftovers(out) == []
    COUNTS["full disk (ENOSPC at write k, hypothesis)"]["folder as it was"] += 1


def test_a_full_disk_inside_psd_tools_is_one_line(tmp_path, monkeypatch):
    def full(self, fp, *args, **kwargs):
        fp.write(b"8BPS partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(psd_tools.PSDImage, "save", full)
    with pytest.raises(LayerDiffError, match=r"could not write the results into .*No space left on device"):
        write_layer_sets(make_stack(2), tmp_path / "out")
    assert snapshot(tmp_path / "out") == {} and leftovers(tmp_path / "out") == []
    COUNTS["full disk (inside psd-tools)"]["folder as it was"] += 1


# ---------------------------------------------------------------------------- kill -9 at any point
KILLER = r"""
import json, os, signal, sys, types
import torch
import psd_tools, PIL.PngImagePlugin  # imported once here, not in every forked writer
from layerdiff.io import export, psd, resultset, writing
from layerdiff.stack import LayerStack

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def scenario(sc):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    b = sc["batch"]
    stack = LayerStack(images=torch.rand(b, 3, 4, 6, 3, generator=g),
                       masks=(torch.rand(b, 2, 4, 6, generator=g) > 0.5).float())
    count = [0]
    if sc["at"] == "write":  # die in the middle of the k-th file: half of it written
        real = writing.atomic_write
        def atomic_write(path, write):
            if count[0] == sc["k"]:
                def half(f):
                    data = write if isinstance(write, (bytes, bytearray)) else b"x" * 4096
                    f.write(data[: len(data) // 2]); f.flush(); die()
                return real(path, half)
            count[0] += 1
            return real(path, write)
        writing.atomic_write = atomic_write
    elif sc["at"] == "commit":  # die before the k-th rename that moves the set into place
        def moving(fn):
            def wrapped(src, dst):
                if count[0] == sc["k"]:
                    die()
                count[0] += 1
                return fn(src, dst)
            return wrapped
        resultset.os = types.SimpleNamespace(**{**vars(os), "rename": moving(os.rename), "replace": moving(os.replace)})
    export.write_layer_sets(stack, sc["out"], {"run": 2}, overwrite=sc["overwrite"])

job = json.loads(sys.stdin.read())
torch.set_num_threads(1)  # one thread: nothing half-initialised is copied into the forked writers
scenario({"batch": 3, "at": "none", "out": job["warm_up"], "overwrite": False})  # imports and first calls, once
results = []
for sc in job["cases"]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            scenario(sc)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append(os.waitstatus_to_exitcode(status))
print(json.dumps(results))
"""

KILLS = [  # (batch, prestate, where, k)
    *[(1, "empty", "write", k) for k in (0, 3, 6, 7)],  # 6 = the PSD, 7 = meta.json
    *[(3, "missing", "write", k) for k in (0, 11, 23)],
    (1, "other files", "write", 6), (3, "other files", "write", 20),
    (1, "old set + overwrite", "write", 7), (3, "old set + overwrite", "write", 12),
    (1, "empty", "commit", 0), (3, "missing", "commit", 0),  # the one rename of a fresh folder
    (3, "other files", "commit", 1),  # between two samples
    *[(1, "other files", "commit", k) for k in (0, 3, 7)],  # file by file, meta.json last
    (1, "old set + overwrite", "commit", 2), (3, "old set + overwrite", "commit", 9),
]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked writers (POSIX)")
def test_kill_9_at_any_write_or_rename_never_shows_a_partial_set(tmp_path):
    """Each case forks a writer that SIGKILLs itself at one point. Afterwards a fresh folder holds
    nothing or complete sets; a folder with other files holds complete sets, or a set without
    meta.json (its manifest, moved in last) while its renames ran; the next run finishes a move
    that had begun, removes the dead writer's staging folder and writes complete sets."""
    cases = []
    for i, (batch, prestate, where, k) in enumerate(KILLS):
        out = tmp_path / f"case{i}" / "out"
        out.parent.mkdir()
        overwrite = prepare(out, prestate, batch)
        cases.append({"out": str(out), "batch": batch, "at": where, "k": k, "overwrite": overwrite,
                      "before": snapshot(out), "prestate": prestate})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    job = {"warm_up": str(tmp_path / "warm-up"), "cases": cases}
    r = subprocess.run([sys.executable, "-c", KILLER], input=json.dumps(job), capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    codes = json.loads(r.stdout)
    for case, code in zip(cases, codes):
        out, batch = Path(case["out"]), case["batch"]
        assert code == -signal.SIGKILL, (case, code)  # the writer died where the case says
        file_by_file = case["at"] == "commit" and case["prestate"] != "missing" and case["prestate"] != "empty"
        if file_by_file:
            got = [set_state(out if batch == 1 else sample_dir(out, b)) for b in range(batch)]
            assert all(s in ("complete", "none", "PARTIAL") for s in got)
            for b in range(batch):  # a set with its manifest is complete; one without is not a set yet
                folder = out if batch == 1 else sample_dir(out, b)
                if (folder / META_FILE).exists():
                    assert set_state(folder) == "complete"
            seen = "manifest rule holds"
        else:
            seen = assert_whole(out, batch, case["before"])
            if case["prestate"] == "old set + overwrite" and case["at"] == "write":
                assert visible(snapshot(out)) == case["before"]  # the old set untouched
        assert (out / "notes.txt").exists() == (case["prestate"] == "other files")
        removed = clean_stale(out, [sample_dir(out, b).name for b in range(batch)])
        assert leftovers(out) == [], (case, removed)
        after = states(out, batch)  # a move into place that had begun is finished: no partial set
        assert "PARTIAL" not in after, (case, after)
        if file_by_file and batch == 1:
            assert after == ["complete"]
        write_layer_sets(make_stack(batch), out, {"run": 3}, overwrite=True)
        assert set(states(out, batch)) == {"complete"} and leftovers(out) == []
        COUNTS["kill -9 (forked writer)"][seen] += 1


def test_a_failed_move_into_place_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """A rename that fails half way through moving a set into a folder with other files keeps the
    staging folder (all files are there); once its writer is gone, the next run finishes the set."""
    out = tmp_path / "out"
    prepare(out, "old set + overwrite", 1)
    (out / "notes.txt").write_text("mine")
    real, calls = os.replace, []

    def replace(src, dst):  # the third move into `out` fails
        calls.extend([dst] if Path(dst).parent == out else [])
        if len(calls) == 3 and Path(dst).parent == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(LayerDiffError, match="could not move the results into .*Permission denied"):
        write_layer_set(make_stack(), out, {"run": "new"}, overwrite=True)
    monkeypatch.undo()
    assert set_state(out) in ("none", "PARTIAL")  # no manifest: not a set
    (stage,) = [p for p in out.iterdir() if p.name.endswith(".partial")]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stage.rename(stage.with_name(stage.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")))  # its writer ended
    clean_stale(out)
    assert set_state(out) == "complete" and leftovers(out) == [] and (out / "notes.txt").exists()
    assert json.loads((out / META_FILE).read_text())["run"] == "new"
    COUNTS["failed move into place"]["finished by the next run"] += 1


# ---------------------------------------------------------------------------- stale files: whose are they
def test_clean_stale_removes_dead_writers_leftovers_only(tmp_path):
    out = tmp_path / "out"
    (out / "sample_000").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = owner_tag().split("-")[0]
        made = {
            "dead inside": out / f".layerdiff-{host}-{dead.pid}-0123abcd.partial",
            "dead beside": tmp_path / f".out.layerdiff-{host}-{dead.pid}-0123abcd.partial",
            "legacy temp": out / ".composite.png.1a2b3c4d.tmp",
            "legacy temp in a sample": out / "sample_000" / ".meta.json.deadbeef.tmp",
            "dead temp": out / f".layers.psd.{host}-{dead.pid}.0a0b0c0d.tmp",
            "old, other host": out / ".layerdiff-ffffffff-12-0123abcd.partial",
        }
        kept = {
            "live inside": out / f".layerdiff-{host}-{live.pid}-0123abcd.partial",
            "ours": out / f".layerdiff-{owner_tag()}-0123abcd.partial",
            "live temp": out / f".layers.psd.{host}-{live.pid}.0a0b0c0d.tmp",
            "recent, other host": out / ".layerdiff-eeeeeeee-12-0123abcd.partial",
            "another folder's staging": tmp_path / f".other.layerdiff-{host}-{dead.pid}-0123abcd.partial",
            "user's hidden file": out / ".hidden",
            "user's temp file": out / "notes.tmp",
            "user's dotted temp": out / ".notes.tmp",
        }
        for path in [*made.values(), *kept.values()]:
            if path.name.endswith(".partial"):
                path.mkdir()
                (path / "composite.png").write_bytes(b"half")
            else:
                path.write_bytes(b"half")
        old = time.time() - STALE_AFTER_S - 60
        os.utime(made["old, other host"], (old, old))
        removed = clean_stale(out, ["sample_000"])
        assert sorted(map(str, removed)) == sorted(map(str, made.values()))
        assert all(p.exists() for p in kept.values())
        COUNTS["stale files"]["removed"] += len(made)
        COUNTS["stale files"]["kept"] += len(kept)
    finally:
        live.kill()
        live.wait()


def test_save_psd_node_cleans_dead_temp_files(tmp_path):
    import nodes
    from nodes import _host

    for kind in ("output", "temp"):
        _host.set_fallback_folder(kind, tmp_path / kind)
    try:
        (tmp_path / "output").mkdir()
        host = owner_tag().split("-")[0]
        stale = tmp_path / "output" / f".LayerDiff_00001_.psd.{host}-999999999.0a0b0c0d.tmp"
        stale.write_bytes(b"half a psd")
        nodes.NODE_CLASS_MAPPINGS["LayerDiffSavePSD"]().save(make_stack(), "LayerDiff")
        assert not stale.exists()
        assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["LayerDiff_00001_.psd"]
    finally:
        for kind in ("output", "temp"):
            _host.set_fallback_folder(kind, None)


# ---------------------------------------------------------------------------- overwrite semantics
def test_overwrite_replaces_the_whole_old_set_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"
    write_layer_set(make_stack(layers=4, seed=1), out, {"run": "old"})
    (out / "notes.txt").write_text("mine")
    (out / "layer_09.png").write_bytes(b"not in the old manifest: never removed")
    before = snapshot(out)
    with pytest.raises(LayerDiffError, match="already holds .*pass overwrite=True"):
        write_layer_set(make_stack(layers=3), out, {"run": "new"})
    assert snapshot(out) == before
    write_layer_set(make_stack(layers=3), out, {"run": "new"}, overwrite=True)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["run"] == "new" and [layer["image"] for layer in meta["layers"]] == [f"layer_0{i}.png" for i in range(3)]
    assert all((out / name).is_file() for name in ["composite.png", "layers.psd", "mask_01.png", "mask_02.png"])
    assert not (out / "layer_03.png").exists() and not (out / "mask_03.png").exists()  # old set's extra layer
    assert (out / "notes.txt").read_text() == "mine" and (out / "layer_09.png").exists()
    assert leftovers(out) == []
    COUNTS["overwrite semantics"]["held"] += 2


def test_a_hand_edited_manifest_never_names_other_files_for_removal(tmp_path):
    out = tmp_path / "out"
    write_layer_set(make_stack(), out, {})
    meta = json.loads((out / META_FILE).read_text())
    meta["composite"] = "../victim.txt"
    meta["layers"][0]["image"] = "notes.txt"
    (out / META_FILE).write_text(json.dumps(meta))
    (tmp_path / "victim.txt").write_text("keep")
    (out / "notes.txt").write_text("keep")
    write_layer_set(make_stack(layers=2), out, {}, overwrite=True)
    assert (tmp_path / "victim.txt").exists() and (out / "notes.txt").exists()
    COUNTS["overwrite semantics"]["held"] += 1


# ---------------------------------------------------------------------------- the command line
def _limits(file_size: int | None = None):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        if file_size is not None:  # a disk that fills: writes past the size fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    return apply


def start_cli(args: list[str], cwd: Path, file_size: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "layerdiff", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=_limits(file_size))


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, err = proc.communicate()
    finally:
        timer.cancel()
    return proc.returncode, err.decode("utf-8", "replace")


@pytest.mark.slow
def test_command_line_killed_during_a_batch_then_run_again(tmp_path):
    """kill -9 of `generate --batch 24` while it writes: --out holds nothing or complete samples and
    no file outside it changed; the next run removes the leftovers and writes complete sets."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("untouched")
    out = work / "out"
    proc = start_cli([*CLI, "--batch", "24", "--out", str(out)], work)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.endswith(".partial") for p in work.iterdir()) or (
                out.is_dir() and any(p.name.endswith(".partial") for p in out.iterdir())):
            time.sleep(0.05)  # let it write a few files
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    code, err = finish(proc)
    assert code == -signal.SIGKILL, err
    seen = assert_whole(out, 24, {})
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == ["keep.txt", "out"]
    assert leftovers(out) != [] or seen == "complete"  # the writer had no time to clean up

    code, err = finish(start_cli([*CLI, "--batch", "2", "--out", str(out), "--overwrite"], work))
    assert code == 0 and "Traceback" not in err, err
    assert leftovers(out) == [] and states(out, 2) == ["complete"] * 2
    assert (work / "keep.txt").read_text() == "untouched"
    COUNTS["command line: kill -9 during --batch 24"][seen] += 1


@pytest.mark.slow
def test_command_line_on_a_full_disk_writes_nothing(tmp_path):
    """A file size limit makes the PSD write fail (EFBIG) after the PNGs fitted: exit 1, one line,
    no traceback, no signal, nothing in --out, nothing else changed."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("untouched")
    out = work / "out"
    code, err = finish(start_cli([*CLI, "--batch", "2", "--out", str(out)], work, file_size=20_000))
    lines = err.strip().split("\n")
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: could not write the results into") and "nothing was written" in lines[0]
    assert snapshot(out) == {} and leftovers(out) == []
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "out"]
    COUNTS["command line: full disk"]["one line, nothing written"] += 1
