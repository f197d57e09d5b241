"""Hostile and odd model files (issue 25, class 1): a model file is untrusted input.

Every case starts from a real LayerDiff file of the ``tiny`` preset and changes its safetensors header
or its stored config. The library must refuse with a one-line LayerDiffError naming the file (or load
the file, where the change is a valid one); ``info`` must call valid exactly what loads; the command
line, run in a subprocess under an address-space limit and a timeout, must exit 1 with one line on
stderr, never a traceback or a signal. Set LAYERDIFF_FUZZ_REPORT=1 to print the counts per class
and the largest memory a subprocess reached.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fuzz_support import print_fuzz_report, run_limited_cli

from layerdiff.config import LayerDiffConfig, get_preset
from layerdiff.errors import CheckpointError, LayerDiffError
from layerdiff.io.checkpoint import (
    build_random_model,
    check_layerdiff_file,
    describe_file,
    load_model,
    save_layerdiff,
)

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis: pip install hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 4 * 2**30  # RLIMIT_AS of each command-line run
TIMEOUT_S = 120
POSIX = pytest.mark.skipif(os.name != "posix", reason="sparse files, RLIMIT_AS and wait4 are POSIX")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
PEAK_RSS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print_fuzz_report(COUNTS, PEAK_RSS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


# ---------------------------------------------------------------------------- building files
# Module state rather than fixtures: hypothesis prints every argument of a failing example, and the
# good file's bytes would fill the screen.
_state: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    path = save_layerdiff(build_random_model(get_preset("tiny"), seed=0), folder / "good.safetensors")
    _state.update(folder=folder, good=path.read_bytes())
    yield
    _state.clear()


def folder() -> Path:
    return _state["folder"]


def good() -> bytes:
    """The bytes of a real LayerDiff file (tiny preset, VAE and text encoder included)."""
    return _state["good"]


def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def compose(header: dict | str | bytes, data: bytes) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(header)) + header + data


def with_config(raw: bytes, config: dict | str) -> bytes:
    header, data = split(raw)
    header["__metadata__"]["config"] = config if isinstance(config, str) else json.dumps(config)
    return compose(header, data)


def config_of(raw: bytes) -> dict:
    return json.loads(split(raw)[0]["__metadata__"]["config"])


_serial = iter(range(10**9))


def write(raw: bytes, stem: str = "case") -> Path:
    path = folder() / f"{stem}-{next(_serial)}.safetensors"
    path.write_bytes(raw)
    return path


def outcome(path: Path) -> str:
    """'loaded' or 'refused' by load_model, and the same verdict from info (describe_file); anything
    but a LayerDiffError fails the test."""
    try:
        load_model(str(path))
        loaded = "loaded"
    except LayerDiffError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 1200, message
        assert path.name in message, message
        loaded = "refused"
    try:
        describe_file(path)
        described = "loaded"
    except LayerDiffError:
        described = "refused"
    assert described == loaded, f"info says {described}, load_model {loaded}"
    path.unlink()
    return loaded


# ---------------------------------------------------------------------------- hostile JSON values
NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 10**6, 10**9, 2**31, 2**63, 10**18, -(10**9), 0.5, 1e9, 1e300, -0.0]),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)
JSON_VALUES = st.one_of(
    NUMBERS, st.none(), st.booleans(), st.text(max_size=6),
    st.sampled_from(["4", "1e9", "NaN", "", "inf"]),
    st.lists(NUMBERS, max_size=4), st.just({}), st.dictionaries(st.text(max_size=4), NUMBERS, max_size=2),
)


def leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, (*path, i))
    else:
        yield path, x


def subtrees(x, path=()):
    yield path
    if isinstance(x, dict):
        for k, v in x.items():
            yield from subtrees(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x[:3]):
            yield from subtrees(v, (*path, i))


def set_at(x, path, value):
    if not path:
        return value
    x = copy.deepcopy(x)
    node = x
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return x


TINY = json.loads(get_preset("tiny").to_json())
NUMBER_PATHS = [p for p, v in leaves(TINY) if type(v) in (int, float)]
TREE_PATHS = [p for p in subtrees(TINY) if "words" not in p[:-1]]


# ---------------------------------------------------------------------------- config: numbers
@FUZZ
@given(path=st.sampled_from(NUMBER_PATHS), value=NUMBERS)
def test_config_numbers(path, value):
    """Any number of the stored config replaced: refused, or (a valid value) loaded, never more."""
    config = config_of(good())
    assume(json.dumps(value) != json.dumps(dict(leaves(config))[path]))
    result = outcome(write(with_config(good(), set_at(config, path, value))))
    COUNTS["config numbers (in-process)"][result] += 1


@FUZZ
@given(path=st.sampled_from(NUMBER_PATHS), value=JSON_VALUES.filter(lambda v: type(v) not in (int, float)))
def test_config_numbers_of_the_wrong_type(path, value):
    result = outcome(write(with_config(good(), set_at(config_of(good()), path, value))))
    assert result == "refused"
    COUNTS["config wrong types (in-process)"][result] += 1


# ---------------------------------------------------------------------------- config: shape of the JSON
@FUZZ
@given(path=st.sampled_from(TREE_PATHS), action=st.sampled_from(["replace", "delete", "unknown key"]),
       value=JSON_VALUES, key=st.text(min_size=1, max_size=8))
def test_config_structure(path, action, value, key):
    """A subtree replaced by another kind of value, a key deleted, an unknown key added."""
    config = config_of(good())
    node = config
    for k in path:
        node = node[k]
    if action == "replace":
        assume(json.dumps(value) != json.dumps(node))
        changed = set_at(config, path, value)
    elif action == "delete":
        assume(path and isinstance(path[-1], str))
        changed = copy.deepcopy(config)
        parent = changed
        for k in path[:-1]:
            parent = parent[k]
        del parent[path[-1]]
    else:
        assume(isinstance(node, dict) and key not in node)
        changed = set_at(config, path, {**node, key: value})
    result = outcome(write(with_config(good(), changed)))
    COUNTS["config structure (in-process)"][result] += 1
    if action == "unknown key":
        assert result == "refused"


CONFIG_TEXTS = [
    "", "null", "[]", "[1, 2]", '"tiny"', "4", "{", "{}", "[" * 100_000 + "]" * 100_000,
    '{"name": ' + "[" * 5000 + "]" * 5000 + "}", '{"name": NaN}', '{"max_layers": Infinity}',
    '{"max_layers": 1' + "0" * 5000 + "}", '{"name": "a", "name": "b"}', "\udcff", "{" + " " * 2_000_000 + "}",
]


@pytest.mark.parametrize("index", range(len(CONFIG_TEXTS)))
def test_config_text_that_is_not_a_config(index):
    result = outcome(write(with_config(good(), CONFIG_TEXTS[index])))
    assert result == "refused"
    COUNTS["config text (in-process)"][result] += 1


@FUZZ
@given(text=st.text(max_size=40))
def test_config_random_text(text):
    assert outcome(write(with_config(good(), text))) == "refused"
    COUNTS["config text (in-process)"]["refused"] += 1


ISSUE_EXAMPLES = [  # (path, value, words of the one-line refusal)
    (("tokenizer", "max_length"), 10**9, "tokenizer.max_length = 1000000000 is out of range: use 2..16"),
    (("enhancer_blocks",), 10**6, "enhancer_blocks = 1000000 is out of range: use 0..16"),
    (("max_layers",), 10**6, "max_layers = 1000000 is out of range: use 1..64"),
    (("unet", "block_out_channels", 1), 10**6, "unet.block_out_channels[1] = 1000000 is out of range: use 1..4096"),
    (("text_encoder", "num_hidden_layers"), 10**6, "text_encoder.num_hidden_layers = 1000000 is out of range"),
    (("image_size",), 10**6, "image_size = 1000000 is out of range: use 16..2048"),
    (("image_size",), 100, "image_size = 100 is not a multiple of 16"),
    (("layer_head_dim",), 0, "layer_head_dim = 0 is out of range: use 1..512"),
    (("unet", "attention_head_dim"), 0, "unet.attention_head_dim = 0 is out of range"),
    (("unet", "block_out_channels"), [], "unet.block_out_channels = [] has 0 entries: use 2"),
    (("max_layers",), "4", 'max_layers = "4" must be an integer in 1..64, not a string'),
    (("max_layers",), True, "max_layers = true must be an integer in 1..64, not a boolean"),
    (("max_layers",), 4.0, "max_layers = 4.0 must be an integer in 1..64, not a number"),
    (("unet", "num_class_embeds"), 10**9, "unet.num_class_embeds = 1000000000 is not supported by LayerDiff"),
    (("layers",), 4, 'unknown key "layers" in the config'),
    (("tokenizer", "path"), "/etc/passwd", 'unknown key "path" in tokenizer'),
]


@pytest.mark.parametrize("path, value, words", ISSUE_EXAMPLES)
def test_the_refusal_names_the_field_the_value_and_the_range(path, value, words):
    config = config_of(good())
    if path == ("tokenizer", "path"):
        config["tokenizer"] = {"type": "clip_bpe", "path": value}
        config["text_encoder"].update(vocab_size=49408, max_position_embeddings=77)
    p = write(with_config(good(), set_at(config, path, value)))
    with pytest.raises(CheckpointError) as exc:
        load_model(str(p))
    assert words in str(exc.value) and str(exc.value).startswith(f"{p} has an invalid LayerDiff config: ")
    COUNTS["issue examples (in-process)"]["refused"] += 1


def test_every_preset_and_the_built_in_model_pass_the_schema():
    from layerdiff.config import PRESETS
    from layerdiff.io.checkpoint import BUILTIN_FILES, WEIGHTS_DIR

    for name in PRESETS:
        assert LayerDiffConfig.from_json(get_preset(name).to_json()) == get_preset(name)
    builtin = WEIGHTS_DIR / BUILTIN_FILES["layerdiff-toy"]
    if builtin.is_file():
        assert check_layerdiff_file(builtin)[0].name == "toy"


def test_bounded_json_is_linear_and_refuses_what_json_loads_would_choke_on():
    import time

    from layerdiff.safe_json import parse_json

    start = time.perf_counter()
    for text in ['"' + '\\"' * 1_000_000, "[" * 1_000_000, '"' * 1_000_000]:
        with pytest.raises(ValueError):
            parse_json(text, max_depth=3)
    assert time.perf_counter() - start < 20  # quadratic scanning of the quotes would take hours
    assert parse_json('{"a": [1, "[[[[", {"b": 2.5}]}', max_depth=3) == {"a": [1, "[[[[", {"b": 2.5}]}
    for text, words in [("[[[[1]]]]", "nested deeper"), ('{"a": NaN}', "NaN"), ("1e999", "overflows"),
                        ('{"a": 1, "a": 2}', "twice"), ("1" * 50, "digits")]:
        with pytest.raises(ValueError, match=words):
            parse_json(text, max_depth=3)


# ---------------------------------------------------------------------------- header
HEADER_FIELDS = ["dtype", "shape", "data_offsets", "whole entry", "extra key", "drop key", "overlap", "shape order"]


@FUZZ
@given(data=st.data(), field=st.sampled_from(HEADER_FIELDS), value=JSON_VALUES)
def test_header_entries(data, field, value):
    """One tensor entry of the header changed: null/string/float/negative offsets or shapes, overlapping
    offsets, unknown dtypes, a dtype or shape of the right size for another tensor."""
    header, body = split(good())
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    before = json.dumps(header, sort_keys=True)
    if field in ("dtype", "shape", "data_offsets"):
        entry[field] = value
    elif field == "whole entry":
        header[name] = value
    elif field == "extra key":
        entry["x"] = value
    elif field == "drop key":
        del entry[data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif field == "overlap":
        other = header[data.draw(st.sampled_from(names))]
        shift = data.draw(st.integers(-64, 64))
        begin = other["data_offsets"][0] + shift
        entry["data_offsets"] = [begin, begin + entry["data_offsets"][1] - entry["data_offsets"][0]]
    else:  # same bytes, other shape or dtype: a valid safetensors file that no longer matches the config
        shape = entry["shape"]
        assume(len(shape) >= 1)
        entry["shape"] = [math.prod(shape)] if len(shape) > 1 else [1, shape[0]]
        if data.draw(st.booleans()):
            entry["dtype"] = "I32"
    assume(json.dumps(header, sort_keys=True) != before)
    result = outcome(write(compose(header, body)))
    assert result == "refused"
    COUNTS["header entries (in-process)"][result] += 1


@FUZZ
@given(data=st.data(), value=JSON_VALUES)
def test_header_metadata(data, value):
    header, body = split(good())
    where = data.draw(st.sampled_from(["__metadata__", "format", "config", "components"]))
    if where == "__metadata__":
        assume(value is not None)  # null metadata is allowed: then the file is no LayerDiff file
        header["__metadata__"] = value
    else:
        assume(not isinstance(value, str))
        header["__metadata__"][where] = value
    assert outcome(write(compose(header, body))) == "refused"
    COUNTS["header metadata (in-process)"]["refused"] += 1


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 200_000)))
def test_header_length_field(length):
    """The 8-byte header length: past the end of the file, zero, or pointing inside the JSON."""
    assume(length != struct.unpack("<Q", good()[:8])[0])
    assert outcome(write(struct.pack("<Q", length) + good()[8:])) == "refused"
    COUNTS["header length (in-process)"]["refused"] += 1


@FUZZ
@given(data=st.data())
def test_header_bytes(data):
    """Random bytes of the header overwritten: refused, or (a harmless change, such as a digit of the
    description) loaded; never a traceback."""
    n = struct.unpack("<Q", good()[:8])[0]
    raw = bytearray(good())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(8, 8 + n - 1))] = data.draw(st.integers(0, 255))
    assume(bytes(raw) != good())
    result = outcome(write(bytes(raw)))
    COUNTS["header bytes (in-process)"][result] += 1


def _odd_headers(good: bytes) -> dict[str, bytes]:
    header, body = split(good)
    n = struct.unpack("<Q", good[:8])[0]
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    dup = json.dumps(header)[:-1] + f', "{first}": ' + json.dumps(header[first]) + "}"
    gap = copy.deepcopy(header)
    for k, e in gap.items():
        if k != "__metadata__":
            e["data_offsets"] = [o + 4 for o in e["data_offsets"]]
    return {
        "deeply nested JSON": compose("[" * 200_000 + "]" * 200_000, body),
        "nested entry": compose(json.dumps({**header, first: [[[[[[1]]]]]]}), body),
        "JSON list": compose("[1, 2, 3]", body),
        "not UTF-8": compose(b"{\xff\xfe}", body),
        "header longer than the file": struct.pack("<Q", len(good)) + good[8:],
        "header of 2**64-1 bytes": struct.pack("<Q", 2**64 - 1) + good[8:],
        "empty header length": struct.pack("<Q", 0) + good[8:],
        "truncated data": good[: len(good) - 100],
        "trailing bytes": good + b"\x00" * 16,
        "gap before the first tensor": compose(gap, b"\x00" * 4 + body),
        "duplicate tensor name": compose(dup, body),
        "NaN in the header": compose(json.dumps(header)[:-1] + ', "x": NaN}', body),
        "huge integer": compose(json.dumps(header)[:-1] + ', "x": 1' + "0" * 10_000 + "}", body),
        "only the length": good[:8],
        "nothing": b"",
        "header of one byte": struct.pack("<Q", 1) + b"{" + good[8 + n :],
    }


ODD_NAMES = [
    "deeply nested JSON", "nested entry", "JSON list", "not UTF-8", "header longer than the file",
    "header of 2**64-1 bytes", "empty header length", "truncated data", "trailing bytes",
    "gap before the first tensor", "duplicate tensor name", "NaN in the header", "huge integer",
    "only the length", "nothing", "header of one byte",
]


@pytest.mark.parametrize("case", ODD_NAMES)
def test_malformed_headers(case):
    path = write(_odd_headers(good())[case])
    with pytest.raises(CheckpointError) as info:
        check_layerdiff_file(path)
    assert "\n" not in str(info.value) and path.name in str(info.value)
    assert outcome(path) == "refused"
    COUNTS["malformed headers (in-process)"]["refused"] += 1


# ---------------------------------------------------------------------------- consistent but huge
def header_only_file(path: Path, config: LayerDiffConfig, dtype: str = "F16") -> Path:
    """A valid LayerDiff file for ``config`` whose data section is a hole: its full size on paper, nearly
    no disk (the shapes agree with the config, so only the memory check can refuse it)."""
    from layerdiff.io.checkpoint import _expected_tensors, _meta_parts

    expected = _expected_tensors(_meta_parts(config, path))
    entries: dict = {"__metadata__": {"format": "layerdiff", "config": config.to_json(),
                                      "components": "unet,prompt_enhancer,vae,text_encoder"}}
    offset = 0
    for tensors in expected.values():
        for name, shape in tensors.items():
            size = math.prod(shape) * 2
            entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(entries).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def huge_config() -> LayerDiffConfig:
    """Every size near its bound: the schema admits it, no machine of today loads it."""
    d = json.loads(get_preset("tiny").to_json())
    d["unet"].update(block_out_channels=[4096] * 4, down_block_types=["CrossAttnDownBlock2D"] * 4,
                     up_block_types=["CrossAttnUpBlock2D"] * 4, layers_per_block=2, attention_head_dim=8,
                     norm_num_groups=32, cross_attention_dim=4096)
    d["text_encoder"].update(hidden_size=4096, intermediate_size=16384, num_hidden_layers=48,
                             num_attention_heads=64, vocab_size=262_144, max_position_embeddings=512)
    d["image_size"] = 1024
    return LayerDiffConfig.from_dict(d)


def skip_if_the_machine_could_load(need: int) -> None:
    from layerdiff.limits import available_memory

    available = available_memory()
    if available is not None and available > need:
        pytest.skip(f"this machine has {available / 2**30:.0f} GiB available: it could load the huge file")


@POSIX
def test_a_consistent_file_too_large_for_the_machine_is_refused_before_reading():
    path = header_only_file(folder() / "huge.safetensors", huge_config())
    assert path.stat().st_size > 40 * 2**30  # sparse: no disk, no page cache
    info = describe_file(path)  # a valid file: info says what it is and what it needs
    assert info["load_memory_bytes"] > 100 * 2**30
    skip_if_the_machine_could_load(info["load_memory_bytes"])
    with pytest.raises(CheckpointError, match=r"needs about .* GiB of memory to load as float32") as exc:
        load_model(str(path))
    assert "huge.safetensors" in str(exc.value)
    COUNTS["too large for the machine (in-process)"]["refused"] += 1


# ---------------------------------------------------------------------------- the node
@POSIX
def test_load_layerdiff_node_refuses_hostile_files(tmp_path):
    import nodes
    from nodes import _host

    models = tmp_path / "layerdiff"
    models.mkdir()
    cases = {
        "enhancer.safetensors": with_config(good(), {**config_of(good()), "enhancer_blocks": 10**6}),
        "tokens.safetensors": with_config(good(), set_at(config_of(good()), ("tokenizer", "max_length"), 10**9)),
        "list.safetensors": with_config(good(), "[1, 2]"),
        "nested.safetensors": _odd_headers(good())["deeply nested JSON"],
        "offsets.safetensors": _odd_headers(good())["gap before the first tensor"],
    }
    huge = header_only_file(models / "huge.safetensors", huge_config())
    skip_if_the_machine_could_load(describe_file(huge)["load_memory_bytes"])
    _host.set_fallback_folder("layerdiff", models)
    try:
        loader = nodes.NODE_CLASS_MAPPINGS["LayerDiffLoader"]
        for name in [*cases, "huge.safetensors"]:
            if name in cases:
                (models / name).write_bytes(cases[name])
            assert loader.VALIDATE_INPUTS(name) is True
            with pytest.raises(CheckpointError) as exc:
                loader().load(name, "none", "fp32", "cpu")
            assert name in str(exc.value) and "\n" not in str(exc.value)
            COUNTS["node Load LayerDiff"]["refused"] += 1
    finally:
        _host.set_fallback_folder("layerdiff", None)


# ---------------------------------------------------------------------------- the command line
def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of ``python -m layerdiff ARGS`` under the limits."""
    return run_limited_cli(args, cwd, MEMORY_LIMIT, TIMEOUT_S)[:4]


