"""The shipped example workflows (example_workflows/*.json, UI format) against the node definitions.

No ComfyUI needed: our nodes' definitions come from their live INPUT_TYPES (so a change to a node
that would break a shipped workflow fails here), ComfyUI's core nodes from the snapshot of the real
server's /object_info in tests/data/comfyui_core_nodes.json (tools/build_workflows.py writes it;
tests/test_workflows_comfyui.py checks it against a live server). The widget rules are those of the
ComfyUI frontend: see tools/workflow_format.py.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import sys
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

import nodes
from layerdiff.config import get_preset
from layerdiff.io.checkpoint import BUILTIN_FILES, builtin_names

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import workflow_format as wf  # noqa: E402

# ComfyUI serves custom-node templates from one of these folders (app/custom_node_manager.py,
# example_workflow_folder_names); "example_workflows" is the one every version since 0.3.10 reads.
FOLDER = REPO / "example_workflows"
INPUTS = FOLDER / "input"
SNAPSHOT = json.loads((REPO / "tests" / "data" / "comfyui_core_nodes.json").read_text())
CORE = SNAPSHOT["nodes"]
OURS = {name: wf.definition_from_class(cls) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}
FILES = wf.workflow_files(FOLDER)
# The template browser shows a custom-node template under its file name: readable titles, numbered in
# the order a new user should open them (the browser and file listings sort by name).
EXPECTED = [
    "01 Text to 2 layers", "02 Text to 3 layers", "03 Text to 4 layers", "04 CFG vs self-mask guidance",
    "05 Edit one layer", "06 Inpaint part of a layer", "07 Restyle layers", "08 Move and reorder layers",
    "09 Layers from your images", "10 Layers from generated images", "11 Your checkpoint and LoRA to layers",
]
TOY = get_preset("toy")
USER_FILES = {("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name"), ("LayerDiffApplyModel", "layerdiff_name")}
USER_FILE_WORKFLOWS = [p for p in FILES if any(n["type"] == "LayerDiffApplyModel" for n in wf.load(p)["nodes"])]
TOY_WORKFLOWS = [p for p in FILES if p not in USER_FILE_WORKFLOWS]
TOY_INSTALLED = "layerdiff-toy" in builtin_names()


def definitions(ours: dict | None = None) -> dict:
    return {**CORE, **(ours or OURS)}


def ids(path):
    return path.stem


def combo_ok(node_type: str, input_name: str):
    """Choice lists that depend on the machine (wf.MACHINE_CHOICES): model files, input images."""
    if (node_type, input_name) == ("LayerDiffLoader", "model_name"):
        return lambda v: v in BUILTIN_FILES  # listed once its weights are installed
    if (node_type, input_name) in USER_FILES:  # the user's own files, named in the workflow's note
        return lambda v: isinstance(v, str) and v.endswith(".safetensors")
    if (node_type, input_name) == ("LoadImage", "image"):
        return lambda v: (INPUTS / v).is_file()  # shipped, copied to ComfyUI's input folder by the user
    return None


# ---------------------------------------------------------------------------- the checks
def problems(workflow: dict, defs: dict) -> list[str]:
    """Everything in a UI-format workflow that the node definitions do not allow."""
    out = []
    node_by_id = {n["id"]: n for n in workflow["nodes"]}
    links = wf.links_by_id(workflow)
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in wf.FRONTEND_ONLY:
            slots = wf.frontend_only_slots(node["type"])
        elif node["type"] in defs:
            definition = defs[node["type"]]
            slots = wf.widget_slots(definition)
            out += socket_problems(node, definition, where)
        else:
            out.append(f"{where}: not a node of this pack nor a snapshot ComfyUI core node")
            continue
        if node.get("mode", 0) != 0:
            out.append(f"{where}: mode {node.get('mode')} (muted/bypassed nodes are not shipped)")
        try:
            values = wf.widget_values(node, slots)
        except ValueError as exc:
            out.append(str(exc))
            continue
        for slot, value in zip(slots, node.get("widgets_values") or []):
            name = slot.name.split(".")[0]
            why = wf.check_value(slot, value, combo_ok(node["type"], name))
            if why:
                out.append(f"{where}: widget {slot.name}: {why}")
        validate = getattr(nodes.NODE_CLASS_MAPPINGS.get(node["type"]), "VALIDATE_INPUTS", None)
        # the loader's check needs the built-in weights; Apply LayerDiff to Model's needs the user's file
        if validate and (node["type"] != "LayerDiffLoader" or TOY_INSTALLED) and node["type"] != "LayerDiffApplyModel":
            wanted = inspect.signature(validate).parameters
            answer = validate(**{k: values.get(k) for k in wanted})
            if answer is not True:
                out.append(f"{where}: VALIDATE_INPUTS says {answer}")
    for link_id, (origin, o_slot, target, t_slot, typ) in links.items():
        src, dst = node_by_id.get(origin), node_by_id.get(target)
        if src is None or dst is None:
            out.append(f"link {link_id}: node {origin if src is None else target} does not exist")
            continue
        where = f"link {link_id} ({src['type']}[{o_slot}] -> {dst['type']}[{t_slot}])"
        try:
            out_sock, in_sock = src["outputs"][o_slot], dst["inputs"][t_slot]
        except (IndexError, KeyError, TypeError):
            out.append(f"{where}: no such socket")
            continue
        if link_id not in (out_sock.get("links") or []) or in_sock.get("link") != link_id:
            out.append(f"{where}: the nodes' sockets do not record this link")
        if src["type"] in defs and dst["type"] in defs:
            made = defs[src["type"]]["output"][o_slot]
            entry = {**defs[dst["type"]]["input"].get("required", {}),
                     **defs[dst["type"]]["input"].get("optional", {})}.get(in_sock["name"])
            wants = wf.input_kind(entry)[0] if entry else None
            if not (made == wants == typ):
                out.append(f"{where}: output type {made} -> input {in_sock['name']} of type {wants} (link says {typ})")
    if not any(defs.get(n["type"], {}).get("output_node") for n in workflow["nodes"]):
        out.append("no output node: ComfyUI would refuse the prompt")
    return out


def socket_problems(node: dict, definition: dict, where: str) -> list[str]:
    out = []
    inputs = {name: (typ, options, required) for name, typ, options, required in wf.ordered_inputs(definition)}
    seen = set()
    for sock in node.get("inputs") or []:
        name = sock["name"]
        if name not in inputs:
            if not sock.get("widget", {}).get("name", "").endswith("upload") and sock.get("type") != "IMAGEUPLOAD":
                out.append(f"{where}: input {name!r} is not an input of the node")
            continue
        seen.add(name)
        typ, options, _ = inputs[name]
        if sock["type"] != typ:
            out.append(f"{where}: input {name} has type {sock['type']}, the node says {typ}")
    for name, (typ, options, required) in inputs.items():
        if not wf.is_widget(typ, options):
            linked = any(s["name"] == name and s.get("link") is not None for s in node.get("inputs") or [])
            if required and not linked:
                out.append(f"{where}: required input {name} ({typ}) is not connected")
            if name not in seen:
                out.append(f"{where}: input socket {name} is missing")
    outputs = [(o["name"], o["type"]) for o in node.get("outputs") or []]
    want = list(zip(definition.get("output_name") or definition["output"], definition["output"]))
    if outputs != want:
        out.append(f"{where}: outputs {outputs}, the node gives {want}")
    return out


# ---------------------------------------------------------------------------- tests
def test_the_expected_workflows_are_shipped_where_comfyui_finds_them():
    assert [p.stem for p in FILES] == EXPECTED  # sorted by name = the intended order
    # one folder only: ComfyUI >= 0.3.30 also reads workflows/ and would list every template twice
    assert not [p for p in REPO.glob("workflows/*.json")]
    assert not [p for p in FOLDER.glob("*/*.json")]  # only the top level is listed


@pytest.mark.parametrize("path", FILES, ids=ids)
def test_file_is_an_editor_saved_workflow_with_a_note_and_a_thumbnail(path):
    workflow = wf.load(path)
    assert workflow["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "extra"):
        assert key in workflow, key
    assert workflow["last_node_id"] >= max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] >= max(wf.links_by_id(workflow), default=0)
    assert len({n["id"] for n in workflow["nodes"]}) == len(workflow["nodes"])
    for node in workflow["nodes"]:
        for key in ("id", "type", "pos", "size", "mode", "order", "properties"):
            assert key in node, (node["id"], key)
    notes = [n for n in workflow["nodes"] if n["type"] in wf.FRONTEND_ONLY]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert text.strip() and "\n" not in text.strip() and len(text) < 260
    thumb = path.with_suffix(".jpg")  # the frontend asks for NAME.jpg (mediaSubtype "jpg")
    assert thumb.is_file(), f"no thumbnail {thumb.name}: run tools/make_workflow_thumbnails.py"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.width == im.height >= 256


def test_titles_are_readable_and_numbered_in_order():
    for number, title in enumerate(EXPECTED, 1):
        assert re.fullmatch(rf"{number:02d} [A-Z][A-Za-z0-9 .,'()-]+", title), title
        assert "_" not in title and "  " not in title and len(title) <= 40, title
    assert len({wf.output_folder(t) for t in EXPECTED}) == len(EXPECTED)  # distinct output folders


@pytest.mark.parametrize("path", FILES, ids=ids)
def test_our_nodes_name_the_pack_that_provides_them(path):
    """properties.cnr_id / ver: how the frontend and ComfyUI-Manager name the pack of a missing node."""
    cnr_id, version = wf.pack_identity(REPO)
    ours = [n for n in wf.load(path)["nodes"] if n["type"] in OURS]
    assert ours
    for node in ours:
        assert node["properties"].get("cnr_id") == cnr_id and node["properties"].get("ver") == version, node["type"]


@pytest.mark.parametrize("path", FILES, ids=ids)
def test_nodes_links_and_widgets_match_the_node_definitions(path):
    assert problems(wf.load(path), definitions()) == []


@pytest.mark.parametrize("path", USER_FILE_WORKFLOWS, ids=ids)
def test_a_workflow_on_the_users_files_names_each_file_in_its_note(path):
    """It cannot run as shipped (no SD 1.5 file ships): the note says which files go where, every
    model file it loads is one of those, and it runs at SD 1.5's size."""
    workflow = wf.load(path)
    note = next(n for n in workflow["nodes"] if n["type"] in wf.FRONTEND_ONLY)["widgets_values"][0]
    api = wf.to_api(workflow, definitions())
    named = [(n["class_type"], k, v) for n in api.values() for k, v in n["inputs"].items()
             if (n["class_type"], k) in USER_FILES]
    assert {kind for kind, _, _ in named} == {kind for kind, _ in USER_FILES}
    folders = {"ckpt_name": "models/checkpoints", "lora_name": "models/loras", "layerdiff_name": "models/layerdiff"}
    for _, key, value in named:
        assert f"{value} ({folders[key]})" in note
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "LayerDiffKSampler")
    assert (sampler["width"], sampler["height"]) == (512, 512)


