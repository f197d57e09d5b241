"""Hostile sizes, numbers and types (issue 25, classes 2 and 6).

One table of ranges (layerdiff.limits.RANGES) is checked by the library entry points, the node
widgets and VALIDATE_INPUTS, and the command line. Every case here gives a value outside it, or of
the wrong type, and expects a one-line LayerDiffError naming the argument before any work starts:
in-process for the library (the ``tiny`` model) and the nodes, and in a subprocess under an
address-space limit and a timeout for the command line (exit code non-zero, one line on stderr, no
traceback, no signal, nothing written). Set LAYERDIFF_FUZZ_REPORT=1 to print the counts per class
and the largest memory a command-line run reached.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_support import print_fuzz_report, run_limited_cli

import nodes
from layerdiff import limits
from layerdiff.conditioning import LayerPrompts, encode_prompts
from layerdiff.edit import edit_layer, inpaint_layer, style_layers, transform_layer
from layerdiff.errors import LayerDiffError
from layerdiff.io.checkpoint import load_model
from layerdiff.io.export import write_layer_sets
from layerdiff.limits import RANGES
from layerdiff.pipeline import generate, run
from layerdiff.sampling import sample
from layerdiff.settings import SamplerSettings

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NODES = nodes.NODE_CLASS_MAPPINGS
MEMORY_LIMIT = 4 * 2**30  # RLIMIT_AS of each command-line run
TIMEOUT_S = 120
QUICK_S = 5.0  # a refused call returns long before any sampling could finish
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])
PROMPTS = LayerPrompts("a red star in front of a brick wall", ("a brick wall", "a red star"))

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
PEAK_RSS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print_fuzz_report(COUNTS, PEAK_RSS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


SETTING_NAMES = {f.name for f in dataclasses.fields(SamplerSettings)}


def gen(model, prompts, **kw):
    """generate() (run() for ``strength``) with the sampler's settings as keywords, as the nodes and the
    command line take them: the settings object is made inside the call."""
    settings = SamplerSettings(**{k: kw.pop(k) for k in list(kw) if k in SETTING_NAMES})
    if "strength" in kw:
        return run(model, prompts, settings, seeds=[kw.pop("seed", 0)], **kw)
    return generate(model, prompts, settings, **kw)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


@pytest.fixture(scope="module")
def stack(model):
    return generate(model, PROMPTS, SamplerSettings(steps=1), width=32, height=32)


@pytest.fixture(scope="module")
def cond(model):
    return encode_prompts(model, PROMPTS)


# ---------------------------------------------------------------------------- what is allowed
def allowed(key: str, value, optional: bool = False) -> bool:
    """The specification the checks implement: the right type, finite, inside RANGES[key]."""
    if value is None:
        return optional
    r = RANGES[key]
    if isinstance(value, (bool, np.bool_)):
        return False
    if r.integer:
        if not isinstance(value, numbers.Integral):
            return False
        v = int(value)
    else:
        if not isinstance(value, numbers.Real):
            return False
        try:
            v = float(value)
        except OverflowError:
            return False
        if not math.isfinite(v):
            return False
    if key in ("width", "height") and v % limits.SIZE_MULTIPLE:
        return False
    return r.low <= v <= r.high and not (r.below_high and v >= r.high)


# Numbers of every kind and size, and things that are not numbers at all.
HOSTILE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 30.0001, 1.0000001]),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([2**64, 2**64 + 7, -1, -(2**63), 10**30, 10**5000, 0, 4095, 4104, 100000, 65536]),
    st.booleans(),
    st.sampled_from(["5", "nan", "1e3", "", "0x10", b"7", None, [1], (2.0,), {"v": 1}, 1 + 2j]),
    st.sampled_from([np.float64("nan"), np.float32(1e30), np.int64(-1), np.int64(2**62), np.bool_(True),
                     np.float16(-1)]),
)


def refused(call, name: str, clazz: str, expect_text: str | None = None) -> str:
    """Run ``call``; it must raise a one-line LayerDiffError that names ``name``, quickly."""
    t0 = time.perf_counter()
    with pytest.raises(LayerDiffError) as info:
        call()
    seconds = time.perf_counter() - t0
    message = str(info.value)
    clean = name in message and "\n" not in message and seconds < QUICK_S
    clean = clean and (expect_text is None or expect_text in message)
    COUNTS[clazz]["clean" if clean else "NOT CLEAN"] += 1
    assert clean, (name, message, seconds)
    return message


def never_called(step, total, preview):
    raise AssertionError("sampling started for a refused argument")


# ---------------------------------------------------------------------------- the table itself
def test_ranges_are_consistent():
    assert RANGES["seed"].high == 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widget maximum
    assert limits.SIZE_MAX <= limits.PSD_SIDE_MAX and limits.SIZE_MAX % limits.SIZE_MULTIPLE == 0
    for key, r in RANGES.items():
        assert r.low < r.high and allowed(key, r.low), key
    assert limits.batch_seeds(2**64 - 1, 3) == [2**64 - 1, 0, 1]


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_refuses_its_edges(key):
    r = RANGES[key]
    step = 1 if r.integer else 1e-6 * max(1.0, abs(r.high))
    for bad in (r.low - step, r.high + step, math.nan, math.inf, -math.inf, True, "1", None):
        if r.integer and isinstance(bad, float) and math.isfinite(bad):
            bad = int(bad)
        refused(lambda b=bad: limits.check_number(b, key), key, "library: class 2 numbers (edges)")
    limits.check_number(r.low, key)
    if not r.below_high:
        limits.check_number(r.high, key)
    limits.check_number(np.int64(r.low) if r.integer else np.float32(r.low), key)  # numpy scalars are fine


# ---------------------------------------------------------------------------- library: numbers
GENERATE_ARGS = [  # (argument, RANGES key, None allowed)
    ("width", "width", True), ("height", "height", True), ("seed", "seed", False), ("batch", "batch", False),
    ("steps", "steps", True), ("cfg", "cfg", True), ("mask_guidance", "mask_guidance", True),
    ("mask_guidance_start", "mask_guidance_start", True), ("background_cfg", "background_cfg", True),
    ("layout_cleanup", "layout_cleanup", True), ("strength", "strength", False),
    ("empty_layer_retries", "empty_layer_retries", True),
]


@pytest.mark.parametrize("arg, key, optional", GENERATE_ARGS, ids=[a[0] for a in GENERATE_ARGS])
@FUZZ
@given(value=HOSTILE)
def test_generate_refuses_hostile_numbers(model, arg, key, optional, value):
    assume(not allowed(key, value, optional))
    kwargs = {"width": 16, "height": 16, "steps": 1, "callback": never_called, arg: value}
    refused(lambda: gen(model, PROMPTS, **kwargs), arg, "library: class 2 numbers")


SAMPLE_ARGS = [("steps", "steps"), ("cfg", "cfg"), ("mask_guidance", "mask_guidance"),
               ("mask_guidance_start", "mask_guidance_start"), ("mask_guidance_blur", "mask_guidance_blur"),
               ("mask_guidance_erode", "mask_guidance_erode"), ("layout_cleanup", "layout_cleanup"),
               ("layout_cleanup_start", "layout_cleanup_start"), ("strength", "strength"), ("eta", "eta"),
               ("empty_layer_retries", "empty_layer_retries"), ("empty_layer_check", "empty_layer_check")]


@pytest.mark.parametrize("arg, key", SAMPLE_ARGS, ids=[a[0] for a in SAMPLE_ARGS])
@FUZZ
@given(value=HOSTILE)
def test_sample_refuses_hostile_numbers(model, cond, arg, key, value):
    assume(not allowed(key, value, optional=arg in SETTING_NAMES))  # None in the settings: the default
    def call():
        knobs = {"steps": 1, **({arg: value} if arg in SETTING_NAMES else {})}
        extra = {} if arg in SETTING_NAMES else {arg: value}
        return sample(model.unet, cond, 2, 2, [0], SamplerSettings(**knobs), mask_axis=model.mask_axis(),
                      empty_latent=model.empty_layer_latent(), callback=never_called, **extra)

    refused(call, arg, "library: class 2 numbers")


@FUZZ
@given(seed=HOSTILE)
def test_sample_refuses_hostile_seeds(model, cond, seed):
    assume(not allowed("seed", seed))
    refused(lambda: sample(model.unet, cond, 2, 2, [seed], SamplerSettings(steps=1), callback=never_called), "seeds[0]",
            "library: class 2 numbers")


EDIT_ARGS = [  # (function, argument, RANGES key, None allowed)
    ("edit_layer", "seed", "seed", False), ("edit_layer", "index", "layer_index", False),
    ("inpaint_layer", "grow", "grow", False), ("style_layers", "strength", "strength", False),
    ("transform_layer", "dx", "dx", False), ("transform_layer", "dy", "dy", False),
    ("transform_layer", "scale", "scale", False), ("transform_layer", "move_to", "move_to", True),
    ("transform_layer", "harmonize", "harmonize", False), ("transform_layer", "seed", "seed", False),
]


def _edit_call(model, stack, function, arg, value):
    region = torch.ones(32, 32)
    base = {
        "edit_layer": lambda **k: edit_layer(model, stack, **{"index": 1, "prompt": "a green heart", **k}),
        "inpaint_layer": lambda **k: inpaint_layer(model, stack, 1, region, "a green heart", **k),
        "style_layers": lambda **k: style_layers(model, stack, "watercolor style", **k),
        "transform_layer": lambda **k: transform_layer(stack, **{"index": 1, "model": model, **k}),
    }[function]
    return lambda: base(**{arg: value}, callback=never_called)


@pytest.mark.parametrize("function, arg, key, optional", EDIT_ARGS, ids=[f"{a[0]}-{a[1]}" for a in EDIT_ARGS])
@FUZZ
@given(value=HOSTILE)
def test_edits_refuse_hostile_numbers(model, stack, function, arg, key, optional, value):
    assume(not allowed(key, value, optional))
    if arg == "index":
        assume(not (isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
                    and 0 <= int(value) < stack.num_layers))
    name = "layer_index" if arg == "index" else arg
    refused(_edit_call(model, stack, function, arg, value), name, "library: class 2 numbers")


SETTINGS_ARGS = ["steps", "cfg", "background_cfg", "mask_guidance", "mask_guidance_start", "layout_cleanup"]


@pytest.mark.parametrize("arg", SETTINGS_ARGS)
@FUZZ
@given(value=HOSTILE)
def test_sampler_settings_refuse_hostile_numbers(arg, value):
    assume(not allowed(arg, value, optional=True))
    refused(lambda: SamplerSettings(**{arg: value}), arg, "library: class 2 numbers")


def test_sizes_beyond_one_run_and_the_machine_are_refused_before_sampling(model, stack, monkeypatch):
    many = LayerPrompts("a scene", tuple(f"thing {i}" for i in range(4)))
    refused(lambda: generate(model, many, width=4096, height=4096, batch=5, callback=never_called), "4096x4096",
            "library: class 2 numbers", "more than one run")
    monkeypatch.setattr(limits, "available_bytes", lambda device: 2**10)  # a machine with 1 KiB free
    for call in (lambda: generate(model, PROMPTS, width=64, height=64, batch=4, callback=never_called),
                 lambda: edit_layer(model, stack, 1, "a green heart", callback=never_called),
                 lambda: sample(model.unet, encode_prompts(model, PROMPTS), 8, 8, [0], SamplerSettings(steps=1),
                                callback=never_called)):
        refused(call, "needs about", "library: class 2 numbers", "is free")


def test_seeds_up_to_2_to_the_64_run_and_wrap_in_a_batch(model):
    top = gen(model, PROMPTS, width=16, height=16, steps=1, seed=2**64 - 1, batch=2, empty_layer_retries=1)
    again = gen(model, PROMPTS, width=16, height=16, steps=1, seed=0)
    torch.testing.assert_close(top.latents[1], again.latents[0], atol=1e-4, rtol=1e-4)  # seed 2**64 - 1 + 1 is 0
    ok = gen(model, PROMPTS, width=np.int64(16), height=np.int32(16), steps=np.int64(1), seed=np.uint64(3),
                  cfg=np.float32(2.5))  # numpy scalars are numbers
    assert ok.images.shape[2:4] == (16, 16)


def test_steps_zero_is_refused_not_the_default(model):
    refused(lambda: gen(model, PROMPTS, width=16, height=16, steps=0, callback=never_called), "steps 0",
            "library: class 2 numbers", "outside 1..500")


# ---------------------------------------------------------------------------- library: types (class 6)
def _type_cases(model, stack, cond, tmp):
    fine = {"width": 16, "height": 16, "steps": 1, "callback": never_called}
    return [
        ("layers", lambda: LayerPrompts("x", "abc")),
        ("layers[1]", lambda: LayerPrompts("x", ("a", 5))),
        ("global_prompt", lambda: LayerPrompts(None, ("a",))),
        ("negative", lambda: LayerPrompts("x", ("a",), negative=["no"])),
        ("names", lambda: LayerPrompts("x", ("a",), names="bg")),
        ("layers", lambda: LayerPrompts("x", 7)),
        ("prompts", lambda: gen(model, "a red star", **fine)),
        ("prompts", lambda: gen(model, [PROMPTS], **fine)),
        ("model", lambda: gen("tiny", PROMPTS, **fine)),
        ("steps", lambda: gen(model, PROMPTS, **{**fine, "steps": 2.0})),
        ("steps", lambda: gen(model, PROMPTS, **{**fine, "steps": "2"})),
        ("width", lambda: gen(model, PROMPTS, **{**fine, "width": "16"})),
        ("cfg", lambda: gen(model, PROMPTS, **{**fine, "cfg": "7.5"})),
        ("seed", lambda: gen(model, PROMPTS, **{**fine, "seed": 1.0})),
        ("batch", lambda: gen(model, PROMPTS, **{**fine, "batch": True})),
        ("scheduler", lambda: gen(model, PROMPTS, **{**fine, "scheduler": 5})),
        ("scheduler", lambda: gen(model, PROMPTS, **{**fine, "scheduler": ["ddim"]})),
        ("callback", lambda: gen(model, PROMPTS, **{**fine, "callback": 5})),
        ("prompts", lambda: run(model, "cond", seeds=[0], callback=never_called)),
        ("settings", lambda: generate(model, PROMPTS, {"steps": 1})),
        ("seeds", lambda: run(model, PROMPTS, seeds=5)),
        ("prompts", lambda: encode_prompts(model, "abc")),
        ("prompts", lambda: encode_prompts(model, ["abc"])),
        ("prompts", lambda: encode_prompts(model, [])),
        ("model", lambda: encode_prompts(None, PROMPTS)),
        ("cond", lambda: sample(model.unet, None, 2, 2, [0], SamplerSettings(steps=1))),
        ("seeds", lambda: sample(model.unet, cond, 2, 2, "0", SamplerSettings(steps=1))),
        ("seeds[0]", lambda: sample(model.unet, cond, 2, 2, [0.5], SamplerSettings(steps=1))),
        ("height", lambda: sample(model.unet, cond, 2.0, 2, [0], SamplerSettings(steps=1))),
        ("width", lambda: sample(model.unet, cond, 2, 10**9, [0], SamplerSettings(steps=1))),
        ("steps", lambda: sample(model.unet, cond, 2, 2, [0], SamplerSettings(steps=1.5))),
        ("lock", lambda: sample(model.unet, cond, 2, 2, [0], SamplerSettings(steps=1), lock="keep")),
        ("init_latents", lambda: sample(model.unet, cond, 2, 2, [0], SamplerSettings(steps=1), init_latents=[0.0])),
        ("scheduler_config", lambda: sample(model.unet, cond, 2, 2, [0], SamplerSettings(steps=1), scheduler_config="ddim")),
        ("max_batch", lambda: sample(model.unet, cond, 2, 2, [0], SamplerSettings(steps=1), max_batch=0)),
        ("seed", lambda: edit_layer(model, stack, 1, "x", seed="1", callback=never_called)),
        ("layer_index", lambda: edit_layer(model, stack, 1.0, "x", callback=never_called)),
        ("regenerate", lambda: edit_layer(model, stack, 1, "x", regenerate=["image only"], callback=never_called)),
        ("global_prompt", lambda: edit_layer(model, stack, 1, "x", global_prompt=5, callback=never_called)),
        ("settings", lambda: edit_layer(model, stack, 1, "x", settings={"steps": 1}, callback=never_called)),
        ("callback", lambda: edit_layer(model, stack, 1, "x", callback="print")),
        ("model", lambda: edit_layer("tiny", stack, 1, "x")),
        ("steps", lambda: SamplerSettings(steps="5")),
        ("scheduler", lambda: SamplerSettings(scheduler="fastest")),
        ("negative_prompt", lambda: edit_layer(model, stack, 1, "x", negative_prompt=None, callback=never_called)),
        ("settings", lambda: sample(model.unet, cond, 2, 2, [0], {"steps": 1})),
        ("grow", lambda: inpaint_layer(model, stack, 1, torch.ones(32, 32), "x", grow=1.5, callback=never_called)),
        ("strength", lambda: style_layers(model, stack, "x", "0.5", callback=never_called)),
        ("layers", lambda: style_layers(model, stack, "x", 0.5, layers="12", callback=never_called)),
        ("style", lambda: style_layers(model, stack, None, 0.5, callback=never_called)),
        ("remove", lambda: transform_layer(stack, 1, remove="yes")),
        ("move_to", lambda: transform_layer(stack, 1, move_to=2.0)),
        ("dx", lambda: transform_layer(stack, 1, dx="3")),
        ("device", lambda: load_model("tiny", device="gpu0")),
        ("device", lambda: load_model("tiny", device=5)),
        ("device", lambda: load_model("tiny", device="meta")),
        ("device", lambda: load_model("tiny", device="cuda:99")),
        ("dtype", lambda: load_model("tiny", dtype="int8")),
        ("dtype", lambda: load_model("tiny", dtype=torch.int64)),
        ("dtype", lambda: load_model("tiny", dtype=16)),
        ("base", lambda: load_model("tiny", base=tmp / "missing.safetensors")),
        ("base", lambda: load_model("tiny", base=5)),
        ("overwrite", lambda: write_layer_sets(stack, tmp / "w", overwrite="no")),
        ("psd", lambda: write_layer_sets(stack, tmp / "w", psd=1)),
        ("out_dir", lambda: write_layer_sets(stack, 5)),
        ("meta", lambda: write_layer_sets(stack, tmp / "w", meta=[("seed", 1)])),
    ]


def test_wrong_types_at_the_public_entry_points(model, stack, cond, tmp_path):
    cases = _type_cases(model, stack, cond, tmp_path)
    for name, call in cases:
        refused(call, name, "library: class 6 types")
    assert list(tmp_path.iterdir()) == []  # nothing written by a refused call
    if not torch.cuda.is_available():
        refused(lambda: load_model("tiny", device="cuda"), "device", "library: class 6 types", "use cpu")


def test_layer_prompts_accept_lists_and_keep_tuples():
    p = LayerPrompts("x", ["a", "b"], names=["bg", ""])
    assert p.layers == ("a", "b") and p.names == ("bg", "") and hash(p)
    assert LayerPrompts("x", ("abc",)).layers == ("abc",)


@FUZZ
@given(value=HOSTILE)
def test_layer_prompts_refuse_hostile_layers(value):
    assume(not isinstance(value, (list, tuple)))
    refused(lambda: LayerPrompts("x", value), "layers", "library: class 6 types")


def test_cuda_devices_and_memory_are_checked_against_what_torch_sees(monkeypatch):
    """The CUDA branches without a GPU: a device index beyond the count, and GPU memory from
    mem_get_info plus what torch's cache holds unused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert limits.check_device("cuda:0") == torch.device("cuda", 0)
    refused(lambda: limits.check_device("cuda:3"), "torch sees 1 CUDA device(s)", "library: class 6 types")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert limits.available_bytes("cuda:0") == 4 * 2**30
    refused(lambda: limits.check_memory(5 * 2**30, "cuda:0", "this run"), "this run needs about 5.0 GiB of GPU memory",
            "library: class 2 numbers", "4.0 GiB is free")