def _cli_cases(good: bytes, folder: Path) -> dict[str, Path]:
    config = config_of(good)
    odd = _odd_headers(good)
    header, body = split(good)
    name = sorted(k for k in header if k.startswith("unet."))[0]

    def entry(field, value):
        h = copy.deepcopy(header)
        h[name][field] = value
        return compose(h, body)

    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(400_000)}
    many["__metadata__"] = {"format": "layerdiff", "config": json.dumps(config)}
    raw = {
        "tokenizer max length 1e9": with_config(good, set_at(config, ("tokenizer", "max_length"), 10**9)),
        "a million enhancer blocks": with_config(good, {**config, "enhancer_blocks": 10**6}),
        "huge layer count": with_config(good, {**config, "max_layers": 10**7}),
        "huge widths": with_config(good, set_at(config, ("unet", "block_out_channels"), [2**20, 2**21])),
        "huge image size": with_config(good, {**config, "image_size": 2**24}),
        "config is a list": with_config(good, "[1, 2]"),
        "string where a number belongs": with_config(good, set_at(config, ("text_encoder", "hidden_size"), "32")),
        "zero head dim": with_config(good, {**config, "layer_head_dim": 0}),
        "empty block list": with_config(good, set_at(config, ("unet", "block_out_channels"), [])),
        "unknown key": with_config(good, {**config, "layers": 4}),
        "null data offsets": entry("data_offsets", None),
        "string data offsets": entry("data_offsets", "0-16"),
        "negative shape": entry("shape", [-4, 8]),
        "float shape": entry("shape", [4.0, 8.0]),
        "overlapping offsets": odd["duplicate tensor name"],
        "deeply nested JSON": odd["deeply nested JSON"],
        "header longer than the file": odd["header longer than the file"],
        "400k tensors and no UNet": compose(many, b""),
    }
    paths = {k: write(v, stem=k.replace(" ", "_")) for k, v in raw.items()}
    paths["too large for the machine"] = header_only_file(folder / "too_large.safetensors", huge_config())
    return paths