@pytest.mark.parametrize("path", TOY_WORKFLOWS, ids=ids)
def test_runs_on_the_builtin_toy_model_at_its_size_with_its_vocabulary(path):
    """The built-in layerdiff-toy, 128x128, prompts it can read: each runs on a CPU in well under a minute."""
    workflow = wf.load(path)
    tokenizer = _toy_tokenizer()
    unk = tokenizer.unk_token_id
    api = wf.to_api(workflow, definitions())
    for node_id, node in api.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "LayerDiffLoader":
            assert inputs["model_name"] == "layerdiff-toy" and inputs["base_checkpoint"] == "none"
        if "width" in inputs and kind.startswith("LayerDiff"):
            assert (inputs["width"], inputs["height"]) == (TOY.image_size, TOY.image_size)
        if "steps" in inputs:
            assert inputs["steps"] <= 25, f"{kind} {node_id}: {inputs['steps']} steps is slow on a CPU"
        texts = [inputs.get(k) for k in ("prompt", "global_prompt", "negative_prompt")]
        if kind == "LayerDiffLayerStyle":
            texts.append(f"a large red star, {inputs['style']}")
        for text in texts:
            if isinstance(text, str) and text.strip() and kind.startswith("LayerDiff"):
                ids_ = tokenizer(text).input_ids
                words = re.findall(r"\w+|[^\w\s]", text.lower())
                assert unk not in ids_, f"{kind} {node_id}: words outside the toy vocabulary in {text!r}: " + str(
                    [w for w in words if w not in TOY.tokenizer["words"]])
                assert len(ids_) <= TOY.tokenizer["max_length"], f"{text!r} is longer than the toy model reads"
        if "filename_prefix" in inputs:
            assert inputs["filename_prefix"].startswith(f"LayerDiff/{wf.output_folder(path.stem)}/")
        assert not any("." in name for name in inputs)  # companion values (control_after_generate) are not inputs
    controls = [v for n in workflow["nodes"] if n["type"] in definitions()
                for s, v in zip(wf.widget_slots(definitions()[n["type"]]), n.get("widgets_values") or [])
                if s.type == "CONTROL"]
    assert controls and set(controls) == {"fixed"}  # re-running reproduces the thumbnail


