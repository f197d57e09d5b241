"""The shipped example workflows on a real ComfyUI server: listed by the template browser, converted
from the UI format (tools/workflow_format.to_api against the server's own /object_info, checked
against the frontend's graphToPrompt when Chromium is there), queued, and their files checked
(composites, transparent layer PNGs, PSDs). Each run is timed from a cold cache.

The server is private (tests/comfy_private.py through tools/comfy_run.py): its own base directory
with only this pack, a free loopback port, COMFY_EXTRA_ARGS appended; started and stopped by this
module. Needs a ComfyUI checkout with its venv (COMFYUI_DIR / COMFY_VENV, default
~/.cache/comfyui-host/ComfyUI and the venv beside it); skipped otherwise, and when the built-in
layerdiff-toy weights are not installed. Run with ``pytest -m comfyui tests/test_workflows_comfyui.py -s``
to see the timings.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import comfy_run as cr  # noqa: E402
import workflow_format as wf  # noqa: E402

FILES = {p.stem: p for p in wf.workflow_files(cr.WORKFLOWS)}
# Workflows on the user's own model files run in tests/test_comfyui_models.py, which makes random ones.
AS_SHIPPED = {k: p for k, p in FILES.items() if not any(n["type"] == "LayerDiffApplyModel" for n in wf.load(p)["nodes"])}
SNAPSHOT = json.loads((REPO / "tests" / "data" / "comfyui_core_nodes.json").read_text())
TIMINGS: dict[str, float] = {}


def _skip_reason() -> str | None:
    reason = cr.host_skip_reason()
    if reason:
        return reason
    from layerdiff.io.checkpoint import builtin_names

    if "layerdiff-toy" not in builtin_names():
        return "the built-in layerdiff-toy weights are not installed (layerdiff/weights/layerdiff-toy.safetensors)"
    return None


_reason = _skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cr.private_server(tmp_path_factory.mktemp("comfy_base")) as srv:
        srv.run_id = cr.new_run_id("layerdiff_wf_test")
        try:
            with cr.ExampleInputs(srv.folders()["input"]):
                yield srv
        finally:
            if TIMINGS:
                print("workflow run times (cold cache, model load included):")
                for name, seconds in TIMINGS.items():
                    print(f"  {name:32s} {seconds:6.1f} s")


def test_snapshot_of_core_nodes_matches_the_server(server):
    """tests/data/comfyui_core_nodes.json is what this ComfyUI says (else: tools/build_workflows.py)."""
    live = server.definitions()
    for name, snap in SNAPSHOT["nodes"].items():
        assert name in live, f"core node {name} is gone from ComfyUI {cr.comfyui_version()}"
        now = wf.without_machine_choices(name, live[name])
        for key in ("input", "input_order", "output", "output_name"):
            assert now.get(key) == snap.get(key), f"{name}.{key} changed: refresh the snapshot"


def test_template_browser_lists_every_workflow_with_its_thumbnail(server):
    status, listing = server.http("GET", "/workflow_templates")
    assert status == 200
    module = cr.PACK  # the pack's folder name under custom_nodes/
    assert sorted(listing.get(module, [])) == sorted(FILES)
    for name, path in FILES.items():
        link = f"/api/workflow_templates/{urllib.parse.quote(module)}/{urllib.parse.quote(name)}"  # as the frontend asks
        status, body = server.get_bytes(f"{link}.json")
        assert status == 200 and json.loads(body) == wf.load(path)
        status, body = server.get_bytes(f"{link}.jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff"


def test_our_conversion_is_the_frontends(server):
    why = cr.frontend_available()
    if why:
        pytest.skip(why)
    frontend = cr.frontend_prompts(server.port, FILES)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    for name, path in FILES.items():
        assert not frontend[name]["missing"] and not frontend[name]["errors"], (name, frontend[name])
        assert strip(wf.to_api(wf.load(path), server.definitions())) == strip(frontend[name]["api"]), name


@pytest.mark.parametrize("name", list(AS_SHIPPED))
def test_workflow_runs_as_shipped_and_writes_its_files(server, name):
    workflow = wf.load(FILES[name])
    entry, seconds, prompt = server.run_workflow(FILES[name], server.run_id)
    TIMINGS[name] = seconds
    print(f"{name}: {seconds:.1f}s")
    assert entry["status"]["status_str"] == "success", cr.error_text(entry)
    num_layers = sum(n["type"] == "LayerDiffLayerPrompt" for n in workflow["nodes"])
    links = wf.links_by_id(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    saves = 0
    for node in workflow["nodes"]:
        if node["type"] == "SaveImage":
            saves += 1
            files = server.output_files(entry, str(node["id"]))
            assert files and all(f.is_file() for f in files), (node.get("title"), files)
            source_link = next(s["link"] for s in node["inputs"] if s["name"] == "images")
            origin, slot = links[source_link][0], links[source_link][1]
            source = nodes[origin]["outputs"][slot]["name"]
            images = [np.asarray(Image.open(f)) for f in files]
            if source == "all_layers":  # transparent PNGs, background first
                assert len(images) == num_layers
                assert all(im.shape == (128, 128, 4) for im in images)
                assert images[0][..., 3].min() == 255  # the background is opaque
                assert all(im[..., 3].min() < 255 for im in images[1:])  # the foregrounds are cut out
            else:
                assert len(images) == 1 and images[0].ndim == 3 and images[0].shape[2] == 3
                assert images[0].shape[0] >= 128 and images[0].shape[1] >= 128
        elif node["type"] == "LayerDiffSavePSD":
            saves += 1
            psds = server.output_files(entry, str(node["id"]), "psd")
            assert len(psds) == 1 and psds[0].suffix == ".psd" and psds[0].is_file()
            from layerdiff.io.psd import load_psd

            assert load_psd(psds[0]).num_layers == num_layers
    assert saves
