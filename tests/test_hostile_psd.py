"""Hostile and odd PSD input (issue 25, class 3): layer names in any script, damaged and oversized
files, and Load PSD as Layers' input folder boundary.

Writing: every Unicode layer name survives a PSD round trip (the 'luni' block), with a MacRoman
fallback for older readers, through the library, the Save/Load nodes and the command line.
Reading: damaged files (truncated, wrong signature, mutated header and layer records, absurd
counts and sizes) end in one LayerDiffError line before anything large is decoded; every load runs
in a worker process under an address-space limit and a timeout, so a regression shows as a failed
case, never as a machine out of memory. Load PSD as Layers reads only files inside the input folder.
Set LAYERDIFF_FUZZ_REPORT=1 to print the counts per case kind and the largest memory reached.
"""

from __future__ import annotations

import collections
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fuzz_support import print_fuzz_report

import nodes
from layerdiff.errors import LayerDiffError
from layerdiff.io.psd import MAX_NAME_UNITS, load_psd, psd_layer_names, save_psd
from layerdiff.stack import LayerStack
from nodes import _host
from nodes.io import input_psd_path

psd_tools = pytest.importorskip("psd_tools")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 3 * 2**30  # RLIMIT_AS of the worker and of each command-line run
TIMEOUT_S = 60
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
PEAK_RSS: dict[str, int] = {}
SCRIPTS = {
    "cyrillic": "кирпичная стена",
    "cjk": "赤い星と猫 红色的星",
    "emoji": "🌟 star 🐱‍👤",
    "zwj family": "👨‍👩‍👧‍👦",
    "arabic": "نجمة حمراء",
    "hebrew": "כוכב אדום",
    "devanagari": "लाल तारा नमस्ते",
    "thai": "ดาวสีแดง",
    "greek": "κόκκινο αστέρι",
    "korean": "빨간 별",
    "accents": "crème brûlée – Ångström",
    "combining": "e\u0301te\u0301 n\u0303",
    "control and nul": "tab\there\x00nul\x7f",
    "bidi marks": "\u202eevil\u202c \u200f",
    "astral math": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print_fuzz_report(COUNTS, PEAK_RSS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture()
def folders(tmp_path):
    for kind in ("output", "input", "temp"):
        (tmp_path / kind).mkdir()
        _host.set_fallback_folder(kind, tmp_path / kind)
    yield tmp_path
    for kind in ("output", "input", "temp"):
        _host.set_fallback_folder(kind, None)


def small_stack(names=("background", "star", "circle"), h: int = 6, w: int = 8) -> LayerStack:
    g = torch.Generator().manual_seed(0)
    n = len(names)
    return LayerStack(images=torch.rand(1, n, h, w, 3, generator=g), masks=torch.rand(1, n - 1, h, w, generator=g),
                      names=tuple(names), prompts=("",) * n)


def expected_name(name: str) -> str:
    return psd_layer_names(name)[0]


# ---------------------------------------------------------------------------- writing: layer names
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_layer_names_in_any_script_round_trip(tmp_path, script):
    names = ("background " + SCRIPTS[script], SCRIPTS[script], f"layer 2: {SCRIPTS[script]}")
    path = save_psd(small_stack(names), tmp_path / "names.psd")
    assert load_psd(path).names == names
    psd = psd_tools.PSDImage.open(path)
    for layer, name in zip(psd, names):
        fallback = layer._record.name  # the Pascal name an older reader shows
        fallback.encode("mac_roman")
        assert len(fallback) <= 255 and fallback == psd_layer_names(name)[1]
    COUNTS["PSD layer names (scripts)"]["round trip"] += 1


NAMES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=300)


@FUZZ
@given(names=st.lists(NAMES, min_size=2, max_size=4))
def test_arbitrary_unicode_layer_names_round_trip(tmp_path_factory, names):
    path = save_psd(small_stack(names, h=2, w=3), tmp_path_factory.mktemp("u") / "u.psd")
    back = load_psd(path).names
    assert back == tuple(expected_name(n) for n in names)
    for name, got in zip(names, back):
        if len(name.encode("utf-16-be")) <= 2 * MAX_NAME_UNITS:
            assert got == name  # whole names come back exactly; longer ones are cut at 255 UTF-16 units
    COUNTS["PSD layer names (hypothesis)"]["round trip"] += 1


def test_names_that_need_care():
    long = "ж" * 300
    assert psd_layer_names(long) == ("ж" * 255, "?" * 255)
    emoji = "🌟" * 200  # 400 UTF-16 units: cut between pairs, never inside one
    assert psd_layer_names(emoji)[0] == "🌟" * 127
    assert psd_layer_names("caf\udce9")[0] == "caf\ufffd"  # a lone surrogate (undecodable argv bytes)
    assert psd_layer_names("Łódź żółć")[1] == "?ódz zó?c"  # accents dropped where MacRoman lacks the letter
    assert psd_layer_names("crème")[1] == "crème"  # MacRoman has it


def test_layer_set_with_unicode_names_and_undecodable_prompts(tmp_path):
    """meta.json stays valid JSON with prompts holding lone surrogates (argv bytes that are not
    UTF-8); the PSD keeps the names."""
    from layerdiff.io.export import write_layer_set

    stack = small_stack(("фон", "星 🌟", "caf\udce9"))
    stack = LayerStack(stack.images, stack.masks, names=stack.names, prompts=("фон", "星", "caf\udce9"),
                       global_prompt="x \udcff")
    write_layer_set(stack, tmp_path / "set", {"note": "\udc80"})
    meta = json.loads((tmp_path / "set" / "meta.json").read_bytes().decode("utf-8"))
    assert meta["global_prompt"] == "x \udcff" and meta["layers"][2]["prompt"] == "caf\udce9"
    assert load_psd(tmp_path / "set" / "layers.psd").names == ("фон", "星 🌟", "caf\ufffd")
    COUNTS["PSD layer names (library)"]["written"] += 1


def test_save_and_load_nodes_keep_unicode_names(folders):
    names = ("фон: кирпичная стена", "layer 1: 赤い星 🌟", "layer 2: نجمة")
    result = nodes.NODE_CLASS_MAPPINGS["LayerDiffSavePSD"]().save(small_stack(names), "scripts/скан")
    saved = result["ui"]["psd"][0]
    path = folders / "output" / saved["subfolder"] / saved["filename"]
    os.replace(path, folders / "input" / "scan.psd")
    (back,) = nodes.NODE_CLASS_MAPPINGS["LayerDiffLoadPSD"]().load("scan.psd")
    assert back.names == names
    COUNTS["PSD layer names (nodes)"]["round trip"] += 1


def test_psd_too_wide_is_refused_before_any_file(tmp_path):
    from layerdiff.io.export import write_layer_sets

    wide = LayerStack(images=torch.zeros(1, 2, 8, 30008, 3), masks=torch.zeros(1, 1, 8, 30008))
    with pytest.raises(LayerDiffError, match="cannot be saved as a PSD .*--no-psd"):
        write_layer_sets(wide, tmp_path / "wide")
    assert not (tmp_path / "wide").exists()
    with pytest.raises(LayerDiffError, match="at most 30000 pixels a side"):
        save_psd(wide, tmp_path / "wide.psd")
    assert list(tmp_path.iterdir()) == []
    COUNTS["PSD writing (size)"]["refused"] += 2


# ---------------------------------------------------------------------------- reading: a worker under limits
WORKER = r"""
import json, resource, sys, traceback
from layerdiff.errors import LayerDiffError
from layerdiff.io.psd import load_psd
from nodes.io import LayerDiffLoadPSD
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["call"] == "load_psd":
            s = load_psd(req["arg"])
        else:
            check = LayerDiffLoadPSD.VALIDATE_INPUTS(req["arg"])
            changed = LayerDiffLoadPSD.IS_CHANGED(req["arg"])
            (s,) = LayerDiffLoadPSD().load(req["arg"])
            assert check is True and changed, (check, changed)
        r = {"ok": True, "shape": list(s.images.shape), "names": list(s.names),
             "finite": bool(s.images.isfinite().all() and s.masks.isfinite().all()),
             "range": [float(s.images.min()), float(s.images.max())]}
    except LayerDiffError as e:
        r = {"error": "LayerDiffError", "message": str(e)}
    except BaseException as e:
        r = {"error": type(e).__name__, "message": traceback.format_exc()}
    r["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(r), flush=True)
"""


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


class Worker:
    """A Python process under MEMORY_LIMIT that loads PSDs on request, each within TIMEOUT_S."""

    def __init__(self, input_dir: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LAYERDIFF_INPUT_DIR": str(input_dir)}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     preexec_fn=_limit_memory)
        assert self._line(120) == "ready"

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise AssertionError(f"the worker took more than {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise AssertionError(f"the worker died (exit {code}, a negative code is a signal)")
        return line.strip()

    def call(self, call: str, arg: str) -> dict:
        self.proc.stdin.write(json.dumps({"call": call, "arg": arg}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line(TIMEOUT_S))

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_psd")
    (root / "input").mkdir()
    return root


@pytest.fixture(scope="module")
def worker(workspace):
    w = Worker(workspace / "input")
    yield w
    w.close()


def _good_psd(folder: Path) -> bytes:
    path = save_psd(small_stack(("фон", "星", "circle")), folder / "good.psd")
    return path.read_bytes()


@pytest.fixture(scope="module")
def good(workspace) -> bytes:
    return _good_psd(workspace)


_serial = iter(range(10**9))


def check_load(worker: Worker, workspace: Path, raw: bytes, kind: str) -> str:
    """Load `raw` in the worker: a stack or one LayerDiffError line; anything else fails."""
    path = workspace / f"case-{next(_serial)}.psd"
    path.write_bytes(raw)
    r = worker.call("load_psd", str(path))
    path.unlink()
    PEAK_RSS["load_psd worker"] = max(PEAK_RSS.get("load_psd worker", 0), r["maxrss"])
    assert r["maxrss"] < MEMORY_LIMIT
    if r.get("ok"):
        assert r["finite"] and 0.0 <= r["range"][0] <= r["range"][1] <= 1.0, r
        COUNTS[kind]["loaded"] += 1
        return "loaded"
    assert r["error"] == "LayerDiffError", r["message"]
    message = r["message"]
    assert "\n" not in message and len(message) < 1000 and path.name in message, message
    COUNTS[kind]["refused"] += 1
    return "refused"


def sections(raw: bytes) -> dict[str, int]:
    """Offsets of the length fields and of the first layer record of a .psd (version 1)."""
    off = 26
    at = {"color mode length": off}
    off += 4 + struct.unpack_from(">I", raw, off)[0]
    at["image resources length"] = off
    off += 4 + struct.unpack_from(">I", raw, off)[0]
    at["layer and mask length"] = off
    at["layer info length"] = off + 4
    at["layer count"] = off + 8
    at["record"] = off + 10
    at["record channels"] = off + 10 + 16
    at["record channel 0 length"] = off + 10 + 18 + 2
    return at


HEADER_FIELDS = {  # name: (offset, struct format)
    "signature": (0, ">4s"), "version": (4, ">H"), "channels": (12, ">H"), "height": (14, ">I"),
    "width": (18, ">I"), "depth": (22, ">H"), "color mode": (24, ">H"),
}
EXTREMES = [0, 1, 2, 3, 7, 56, 57, 255, 256, 30000, 30001, 65535, 300000, 2**31 - 1, 2**31, 2**32 - 1]


def _fit(fmt: str, value: int) -> int:
    """`value` wrapped into the range of the struct field `fmt` (two's complement for signed ones)."""
    bits = struct.calcsize(fmt) * 8
    value %= 2**bits
    return value - 2**bits if fmt[-1].islower() and value >= 2 ** (bits - 1) else value


def patched(raw: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, value if fmt.endswith("s") else _fit(fmt, value))
    return bytes(out)


@FUZZ
@given(field=st.sampled_from(sorted(HEADER_FIELDS)),
       value=st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**32 - 1)))
def test_mutated_header_fields(worker, workspace, good, field, value):
    offset, fmt = HEADER_FIELDS[field]
    if fmt.endswith("s"):
        value = value.to_bytes(4, "big")
    check_load(worker, workspace, patched(good, offset, fmt, value), "header fields (hypothesis)")


RECORD_FIELDS = {  # name: (key in sections(), extra offset, format)
    "record top": ("record", 0, ">i"), "record left": ("record", 4, ">i"), "record bottom": ("record", 8, ">i"),
    "record right": ("record", 12, ">i"), "record channel count": ("record channels", 0, ">H"),
    "channel 0 length": ("record channel 0 length", 0, ">I"), "layer count": ("layer count", 0, ">h"),
    "color mode length": ("color mode length", 0, ">I"), "image resources length": ("image resources length", 0, ">I"),
    "layer and mask length": ("layer and mask length", 0, ">I"), "layer info length": ("layer info length", 0, ">I"),
}
SIGNED_EXTREMES = [-(2**31), -30001, -1, 0, 1, 32767, -32768, 30000, 2**31 - 1, 2**20, 2**16]


@FUZZ
@given(field=st.sampled_from(sorted(RECORD_FIELDS)),
       value=st.one_of(st.sampled_from(EXTREMES + SIGNED_EXTREMES), st.integers(-(2**31), 2**32 - 1)))
def test_mutated_layer_records_and_section_lengths(worker, workspace, good, field, value):
    key, extra, fmt = RECORD_FIELDS[field]
    check_load(worker, workspace, patched(good, sections(good)[key] + extra, fmt, value), "layer records (hypothesis)")


@FUZZ
@given(data=st.data())
def test_truncated_files(worker, workspace, good, data):
    length = data.draw(st.integers(0, len(good) - 1), label="length")
    check_load(worker, workspace, good[:length], "truncated (hypothesis)")


@FUZZ
@given(data=st.data())
def test_random_byte_changes(worker, workspace, good, data):
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), min_size=1, max_size=8))
    raw = bytearray(good)
    for offset, byte in flips:
        raw[offset] = byte
    check_load(worker, workspace, bytes(raw), "byte changes (hypothesis)")