def test_load_model_takes_dtype_names_and_devices():
    m = load_model("tiny", device=torch.device("cpu"), dtype="fp32")
    assert m.dtype == torch.float32 and m.device.type == "cpu"


# ---------------------------------------------------------------------------- nodes
NODE_INPUTS = [  # (node, input, RANGES key)
    ("LayerDiffKSampler", "seed", "seed"), ("LayerDiffKSampler", "steps", "steps"),
    ("LayerDiffKSampler", "cfg", "cfg"), ("LayerDiffKSampler", "mask_guidance", "mask_guidance"),
    ("LayerDiffKSampler", "mask_guidance_start", "mask_guidance_start"),
    ("LayerDiffKSampler", "batch_size", "batch"), ("LayerDiffKSampler", "background_cfg", "background_cfg"),
    ("LayerDiffKSampler", "layout_cleanup", "layout_cleanup"), ("LayerDiffKSampler", "width", "width"),
    ("LayerDiffKSampler", "height", "height"),
    ("LayerDiffLayerEdit", "layer_index", "layer_index"), ("LayerDiffLayerEdit", "seed", "seed"),
    ("LayerDiffLayerEdit", "steps", "steps"), ("LayerDiffLayerEdit", "cfg", "cfg"),
    ("LayerDiffLayerInpaint", "layer_index", "layer_index"), ("LayerDiffLayerInpaint", "seed", "seed"),
    ("LayerDiffLayerInpaint", "grow", "grow"), ("LayerDiffLayerInpaint", "steps", "steps"),
    ("LayerDiffLayerInpaint", "cfg", "cfg"),
    ("LayerDiffLayerStyle", "strength", "strength"), ("LayerDiffLayerStyle", "seed", "seed"),
    ("LayerDiffLayerStyle", "steps", "steps"), ("LayerDiffLayerStyle", "cfg", "cfg"),
    ("LayerDiffTransformLayer", "harmonize", "harmonize"), ("LayerDiffTransformLayer", "layer_index", "layer_index"),
    ("LayerDiffTransformLayer", "dx", "dx"), ("LayerDiffTransformLayer", "dy", "dy"),
    ("LayerDiffTransformLayer", "scale", "scale"), ("LayerDiffTransformLayer", "move_to", "move_to"),
    ("LayerDiffTransformLayer", "seed", "seed"),
    ("LayerDiffSplitLayers", "layer_index", "layer_index"),
]
# what ComfyUI hands VALIDATE_INPUTS after its own int()/float() conversion of a widget value
COMFY_INT = st.one_of(st.integers(min_value=-(2**80), max_value=2**80),
                      st.sampled_from([2**64, 2**64 - 1, -1, 0, 4095, 4104, 10**30]))
