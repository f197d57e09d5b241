"""The node pack inside a real ComfyUI server (CPU, tiny model, few steps).

The server is private (tests/comfy_private.py): its own base directory with only this pack, a free
loopback port, COMFY_EXTRA_ARGS appended, plus ``--preview-method auto`` here; started and stopped by
this module. Needs a ComfyUI checkout with its venv (COMFYUI_DIR / COMFY_VENV, default
~/.cache/comfyui-host/ComfyUI and the venv beside it); skipped otherwise. Run with
``pytest -m comfyui -s`` to see the timings.
"""

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.comfyui

import comfy_private as harness  # noqa: E402

_reason = harness.host_skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

NODES = {
    "LayerDiffLoader": "Load LayerDiff", "LayerDiffLayerPrompt": "Layer Prompt",
    "LayerDiffPromptEnhancer": "Prompt Enhancer", "LayerDiffKSampler": "Layered KSampler",
    "LayerDiffLayerEdit": "Layer Edit", "LayerDiffLayerInpaint": "Layer Inpaint", "LayerDiffLayerStyle": "Layer Style",
    "LayerDiffTransformLayer": "Transform Layer", "LayerDiffCompositeLayers": "Composite Layers",
    "LayerDiffSplitLayers": "Split Layers", "LayerDiffLayersFromImages": "Layers from Images",
    "LayerDiffSavePSD": "Save Layers as PSD", "LayerDiffLoadPSD": "Load PSD as Layers",
    "LayerDiffApplyModel": "Apply LayerDiff to Model",
}