def _header(raw: bytes, width: int, height: int, version: int = 1) -> bytes:
    out = bytearray(raw)
    struct.pack_into(">H", out, 4, version)
    struct.pack_into(">II", out, 14, height, width)
    return bytes(out)


def _odd_files(good: bytes) -> dict[str, bytes]:
    at = sections(good)
    empty = psd_tools.PSDImage.new("RGB", (8, 8))
    from io import BytesIO

    buf = BytesIO()
    empty.save(buf)
    return {
        "empty file": b"",
        "text renamed .psd": b"just some text, not a Photoshop file\n" * 3,
        "PNG renamed .psd": b"\x89PNG\r\n\x1a\n" + bytes(40),
        "wrong signature": b"8BPX" + good[4:],
        "header only": good[:26],
        "zero layers": buf.getvalue(),
        "30000x30000 canvas (3.8 KB)": _header(good, 30000, 30000),
        "8192x8192 canvas x 3 layers": _header(good, 8192, 8192),
        "PSB 300000x300000": _header(good, 300000, 300000, version=2),
        "30001 wide": _header(good, 30001, 8),
        "65535 channels": patched(good, 12, ">H", 65535),
        "0 channels": patched(good, 12, ">H", 0),
        "version 3": patched(good, 4, ">H", 3),
        "depth 7": patched(good, 22, ">H", 7),
        "colour mode 5": patched(good, 24, ">H", 5),
        "layer count 32767": patched(good, at["layer count"], ">h", 32767),
        "layer count -32768": patched(good, at["layer count"], ">h", -32768),
        "record channels 65535": patched(good, at["record channels"], ">H", 65535),
        "record 2^31 wide": patched(good, at["record"] + 12, ">i", 2**31 - 1),
        "record 40000x40000": patched(patched(good, at["record"] + 8, ">i", 40000), at["record"] + 12, ">i", 40000),
        "record upside down": patched(good, at["record"], ">i", 2**31 - 1),
        "channel length 4 GiB": patched(good, at["record channel 0 length"], ">I", 2**32 - 1),
        "layer section 4 GiB": patched(good, at["layer and mask length"], ">I", 2**32 - 1),
        "image resources 4 GiB": patched(good, at["image resources length"], ">I", 2**32 - 1),
        "color data 2 GiB": patched(good, at["color mode length"], ">I", 2**31),
    }