COMFY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([math.nan, math.inf, -math.inf, -1e308, 1e308, -0.5]))


def _spec(node_name: str, input_name: str):
    types = NODES[node_name].INPUT_TYPES()
    return {**types["required"], **types.get("optional", {})}[input_name]


def _validate(node_name: str, **values):
    cls = NODES[node_name]
    defaults = {"LayerDiffKSampler": {"width": 64, "height": 64}, "LayerDiffLayerStyle": {"strength": 0.5},
                "LayerDiffTransformLayer": {"harmonize": 0.0}}.get(node_name, {})
    if node_name in ("LayerDiffLayerEdit", "LayerDiffLayerInpaint"):
        defaults = {"layer_index": 1, "seed": 0, "steps": 2, "cfg": 7.5, **({"grow": 1} if "Inpaint" in node_name
                                                                          else {})}
    if node_name == "LayerDiffSplitLayers":
        defaults = {"layer_index": 1}
    return cls.VALIDATE_INPUTS(**{**defaults, **values})


def _library_message(name: str, key: str, value) -> str:
    try:
        if key in ("width", "height"):
            limits.check_size(value if key == "width" else 64, value if key == "height" else 64)
        else:
            limits.check_number(value, name, key)
    except LayerDiffError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("node_name, input_name, key", NODE_INPUTS, ids=[f"{n}-{i}" for n, i, _ in NODE_INPUTS])