class Server:
    """HTTP client of the private server; ``base`` holds its input/output/temp/models folders."""

    def __init__(self, comfy: harness.PrivateComfyUI):
        self.port, self.url, self.base, self.log = comfy.port, comfy.url, comfy.base, comfy.log

    def http(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, graph: dict) -> str:
        status, answer = self.http("POST", "/prompt", {"prompt": graph, "client_id": "layerdiff-tests"})
        assert status == 200, answer
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            _, history = self.http("GET", f"/history/{prompt_id}")
            if prompt_id in (history or {}) and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, graph: dict) -> tuple[dict, float]:
        t0 = time.time()
        entry = self.wait(self.queue(graph))
        return entry, time.time() - t0

    def files(self, entry: dict, node_id: str, key: str = "images") -> list[Path]:
        """The files a node of a finished prompt wrote (under the server's base directory)."""
        return [self.base / f["type"] / f["subfolder"] / f["filename"] for f in entry["outputs"][node_id][key]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    with harness.private_server(base, "LayerDiffLoader", ["--preview-method", "auto"]) as comfy:  # previews on
        srv = Server(comfy)
        srv.run_id = f"layerdiff_it_{uuid.uuid4().hex[:8]}"
        yield srv


def main_graph(prefix: str, **sampler) -> dict:
    """Load -> Layer Prompt x3 -> Prompt Enhancer -> Layered KSampler -> Layer Edit -> Split/Composite
    -> Save Image (transparent layer PNGs and composites) / Save Layers as PSD."""
    return {
        "1": {"class_type": "LayerDiffLoader",
              "inputs": {"model_name": "tiny", "base_checkpoint": "none", "dtype": "auto", "device": "auto"}},
        "2": {"class_type": "LayerDiffLayerPrompt", "inputs": {"prompt": "a brick wall"}},
        "3": {"class_type": "LayerDiffLayerPrompt", "inputs": {"prompt": "a red star", "previous": ["2", 0]}},
        "4": {"class_type": "LayerDiffLayerPrompt", "inputs": {"prompt": "a blue circle", "previous": ["3", 0]}},
        "5": {"class_type": "LayerDiffPromptEnhancer",
              "inputs": {"model": ["1", 0], "prompts": ["4", 0], "global_prompt": "", "negative_prompt": ""}},
        "6": {"class_type": "LayerDiffKSampler",
              "inputs": {"model": ["1", 0], "conditioning": ["5", 0], "seed": 1, "steps": 3, "cfg": 7.5,
                         "mask_guidance": 0.75, "mask_guidance_start": 0.25, "sampler_name": "ddim",
                         "scheduler": "normal", "width": 64, "height": 64, "batch_size": 2, **sampler}},
        "7": {"class_type": "LayerDiffLayerEdit",
              "inputs": {"model": ["1", 0], "layers": ["6", 0], "layer_index": ["3", 1], "prompt": "a green heart",
                         # an API prompt of an earlier version: one combined "scheduler" input (upgraded on arrival)
                         "seed": 2, "regenerate": "image and mask", "steps": 3, "cfg": 7.5, "scheduler": "ddim"}},
        "8": {"class_type": "LayerDiffSplitLayers", "inputs": {"layers": ["7", 0], "layer_index": 1}},
        "9": {"class_type": "LayerDiffCompositeLayers", "inputs": {"layers": ["7", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": f"{prefix}/layer"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"{prefix}/composite"}},
        "12": {"class_type": "LayerDiffSavePSD", "inputs": {"layers": ["7", 0], "filename_prefix": f"{prefix}/scene"}},
    }


def test_pack_loads_and_every_node_is_listed(server):
    status, info = server.http("GET", "/object_info")
    assert status == 200
    ours = {k: v for k, v in info.items() if v.get("python_module") == f"custom_nodes.{harness.PACK}"}
    assert {k: v["display_name"] for k, v in ours.items()} == NODES
    for name, spec in ours.items():
        assert spec["category"].startswith("LayerDiff/") and spec["description"]
        for section in ("required", "optional"):
            for input_name, entry in spec["input"].get(section, {}).items():
                assert entry[1].get("tooltip"), f"{name}.{input_name}"


def test_generate_edit_split_and_save(server):
    entry, seconds = server.run(main_graph(server.run_id))
    print(f"main graph (tiny, 64x64, batch 2, 3 + 3 steps): {seconds:.2f}s")
    assert entry["status"]["status_str"] == "success", entry["status"]
    layer_pngs = server.files(entry, "10")
    assert len(layer_pngs) == 6  # 2 samples x 3 layers, sample-major, background first
    alphas = [np.asarray(Image.open(p)) for p in layer_pngs]
    assert all(a.shape == (64, 64, 4) for a in alphas)  # RGBA: transparent PNGs
    assert all(a[..., 3].min() == 255 for a in alphas[0::3])  # backgrounds opaque
    assert any(a[..., 3].min() < 255 for row, a in enumerate(alphas) if row % 3)  # foregrounds cut out
    assert all(Image.open(p).mode == "RGB" for p in server.files(entry, "11"))
    psds = server.files(entry, "12", "psd")
    assert [p.name for p in psds] == ["scene_00001_.psd", "scene_00002_.psd"]
    assert all(p.is_file() for p in psds + server.files(entry, "12"))
    from layerdiff.io.psd import load_psd

    stack = load_psd(psds[0])
    assert stack.num_layers == 3 and stack.names[1] == "layer 1: a green heart"
    assert "preview failed" not in server.log.read_text()


def test_psd_back_in_restyled_transformed_inpainted(server):
    source = server.base / "output" / server.run_id / "scene_00001_.psd"
    if not source.is_file():
        server.run(main_graph(server.run_id))
    name = f"{server.run_id}.psd"
    shutil.copy(source, server.base / "input" / name)
    graph = {
        "1": {"class_type": "LayerDiffLoader",
              "inputs": {"model_name": "tiny", "base_checkpoint": "none", "dtype": "auto", "device": "auto"}},
        "20": {"class_type": "LayerDiffLoadPSD", "inputs": {"psd": name}},
        "21": {"class_type": "LayerDiffLayerStyle",
               "inputs": {"model": ["1", 0], "layers": ["20", 0], "style": "watercolor style", "strength": 0.5,
                          "layers_to_style": "all", "seed": 3, "steps": 3, "cfg": 7.5,
                          "scheduler": "dpmpp_2m_karras"}},  # earlier versions' combined input
        "22": {"class_type": "LayerDiffTransformLayer",
               "inputs": {"layers": ["21", 0], "layer_index": 1, "dx": 8, "dy": -8, "scale": 1.25, "move_to": 2,
                          "remove": False, "harmonize": 0.3, "seed": 4, "model": ["1", 0]}},
        "23": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "24": {"class_type": "LayerDiffLayerInpaint",
               "inputs": {"model": ["1", 0], "layers": ["22", 0], "layer_index": 0, "region": ["23", 0],
                          "prompt": "a snowy field", "seed": 5, "grow": 1, "regenerate": "image and mask",
                          "steps": 3, "cfg": 7.5, "sampler_name": "euler", "scheduler": "karras"}},
        "25": {"class_type": "LayerDiffCompositeLayers", "inputs": {"layers": ["24", 0]}},
        "26": {"class_type": "SaveImage", "inputs": {"images": ["25", 0], "filename_prefix": f"{server.run_id}/edited"}},
    }
    entry, seconds = server.run(graph)
    print(f"PSD -> style -> transform + harmonize -> inpaint graph: {seconds:.2f}s")
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert all(p.is_file() for p in server.files(entry, "26"))


def test_bad_input_is_answered_and_the_server_keeps_running(server):
    graph = main_graph(server.run_id, width=100)
    status, answer = server.http("POST", "/prompt", {"prompt": graph})
    assert status == 400
    details = json.dumps(answer["node_errors"]["6"])
    assert "width 100 is not a multiple of 8: use 96 or 104" in details
    graph = main_graph(server.run_id)
    graph["1"]["inputs"]["model_name"] = "missing.safetensors"
    status, answer = server.http("POST", "/prompt", {"prompt": graph})
    assert status == 400 and "copy the .safetensors file there" in json.dumps(answer["node_errors"]["1"])
    graph = main_graph(server.run_id)
    graph["7"]["inputs"]["layer_index"] = 7
    entry, _ = server.run(graph)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "layer_index 7 is out of range for a stack of 3 layers" in errors[0]["exception_message"]
    entry, _ = server.run(main_graph(server.run_id))
    assert entry["status"]["status_str"] == "success"


WS_PROBE = r"""
import asyncio, json, sys, time, aiohttp

async def main(url, graph, stop_after):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws") + "/ws?clientId=layerdiff-probe") as ws:
            await session.post(url + "/prompt", json={"prompt": graph, "client_id": "layerdiff-probe"})
            steps, previews, asked, end = [], 0, None, None
            async for msg in ws:
                now = time.time()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    previews += 1  # preview images of the progress bar
                    continue
                event = json.loads(msg.data)
                if event["type"] == "progress":
                    steps.append(now)
                    if len(steps) == stop_after:
                        asked = time.time()
                        await session.post(url + "/interrupt", json={})
                elif event["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                    end = event["type"]
                    break
    print(json.dumps({"end": end, "stopped_after": now - asked, "steps": steps, "asked": asked,
                      "previews": previews}))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])))
"""


def test_interrupt_stops_sampling_within_a_step(server):
    """Watches the progress bar on ComfyUI's websocket (aiohttp from ComfyUI's venv), presses
    Cancel after a few steps and times how long sampling goes on."""
    graph = main_graph(server.run_id, steps=500, width=128, height=128, batch_size=1, seed=11)
    graph = {k: graph[k] for k in "123456"}
    graph["9"] = {"class_type": "LayerDiffCompositeLayers", "inputs": {"layers": ["6", 0]}}
    graph["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    probe = subprocess.run([str(harness.COMFY_VENV / "bin" / "python"), "-c", WS_PROBE, server.url, json.dumps(graph), "6"],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    steps = np.diff(result["steps"][2:])  # after warm-up
    late = [t for t in result["steps"] if t > result["asked"]]
    print(f"interrupt -> stopped in {result['stopped_after']:.2f}s (a step: {np.median(steps):.2f}s), "
          f"{result['previews']} previews for {len(result['steps'])} steps")
    assert result["end"] == "execution_interrupted"
    assert len(late) <= 1  # at most the step that was running finished
    assert result["stopped_after"] < 2 * steps.max() + 1.0
    assert result["previews"] >= len(result["steps"]) - 1  # --preview-method auto: a preview per step


# ---------------------------------------------------------------------------- hostile input, same server


def _safetensors_with(path: Path, header_change=None, raw_header: bytes | None = None, data_len: int | None = None,
                      src: Path | None = None) -> Path:
    """A copy of ``src`` (a real LayerDiff file) with its JSON header changed, or replaced by raw bytes."""
    blob = src.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    if header_change is not None:
        header_change(header)
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + (data if data_len is None else data[:data_len]))
    return path


def _config_change(change):
    def apply(header):
        config = json.loads(header["__metadata__"]["config"])
        change(config)
        header["__metadata__"]["config"] = json.dumps(config)
    return apply


def _hostile_model_files(folder: Path, tag: str) -> dict[str, Path]:
    from layerdiff.io.checkpoint import load_model, save_layerdiff

    good = folder / f"{tag}_good.safetensors"
    save_layerdiff(load_model("tiny"), good)
    deep = b'{"__metadata__": {"format": "layerdiff"}, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    return {
        "tokenizer max length 1e9": _safetensors_with(
            folder / f"{tag}_tok.safetensors", _config_change(lambda c: c["tokenizer"].update(max_length=10 ** 9)),
            src=good),
        "a million enhancer blocks": _safetensors_with(
            folder / f"{tag}_enh.safetensors", _config_change(lambda c: c.update(enhancer_blocks=10 ** 6)), src=good),
        "huge image size": _safetensors_with(
            folder / f"{tag}_size.safetensors", _config_change(lambda c: c.update(image_size=10 ** 7)), src=good),
        "config is a list": _safetensors_with(
            folder / f"{tag}_list.safetensors",
            lambda h: h["__metadata__"].update(config="[1, 2, 3]"), src=good),
        "string data offsets": _safetensors_with(
            folder / f"{tag}_offs.safetensors",
            lambda h: next(v for k, v in h.items() if k != "__metadata__").update(data_offsets=["0", "x"]), src=good),
        "deeply nested header": _safetensors_with(folder / f"{tag}_deep.safetensors", raw_header=deep, src=good),
        "truncated data": _safetensors_with(folder / f"{tag}_trunc.safetensors", data_len=1000, src=good),
    }


def test_hostile_model_files_and_prompts_fail_cleanly_and_the_server_lives_on(server):
    """Model files that lie, and prompts with impossible numbers, each end as one error of that prompt;
    the server answers the next prompt, and a good prompt still succeeds."""
    folder = server.base / "models" / "layerdiff"
    folder.mkdir(parents=True, exist_ok=True)
    made = _hostile_model_files(folder, server.run_id)
    try:
        server.http("GET", "/object_info/LayerDiffLoader")  # the file list is read again
        outcomes = {}
        for what, path in made.items():
            graph = main_graph(server.run_id)
            graph["1"]["inputs"]["model_name"] = path.name
            status, answer = server.http("POST", "/prompt", {"prompt": graph, "client_id": "layerdiff-tests"})
            if status != 200:
                outcomes[what] = ("refused", json.dumps(answer)[:200])
                continue
            entry = server.wait(answer["prompt_id"], timeout=120)
            assert entry["status"]["status_str"] == "error", (what, entry["status"])
            message = next(m for kind, m in entry["status"]["messages"] if kind == "execution_error")
            assert message["exception_type"].endswith("CheckpointError") or "LayerDiffError" in message[
                "exception_type"], (what, message["exception_type"], message["exception_message"])
            assert "\n" not in message["exception_message"].strip(), (what, message["exception_message"])
            outcomes[what] = ("error", message["exception_message"][:160])
        bad_numbers = [
            {"cfg": float("nan")}, {"cfg": float("inf")}, {"steps": 0}, {"steps": -5}, {"width": 100000},
            {"height": 8, "width": 65536}, {"batch_size": 100000}, {"seed": 2 ** 70}, {"mask_guidance": -100.0},
            {"mask_guidance_start": -1.0},
        ]
        for change in bad_numbers:
            graph = main_graph(server.run_id, **change)
            body = json.dumps({"prompt": graph, "client_id": "layerdiff-tests"}).encode()  # NaN/inf as JS literals
            req = urllib.request.Request(server.url + "/prompt", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    prompt_id = json.loads(r.read())["prompt_id"]
                entry = server.wait(prompt_id, timeout=120)
                assert entry["status"]["status_str"] == "error", (change, entry["status"])
                outcomes[str(change)] = ("error", "")
            except urllib.error.HTTPError as e:
                assert e.code == 400, (change, e.code)
                outcomes[str(change)] = ("refused", e.read()[:160].decode(errors="replace"))
        print("\n" + "\n".join(f"  {k}: {v[0]} {v[1]}" for k, v in outcomes.items()))
        status, stats = server.http("GET", "/system_stats")
        assert status == 200  # still alive
        entry, _ = server.run(main_graph(server.run_id))
        assert entry["status"]["status_str"] == "success", entry["status"]
    finally:
        for path in [*made.values(), folder / f"{server.run_id}_good.safetensors"]:
            path.unlink(missing_ok=True)


def test_hostile_numbers_are_refused_and_the_server_keeps_running(server):
    """NaN, infinities and out-of-range widget values are refused at validation (400) with
    the library's words; a NaN that arrives through a link (which skips VALIDATE_INPUTS) fails the run with the
    same words instead of a black "success"; then a good prompt still succeeds on the same server."""
    cases = [("cfg", float("nan"), "cfg nan is not a finite number"), ("cfg", float("inf"), "cfg inf"),
             ("seed", 2**64, "seed 18446744073709551616 is outside"), ("steps", 0, "steps 0 is outside 1..500"),
             ("height", 100000, "height 100000 is outside 8..4096"), ("batch_size", 1000, "batch_size 1000"),
             ("mask_guidance", -100.0, "mask_guidance -100.0 is outside 0..5"),
             ("mask_guidance_start", -0.5, "mask_guidance_start -0.5")]
    for name, value, words in cases:
        status, answer = server.http("POST", "/prompt", {"prompt": main_graph(server.run_id, **{name: value})})
        assert status == 400 and words in json.dumps(answer["node_errors"]["6"]), (name, answer)
    graph = main_graph(server.run_id)
    graph["7"]["inputs"]["steps"] = 0
    status, answer = server.http("POST", "/prompt", {"prompt": graph})
    assert status == 400 and "steps 0 is outside 1..500" in json.dumps(answer["node_errors"]["7"])
    graph = main_graph(server.run_id)
    graph["20"] = {"class_type": "PrimitiveFloat", "inputs": {"value": float("nan")}}
    graph["6"]["inputs"]["cfg"] = ["20", 0]
    entry, _ = server.run(graph)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "cfg nan is not a finite number" in errors[0]["exception_message"], entry["status"]
    entry, _ = server.run(main_graph(server.run_id))
    assert entry["status"]["status_str"] == "success"