GENERATE_CASES = ["tokenizer max length 1e9", "a million enhancer blocks", "config is a list", "zero head dim",
                  "null data offsets", "overlapping offsets", "deeply nested JSON", "header longer than the file",
                  "400k tensors and no UNet", "too large for the machine"]


@POSIX
@pytest.mark.slow
def test_command_line_on_hostile_files(tmp_path):
    """info and generate on each hostile file: exit 1, one line on stderr naming the file, no traceback,
    no signal, nothing written; the good file passes under the same limits."""
    cases = _cli_cases(good(), folder())
    good_path = write(good(), stem="good")

    def generate(path: Path, out: str) -> list[str]:
        return ["generate", "--model", str(path), "--steps", "1", "--prompt", "a red star", "--layer", "sky",
                "--layer", "red star", "--no-psd", "--out", str(tmp_path / out)]

    # info on every case; generate (which imports more) on one case of each kind
    runs = [(case, "info", ["info", str(path)]) for case, path in cases.items() if case != "too large for the machine"]
    runs += [(case, "generate", generate(cases[case], f"out-{i}")) for i, case in enumerate(GENERATE_CASES)]
    runs += [("good file", "info", ["info", str(good_path)]), ("good file", "generate", generate(good_path, "good"))]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: (r, run_cli(r[2], tmp_path)), runs))
    failures = []
    for (case, command, args), (code, out, err, rss) in results:
        PEAK_RSS[f"{command}: {case}"] = rss
        if case == "good file":
            if code != 0:
                failures.append(f"{command} on the good file: exit {code}: {err[-500:]}")
            continue
        lines = err.strip().splitlines()
        clean = (code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out + err
                 and Path(args[1] if command == "info" else args[2]).name in err)
        if command == "generate":
            clean = clean and not Path(args[-1]).exists()
        COUNTS[f"command line {command}"]["clean" if clean else "NOT CLEAN"] += 1
        if not clean:
            failures.append(f"{command} on {case}: exit {code}, stderr {err[-800:]!r}")
    assert not failures, "\n".join(failures)
    assert max(PEAK_RSS.values()) < MEMORY_LIMIT