MAY_LOAD = {"record upside down": ["星", "circle"]}  # a layer with no pixels is skipped, as in editors
EXPECTED_REFUSAL = {
    "30000x30000 canvas (3.8 KB)": "scale the document down",
    "8192x8192 canvas x 3 layers": "in all layers",
    "PSB 300000x300000": "scale the document down",
    "wrong signature": "not the PSD signature",
    "65535 channels": "1 to 56",
    "zero layers": "no pixel layers",
}


def test_damaged_and_oversized_files(worker, workspace, good):
    for case, raw in _odd_files(good).items():
        path = workspace / f"odd-{next(_serial)}.psd"
        path.write_bytes(raw)
        r = worker.call("load_psd", str(path))
        PEAK_RSS["load_psd worker"] = max(PEAK_RSS.get("load_psd worker", 0), r["maxrss"])
        if case in MAY_LOAD and r.get("ok"):
            assert r["names"] == MAY_LOAD[case], (case, r)
            COUNTS["damaged and oversized files"]["loaded"] += 1
            continue
        assert r.get("error") == "LayerDiffError", (case, r)
        assert "\n" not in r["message"] and path.name in r["message"], (case, r["message"])
        if case in EXPECTED_REFUSAL:
            assert EXPECTED_REFUSAL[case] in r["message"], (case, r["message"])
        COUNTS["damaged and oversized files"]["refused"] += 1