def test_load_image_inputs_are_shipped_as_rgba_layers():
    used = {v for p in FILES for n in wf.load(p)["nodes"] if n["type"] == "LoadImage" for v in n["widgets_values"][:1]}
    assert used and all((INPUTS / name).is_file() for name in used)
    for name in used:
        with Image.open(INPUTS / name) as im:
            assert im.size == (TOY.image_size, TOY.image_size)
            assert im.mode == ("RGB" if "background" in name else "RGBA")


def test_snapshot_covers_the_core_nodes_used_and_nothing_is_unknown():
    used = {n["type"] for p in FILES for n in wf.load(p)["nodes"]}
    assert used - set(OURS) - set(wf.FRONTEND_ONLY) == set(CORE)


def test_readme_lists_every_workflow():
    text = (FOLDER / "README.md").read_text()
    for path in FILES:
        link = urllib.parse.quote(path.stem)  # titles have spaces: the links are URL-encoded
        assert f"`{path.stem}.json`" in text and f"{link}.json)" in text and f"{link}.jpg" in text


# ---------------------------------------------------------------------------- the checks bite
def _mutated(node_type: str, change) -> dict:
    ours = copy.deepcopy(OURS)
    change(ours[node_type])
    return ours


@pytest.mark.parametrize("change, expect", [
    (lambda d: d["input"]["required"].update(eta=["FLOAT", {"default": 0.0}])
     or d["input_order"]["required"].append("eta"), "widgets_values"),
    (lambda d: d["input"]["required"]["sampler_name"][0].remove("ddim"), "widget sampler_name"),
    (lambda d: d["input"]["optional"]["scheduler"][0].remove("normal"), "widget scheduler"),
    (lambda d: d["input"]["required"]["width"][1].update(max=96), "widget width"),
    (lambda d: d["input"]["required"]["seed"][1].update(control_after_generate=False), "widgets_values"),
    (lambda d: d.update(output=["IMAGE"]), "outputs"),
])
def test_a_node_change_that_breaks_a_shipped_workflow_is_caught(change, expect):
    workflow = wf.load(FOLDER / "02 Text to 3 layers.json")
    found = problems(workflow, definitions(_mutated("LayerDiffKSampler", change)))
    assert found and any(expect in p for p in found), found