def test_node_widgets_take_their_ranges_from_the_table(node_name, input_name, key):
    kind, options = _spec(node_name, input_name)
    r = RANGES[key]
    assert kind == ("INT" if r.integer else "FLOAT")
    low = 1 if (node_name, input_name) == ("LayerDiffTransformLayer", "layer_index") else r.low
    assert (options["min"], options["max"]) == (low, r.high)


@pytest.mark.parametrize("node_name, input_name, key", NODE_INPUTS, ids=[f"{n}-{i}" for n, i, _ in NODE_INPUTS])
@FUZZ
@given(data=st.data())
def test_node_validate_inputs_refuses_with_the_library_message(node_name, input_name, key, data):
    kind, _ = _spec(node_name, input_name)
    value = data.draw(COMFY_INT if kind == "INT" else COMFY_FLOAT)
    answer = _validate(node_name, **{input_name: value})
    if allowed(key, value):
        assert answer is True, (value, answer)
        return
    clean = isinstance(answer, str) and answer == _library_message(input_name, key, value) and input_name in answer
    COUNTS["nodes: VALIDATE_INPUTS"]["clean" if clean else "NOT CLEAN"] += 1
    assert clean, (value, answer)


def test_node_validate_inputs_bounds_a_whole_run():
    answer = _validate("LayerDiffKSampler", width=4096, height=4096, batch_size=64)
    assert isinstance(answer, str) and "more than one run" in answer
    COUNTS["nodes: VALIDATE_INPUTS"]["clean"] += 1
    assert _validate("LayerDiffKSampler", width=None, height=None, cfg=None) is True  # linked: checked at run