def test_the_30000_pixel_header_is_refused_in_little_memory(tmp_path, good):
    """The issue's file: 3.8 KB claiming 30000x30000 once asked for 13.4 GiB per layer; now it is
    refused from the header, in a fresh process whose peak stays near the interpreter's own."""
    path = tmp_path / "huge.psd"
    path.write_bytes(_header(good, 30000, 30000))
    code = ("import resource, sys\nfrom layerdiff.errors import LayerDiffError\nfrom layerdiff.io.psd import load_psd\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    load_psd(sys.argv[1])\nexcept LayerDiffError as e:\n    print(e, file=sys.stderr)\n"
            "print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=TIMEOUT_S, preexec_fn=_limit_memory, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "30000x30000" in r.stderr, r.stderr
    before, after = map(int, r.stdout.split())
    PEAK_RSS["30000x30000 header"] = after
    assert after - before < 64 * 2**20


def test_a_large_real_document_loads_layer_by_layer(tmp_path):
    """Real pixels within the limits load, and memory follows the pixels: the peak stays near the
    size of the returned stack (16 bytes a layer pixel), not a multiple of it."""
    h, w, layers = 1024, 1536, 4
    g = torch.Generator().manual_seed(0)
    stack = LayerStack(images=torch.rand(1, layers, h, w, 3, generator=g),
                       masks=(torch.rand(1, layers - 1, h, w, generator=g) > 0.5).float())
    path = save_psd(stack, tmp_path / "big.psd")
    code = ("import resource, sys\nfrom layerdiff.io.psd import load_psd\nimport psd_tools\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\ns = load_psd(sys.argv[1])\n"
            "print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, s.images.shape[1])\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=TIMEOUT_S, preexec_fn=_limit_memory, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    before, after, n = map(int, r.stdout.split())
    result = layers * h * w * 16
    PEAK_RSS["4 layers of 1536x1024"] = after
    assert n == layers and after - before < 2 * result


# ---------------------------------------------------------------------------- Load PSD as Layers: the input folder
def _outside_cases(root: Path, good: bytes) -> dict[str, str]:
    """Names that must be refused; files they point at exist and are valid PSDs."""
    inp, outside = root / "input", root / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.psd").write_bytes(good)
    (root / "output").mkdir(exist_ok=True)
    (root / "output" / "made.psd").write_bytes(good)
    (inp / "sub").mkdir(exist_ok=True)
    link = inp / "link.psd"
    if not link.is_symlink():
        link.symlink_to(outside / "secret.psd")
        (inp / "linkdir").symlink_to(outside, target_is_directory=True)
    if not (inp / "pipe.psd").exists() and hasattr(os, "mkfifo"):
        os.mkfifo(inp / "pipe.psd")
    (inp / "folder.psd").mkdir(exist_ok=True)
    return {
        "absolute path outside": str(outside / "secret.psd"),
        "../ out of the input folder": "../outside/secret.psd",
        "sub/../../ out of the input folder": "sub/../../outside/secret.psd",
        "symlink to a file outside": "link.psd",
        "through a symlinked folder": "linkdir/secret.psd",
        "[output] annotation": "made.psd [output]",
        "[temp] annotation": "made.psd [temp]",
        "annotated ../": "../outside/secret.psd [input]",
        "/etc/passwd": "/etc/passwd",
        "/dev/zero as .psd": "/dev/zero",
        "FIFO in the input folder": "pipe.psd",
        "folder named .psd": "folder.psd",
        "missing file": "nope.psd",
        "NUL in the name": "good.psd\x00.png",
        "empty name": "",
        "a number": 7,
        "the input folder itself": ".",
        "5000-character name": "a" * 5000 + ".psd",
        "not a PSD extension": "good.png",
    }


def test_load_psd_node_reads_only_the_input_folder(worker, workspace, good):
    """Every name that leads outside the input folder (or to no regular file) is refused by
    VALIDATE_INPUTS, IS_CHANGED and load alike, without reading the target; names inside it load."""
    inp = workspace / "input"
    (inp / "good.psd").write_bytes(good)
    (inp / "sub").mkdir(exist_ok=True)
    (inp / "sub" / "deep.psd").write_bytes(good)
    before = {p: p.stat().st_mtime_ns for p in workspace.rglob("*") if p.is_file() and not p.is_symlink()}
    for case, name in _outside_cases(workspace, good).items():
        if isinstance(name, int):
            with pytest.raises(LayerDiffError):
                input_psd_path(name)
            COUNTS["Load PSD node: outside the input folder"]["refused"] += 1
            continue
        r = worker.call("node", name)
        assert r.get("error") in ("LayerDiffError", "AssertionError"), (case, r)
        if r["error"] == "AssertionError":
            raise AssertionError(f"{case}: VALIDATE_INPUTS or IS_CHANGED accepted it: {r['message']}")
        assert "\n" not in r["message"], (case, r["message"])
        assert "input folder" in r["message"] or ".psd/.psb" in r["message"] or "file name" in r["message"], r
        COUNTS["Load PSD node: outside the input folder"]["refused"] += 1
    for name in ("good.psd", "good.psd [input]", "sub/deep.psd", "sub/../good.psd", "./good.psd"):
        r = worker.call("node", name)
        assert r.get("ok") and r["names"] == ["фон", "星", "circle"], (name, r)
        COUNTS["Load PSD node: inside the input folder"]["loaded"] += 1
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # nothing was written anywhere


SEGMENTS = st.sampled_from(["..", ".", "sub", "good.psd", "secret.psd", "outside", "linkdir", "link.psd", "",
                            "input", "/", "x.psd [input]", " [input]", " [output]"])


@FUZZ
@given(parts=st.lists(SEGMENTS, max_size=5), last=st.sampled_from(["good.psd", "secret.psd", "link.psd", "x.psd"]),
       annotation=st.sampled_from(["", " [input]", " [output]", "[input]"]), absolute=st.booleans())
def test_any_name_resolves_inside_the_input_folder_or_is_refused(folders, parts, last, annotation, absolute):
    good = (folders / "good.bin")
    if not good.exists():
        good.write_bytes(_good_psd(folders))
        _outside_cases(folders, good.read_bytes())
        (folders / "input" / "good.psd").write_bytes(good.read_bytes())
    name = ("/" if absolute else "") + "/".join([*parts, last]) + annotation
    try:
        path = input_psd_path(name)
    except LayerDiffError as e:
        assert "\n" not in str(e)
        COUNTS["Load PSD node: any name (hypothesis)"]["refused"] += 1
        return
    real_input = os.path.realpath(folders / "input")
    assert os.path.commonpath([real_input, path]) == real_input and os.path.isfile(path), (name, path)
    COUNTS["Load PSD node: any name (hypothesis)"]["inside"] += 1


# ---------------------------------------------------------------------------- the command line
def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of ``python -m layerdiff ARGS`` under the limits;
    a negative exit code is the signal that ended it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    out, err = cwd.parent / f"{cwd.name}-stdout.txt", cwd.parent / f"{cwd.name}-stderr.txt"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "layerdiff", *args], cwd=cwd, env=env, stdout=fo, stderr=fe,
                                stdin=subprocess.DEVNULL, preexec_fn=_limit_memory)
        timer = threading.Timer(180, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    code = os.waitstatus_to_exitcode(status)
    return code, out.read_text("utf-8", "replace"), err.read_text("utf-8", "replace"), usage.ru_maxrss * 1024


@pytest.mark.slow
def test_command_line_writes_unicode_layer_names(tmp_path):
    """generate with layer prompts in Cyrillic, CJK, Arabic, emoji: the PSD is written (it crashed
    after the PNGs), and its names equal meta.json's; nothing outside --out changes."""
    sentinel = tmp_path / "keep.txt"
    sentinel.write_text("untouched")
    layers = ["кирпичная стена", "赤い星 🌟 نجمة", "café 👨‍👩‍👧 नमस्ते"]
    args = ["generate", "--model", "tiny", "--steps", "1", "--prompt", "звезда 星", "--out", str(tmp_path / "o")]
    for layer in layers:
        args += ["--layer", layer]
    code, out, err, rss = run_cli(args, tmp_path)
    PEAK_RSS["command line: Unicode layer names"] = rss
    assert code == 0, err
    assert "Traceback" not in err
    meta = json.loads((tmp_path / "o" / "meta.json").read_text("utf-8"))
    names = load_psd(tmp_path / "o" / "layers.psd").names
    assert names == tuple(layer["name"] for layer in meta["layers"])
    assert [n.split(": ", 1)[1] for n in names] == layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "o"] and sentinel.read_text() == "untouched"
    COUNTS["command line: Unicode layer names"]["written"] += 1