def test_a_renamed_input_or_a_bad_link_is_caught():
    def rename(d):
        d["input"]["required"]["layer_prompts"] = d["input"]["required"].pop("prompts")
        d["input_order"]["required"][d["input_order"]["required"].index("prompts")] = "layer_prompts"

    workflow = wf.load(FOLDER / "02 Text to 3 layers.json")
    found = problems(workflow, definitions(_mutated("LayerDiffPromptEnhancer", rename)))
    assert any("'prompts' is not an input" in p for p in found) and any("layer_prompts" in p for p in found)
    broken = copy.deepcopy(workflow)
    broken["links"][0][5] = "IMAGE"
    assert any("link" in p and "type" in p for p in problems(broken, definitions()))


def test_our_conversion_gives_every_input_of_every_node():
    for path in FILES:
        api = wf.to_api(wf.load(path), definitions())
        for node_id, node in api.items():
            definition = definitions()[node["class_type"]]
            required = set(definition["input"].get("required", {}))
            assert required <= set(node["inputs"]), (path.stem, node_id, required - set(node["inputs"]))
            for value in node["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in api and isinstance(value[1], int)


def _toy_tokenizer():
    from layerdiff.model.text import build_tokenizer

    return build_tokenizer(TOY.tokenizer)



def test_the_recipes_in_tools_build_workflows_match_the_shipped_files():
    """tools/build_workflows.py makes these files; a recipe changed without a rebuild shows up here.
    (The editor creates the nodes in recipe order, so file node i + 1 is recipe node i.)"""
    import build_workflows

    recipes = {r.name: r for r in build_workflows.recipes()}
    assert set(recipes) == {p.stem for p in FILES}
    for path in FILES:
        workflow, recipe = wf.load(path), recipes[path.stem]
        by_id = {n["id"]: n for n in workflow["nodes"]}
        assert len(by_id) == len(recipe.nodes), path.stem
        for i, spec in enumerate(recipe.nodes):
            node = by_id[i + 1]
            assert node["type"] == spec.type, (path.stem, i)
            if spec.type in wf.FRONTEND_ONLY:
                assert node["widgets_values"] == [spec.widgets["text"]]
                continue
            values = wf.widget_values(node, wf.widget_slots(definitions()[spec.type]))
            assert {k: values[k] for k in spec.widgets} == spec.widgets, (path.stem, node.get("title"))
            linked = {s["name"] for s in node.get("inputs") or [] if s.get("link") is not None}
            assert linked == set(spec.links), (path.stem, node.get("title"))


def test_a_workflow_saved_before_the_sampler_split_still_loads():
    """Saved when the sampler widget held combined names ('ddim', 'dpmpp_2m_karras') and there was no
    scheduler widget: the editor fills the missing last widget with its default ('normal'), the old
    value lands in sampler_name, and the nodes accept every old value (their VALIDATE_INPUTS takes
    sampler_name, so ComfyUI leaves the list check to them)."""
    old = wf.load(REPO / "tests" / "data" / "workflow_before_sampler_split.json")
    defs = definitions()
    upgraded = copy.deepcopy(old)
    for node in upgraded["nodes"]:
        if node["type"] in ("LayerDiffKSampler", "LayerDiffLayerEdit"):
            slots = wf.widget_slots(defs[node["type"]])
            assert len(node["widgets_values"]) == len(slots) - 1 and slots[-1].name == "scheduler"
            node["widgets_values"].append("normal")  # what the editor does with a missing last widget
            values = wf.widget_values(node, slots)
            assert values["sampler_name"] == "ddim"
            validate = nodes.NODE_CLASS_MAPPINGS[node["type"]].VALIDATE_INPUTS
            wanted = inspect.signature(validate).parameters
            assert "sampler_name" in wanted and "scheduler" in wanted
            for name in ("dpmpp_2m_karras", "unipc", "euler_ancestral"):
                answer = validate(**{k: {**values, "sampler_name": name}.get(k) for k in wanted})
                assert answer is True, (name, answer)
    assert problems(upgraded, defs) == []