@pytest.fixture(scope="module")
def node_cond(model):
    chain, _ = NODES["LayerDiffLayerPrompt"]().add("a brick wall")
    chain, _ = NODES["LayerDiffLayerPrompt"]().add("a red star", chain)
    (cond,) = NODES["LayerDiffPromptEnhancer"]().encode(model, chain, "", "")
    return cond


def test_node_functions_refuse_values_that_bypass_validation(model, node_cond, stack):
    """A linked input (a primitive node, another pack's output) skips VALIDATE_INPUTS: the node's call
    must still refuse it, with the same message, instead of returning a black image."""
    ks = NODES["LayerDiffKSampler"]()
    base = (model, node_cond, 0, 2, 3.0, 0.75, 0.25, "ddim", 64, 64, 1)

    def with_(index, value):
        args = list(base)
        args[index] = value
        return lambda: ks.sample(*args)

    cases = [
        ("cfg", with_(4, math.nan)), ("cfg", with_(4, math.inf)), ("seed", with_(2, 2**64)),
        ("seed", with_(2, -1)), ("steps", with_(3, 0)), ("steps", with_(3, 2.5)),
        ("mask_guidance", with_(5, -100.0)), ("mask_guidance_start", with_(6, -0.25)),
        ("width", with_(8, 100000)), ("height", with_(9, 4104)), ("batch", with_(10, 1000)),
        ("background_cfg", lambda: ks.sample(*base, background_cfg=math.nan)),
        ("layout_cleanup", lambda: ks.sample(*base, layout_cleanup=-math.inf)),
        ("steps", lambda: NODES["LayerDiffLayerEdit"]().edit(model, stack, 1, "a green heart", 0, "image and mask",
                                                              0, 7.5, "ddim")),
        ("seed", lambda: NODES["LayerDiffLayerStyle"]().style(model, stack, "x", 0.5, "all", 2**65, 2, 7.5, "ddim")),
        ("scale", lambda: NODES["LayerDiffTransformLayer"]().transform(stack, 1, 0, 0, math.inf, 0, False, 0.0, 0)),
        ("layer_index", lambda: NODES["LayerDiffSplitLayers"]().split(stack, 2**70)),
    ]
    for name, call in cases:
        refused(call, name, "nodes: direct calls")