# ---------------------------------------------------------------------------- a real ComfyUI
def _psd_graph(name: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "LayerDiffLoadPSD", "inputs": {"psd": name}},
        "2": {"class_type": "LayerDiffSavePSD", "inputs": {"layers": ["1", 0], "filename_prefix": prefix}},
    }


@pytest.mark.comfyui
@pytest.mark.slow
def test_real_comfyui_refuses_names_outside_input_and_hostile_files_then_loads_a_good_one(tmp_path, good):
    """Through ComfyUI's own /prompt: names leading out of the input folder fail validation, a
    hostile file in it fails that prompt with one line, Unicode layer names survive Load -> Save,
    and the same server then runs a good prompt."""
    import urllib.error
    import urllib.request

    from comfy_private import host_skip_reason, private_server

    reason = host_skip_reason("diffusers, psd_tools, einops")
    if reason:
        pytest.skip(reason)

    def http(url, body=None):
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def run(srv, graph):
        status, answer = http(f"{srv['url']}/prompt", {"prompt": graph})
        if status != 200:
            return "refused", json.dumps(answer)
        pid = answer["prompt_id"]
        for _ in range(1200):
            _, history = http(f"{srv['url']}/history/{pid}")
            entry = (history or {}).get(pid)
            if entry and entry["status"].get("completed") is not None:
                errors = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"]
                return ("error", errors[0]["exception_message"]) if errors else ("success", entry)
            time.sleep(0.1)
        raise AssertionError("the prompt did not finish")

    base = tmp_path / "base"
    base.mkdir()
    with private_server(base, "LayerDiffLoadPSD") as srv:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.psd").write_bytes(good)
        (base / "input" / "link.psd").symlink_to(outside / "secret.psd")
        (base / "output").mkdir(exist_ok=True)
        (base / "output" / "made.psd").write_bytes(good)
        hostile_names = [str(outside / "secret.psd"), "../../outside/secret.psd", "link.psd",
                         "made.psd [output]", "../outside/secret.psd [input]", "nope.psd"]
        for name in hostile_names:
            verdict, detail = run(srv, _psd_graph(name, "never"))
            assert verdict == "refused" and "input folder" in detail, (name, verdict, detail[:300])
            COUNTS["real ComfyUI: names outside input"]["refused"] += 1
        (base / "input" / "huge.psd").write_bytes(_header(good, 30000, 30000))
        (base / "input" / "cut.psd").write_bytes(good[:200])
        for name, expected in (("huge.psd", "scale the document down"), ("cut.psd", "cannot read")):
            verdict, detail = run(srv, _psd_graph(name, "never"))
            assert verdict == "error" and expected in detail and "\n" not in detail.strip(), (name, detail)
            COUNTS["real ComfyUI: hostile files"]["error, one line"] += 1
        assert not (base / "output" / "never").exists()
        names = ("фон: кирпичная стена", "layer 1: 赤い星 🌟", "layer 2: نجمة")
        save_psd(small_stack(names), base / "input" / "scripts.psd")
        verdict, entry = run(srv, _psd_graph("scripts.psd [input]", "уни/кад"))
        assert verdict == "success", entry
        saved = entry["outputs"]["2"]["psd"][0]
        assert load_psd(base / "output" / saved["subfolder"] / saved["filename"]).names == names
        COUNTS["real ComfyUI: good prompt after the hostile ones"]["success"] += 1