# ---------------------------------------------------------------------------- the command line
def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of ``python -m layerdiff ARGS`` under the limits."""
    return run_limited_cli(args, cwd, MEMORY_LIMIT, TIMEOUT_S)[:4]


GEN = ["generate", "--model", "tiny", "--prompt", "a red star in front of a brick wall", "--layer", "a brick wall",
       "--layer", "a red star", "--out", "out"]
CLI_CASES = {  # name: (arguments, text the one line must hold)
    "height 100000": (GEN + ["--height", "100000"], "--height 100000 is outside 8..4096"),
    "width 65536 x height 8": (GEN + ["--width", "65536", "--height", "8"], "--width 65536"),
    "batch 1000": (GEN + ["--batch", "1000"], "--batch 1000 is outside 1..64"),
    "seed 2**64": (GEN + ["--seed", str(2**64)], "--seed"),
    "seed -1": (GEN + ["--seed", "-1"], "--seed -1"),
    "seed of 300 digits": (GEN + ["--seed", "9" * 300], "--seed"),
    "device cuda on a CPU build": (GEN + ["--device", "cuda"], "--device"),
    "device gpu0": (GEN + ["--device", "gpu0"], "--device 'gpu0'"),
    "steps 0": (GEN + ["--steps", "0"], "--steps 0 is outside 1..500"),
    "steps 2.5": (GEN + ["--steps", "2.5"], "--steps"),
    "mask guidance -100": (GEN + ["--mask-guidance", "-100"], "--mask-guidance -100.0 is outside 0..5"),
    "mask guidance start -0.5": (GEN + ["--mask-guidance-start", "-0.5"], "--mask-guidance-start"),
    "cfg nan": (GEN + ["--cfg", "nan"], "--cfg nan is not a finite number"),
    "cfg inf": (GEN + ["--cfg", "inf"], "--cfg inf"),
    "cfg 1e999": (GEN + ["--cfg", "1e999"], "--cfg inf"),
    "background cfg -inf": (GEN + ["--background-cfg", "-inf"], "--background-cfg"),
    "empty layer retries a million": (GEN + ["--empty-layer-retries", "1000000"], "--empty-layer-retries"),
    "base names a missing file": (GEN + ["--base", "missing.safetensors"], "--base missing.safetensors"),
    "4096x4096 x 64 images": (GEN + ["--width", "4096", "--height", "4096", "--batch", "64"], "more than one run"),
    # within every range, but about 5 GiB: more than the 4 GiB address-space limit leaves (not the machine's RAM)
    "a run the memory limit cannot hold": (GEN + ["--layer", "a blue circle", "--layer", "a green heart", "--width",
                                                  "2048", "--height", "2048"], "of memory on cpu"),
    "more layers than the model has": (GEN + ["--layer", "a", "--layer", "b", "--layer", "c"], "at most 4 layers"),
    "bench layers 0,99": (["bench", "--preset", "tiny", "--layers", "0,99"], "--layers 0 is outside 1..64"),
    "bench size 100000": (["bench", "--preset", "tiny", "--size", "100000"], "--size 100000"),
    "bench device cuda": (["bench", "--preset", "tiny", "--device", "cuda"], "--device"),
    "bench threads -3": (["bench", "--preset", "tiny", "--threads", "-3"], "--threads -3"),
}


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.slow
def test_command_line_refuses_hostile_numbers_up_front(tmp_path):
    cases = dict(CLI_CASES)
    if torch.cuda.is_available():  # there --device cuda is a valid choice
        cases = {k: v for k, v in cases.items() if "cuda" not in k}
    folders = {}
    for i, name in enumerate(cases):
        folders[name] = tmp_path / f"case-{i}"
        folders[name].mkdir()
    before = _tree(tmp_path)

    def one(item):
        name, (args, _) = item
        return name, run_cli(args, folders[name])

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, cases.items()))
    written = _tree(tmp_path) - before
    failures = []
    for name, (code, out, err, rss) in results.items():
        PEAK_RSS[f"generate: {name}"] = rss
        lines = err.strip().splitlines()
        clean = (code > 0 and len(lines) == 1 and lines[0].startswith("error: ") and cases[name][1] in lines[0]
                 and "Traceback" not in out + err and not any(w.startswith(folders[name].name) for w in written))
        COUNTS["command line"]["clean" if clean else "NOT CLEAN"] += 1
        if not clean:
            failures.append(f"{name}: exit {code}, stderr {err[-600:]!r}")
    assert not failures, "\n".join(failures)
    assert max(PEAK_RSS.values()) < MEMORY_LIMIT


# ---------------------------------------------------------------------------- text that is not Unicode
NOT_UNICODE = ["a red star \udcff", "\udc80", "a \ud800 lone high surrogate", "emoji ok 🌟 then \udfff"]


@pytest.mark.parametrize("text", NOT_UNICODE)
def test_prompts_with_characters_no_tokenizer_reads_are_refused_by_name(text):
    with pytest.raises(LayerDiffError, match=r"global_prompt .* not valid Unicode .* UTF-8"):
        LayerPrompts(text, ("a brick wall", "a red star"))
    with pytest.raises(LayerDiffError, match=r"layers\[1\] .* not valid Unicode"):
        LayerPrompts("a red star", ("a brick wall", text))
    assert LayerPrompts("a red star 🌟 звезда 星", ("a brick wall", "a red star 🌟")).layers[1] == "a red star 🌟"


def test_non_utf8_bytes_on_the_command_line_give_one_line(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "layerdiff", "generate", "--model", "tiny", "--steps", "1", "--prompt",
         b"a red \xff star", "--layer", "a brick wall", "--layer", b"a \xfe star", "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "not valid Unicode" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
