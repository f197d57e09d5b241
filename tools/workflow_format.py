"""ComfyUI's UI-format workflows (what the editor saves and the template browser loads), read
against node definitions: which widget value belongs to which input, link checks, and the UI ->
API conversion (what POST /prompt takes).

Standard library only: used by tests/test_workflows.py (CI, no ComfyUI), the real-server tests and
tools/make_workflow_thumbnails.py. Node definitions are in /object_info form
(``{"input": {"required": {...}, "optional": {...}}, "input_order": ..., "output": [...], ...}``);
``definition_from_class`` builds one from a V1 node class, so our nodes are read from their live
INPUT_TYPES.

The widget rules follow the ComfyUI frontend (comfyui-frontend-package 1.27, ``useIntWidget``,
``addValueControlWidgets``, ``migrateWidgetsValues``): widgets_values is positional, one value per
widget input in input order (required, then optional); an INT with ``control_after_generate`` (or
named seed / noise_seed without that key) is followed by its control value ("fixed", "randomize",
...); a COMBO with ``control_after_generate`` by a control value and a filter string; a combo with
``image_upload`` by the upload button's value ("image"). Those extra values are not inputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_KEYS = ("image_upload", "video_upload", "audio_upload")
# Combo inputs whose choices are the files of this machine (model folders, input folder): a snapshot
# stores them empty and comparisons skip them.
MACHINE_CHOICES = {("LoadImage", "image"), ("LayerDiffLoader", "model_name"), ("LayerDiffLoader", "base_checkpoint"),
                   ("LayerDiffLoadPSD", "psd"), ("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name"),
                   ("LayerDiffApplyModel", "layerdiff_name")}
# Frontend-only nodes: they never reach the server. Their widgets (name, type).
FRONTEND_ONLY = {
    "Note": [("text", "STRING")],
    "MarkdownNote": [("text", "STRING")],
}


# ---------------------------------------------------------------------------- definitions
def definition_from_class(cls) -> dict:
    """A V1 node class -> its /object_info-style definition (what ComfyUI's server reports)."""
    inputs = cls.INPUT_TYPES()
    spec = {sec: {name: list(entry) for name, entry in inputs.get(sec, {}).items()} for sec in ("required", "optional")}
    for name_list in spec.values():
        for entry in name_list.values():
            if isinstance(entry[0], tuple):
                entry[0] = list(entry[0])
    return {
        "input": spec,
        "input_order": {sec: list(inputs.get(sec, {})) for sec in ("required", "optional")},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def without_machine_choices(node_type: str, definition: dict) -> dict:
    """A copy of the definition with the MACHINE_CHOICES lists emptied."""
    out = json.loads(json.dumps(definition))
    for section in out.get("input", {}).values():
        for name, entry in (section or {}).items():
            if (node_type, name) in MACHINE_CHOICES and isinstance(entry[0], list):
                entry[0] = []
    return out


def input_kind(entry) -> tuple[str, dict]:
    """An input entry ``[type, options?]`` -> (type name, options); a choice list is "COMBO"."""
    typ = entry[0]
    options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(typ, (list, tuple)):
        return "COMBO", dict(options, options=list(typ))
    return str(typ), options


def ordered_inputs(definition: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) for every input, in the order the frontend creates them."""
    order = definition.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        entries = definition.get("input", {}).get(section, {}) or {}
        for name in order.get(section, list(entries)):
            typ, options = input_kind(entries[name])
            out.append((name, typ, options, section == "required"))
    return out


@dataclass(frozen=True)
class WidgetSlot:
    """One position of widgets_values: an input's widget or a frontend-only companion value."""

    name: str  # the input name, or "<input>.control_after_generate" / ".control_filter_list" / ".upload"
    type: str  # INT FLOAT STRING BOOLEAN COMBO, or CONTROL / FILTER / UPLOAD for companions
    options: dict = field(default_factory=dict)
    is_input: bool = True


def is_widget(typ: str, options: dict) -> bool:
    return typ in WIDGET_TYPES and not options.get("forceInput")


def widget_slots(definition: dict) -> list[WidgetSlot]:
    """The positions of a node's widgets_values, as the frontend writes them."""
    slots = []
    for name, typ, options, _ in ordered_inputs(definition):
        if not is_widget(typ, options):
            continue
        slots.append(WidgetSlot(name, typ, options))
        control = options.get("control_after_generate")
        if typ == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
            slots.append(WidgetSlot(f"{name}.control_after_generate", "CONTROL", is_input=False))
        elif typ == "COMBO" and control:
            slots.append(WidgetSlot(f"{name}.control_after_generate", "CONTROL", is_input=False))
            slots.append(WidgetSlot(f"{name}.control_filter_list", "FILTER", is_input=False))
        if typ == "COMBO" and any(options.get(k) for k in UPLOAD_KEYS):
            slots.append(WidgetSlot(f"{name}.upload", "UPLOAD", is_input=False))
    return slots


def frontend_only_slots(node_type: str) -> list[WidgetSlot]:
    return [WidgetSlot(name, typ) for name, typ in FRONTEND_ONLY[node_type]]


# ---------------------------------------------------------------------------- values
def check_value(slot: WidgetSlot, value, choices_ok=None) -> str | None:
    """Why ``value`` does not fit ``slot`` (None: it fits). ``choices_ok(value)`` may accept a combo
    value missing from a choice list that depends on the machine (model files, input images)."""
    o = slot.options
    if slot.type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an integer"
        lo, hi = o.get("min"), o.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{value} is outside {lo}..{hi}"
        step = o.get("step")
        if step and step > 1 and (value - (lo or 0)) % step:
            return f"{value} is not on the widget's step {step} (from {lo or 0})"
    elif slot.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        lo, hi = o.get("min"), o.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{value} is outside {lo}..{hi}"
    elif slot.type == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a string"
    elif slot.type == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a boolean"
    elif slot.type == "COMBO":
        options = o.get("options") or []
        if value not in options and not (choices_ok and choices_ok(value)):
            return f"{value!r} is not one of {options}"
    elif slot.type == "CONTROL":
        if value not in CONTROL_VALUES:
            return f"control_after_generate {value!r} is not one of {list(CONTROL_VALUES)}"
    elif slot.type == "FILTER":
        if not isinstance(value, str):
            return f"control_filter_list {value!r} is not a string"
    elif slot.type == "UPLOAD":
        if value not in ("image", "video", "audio", None):
            return f"upload button value {value!r} is not 'image'"
    return None


def widget_values(node: dict, slots: list[WidgetSlot]) -> dict:
    """{input name: value} for the widget inputs (companion values dropped). Counts must match."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        raise ValueError(f"node {node['id']} ({node['type']}): widgets_values is a dict, not a list")
    if len(values) != len(slots):
        raise ValueError(
            f"node {node['id']} ({node['type']}): {len(values)} widgets_values {values!r} but its inputs give "
            f"{len(slots)} widgets {[s.name for s in slots]}"
        )
    return {s.name: v for s, v in zip(slots, values) if s.is_input}


# ---------------------------------------------------------------------------- workflows
def load(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def links_by_id(workflow: dict) -> dict[int, tuple]:
    """link id -> (origin id, origin slot, target id, target slot, type); list or dict links."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                               link.get("type"))
        else:
            out[link[0]] = tuple(link[1:6])
    return out


def to_api(workflow: dict, definitions: dict) -> dict:
    """UI-format workflow -> API prompt {id: {"class_type", "inputs", "_meta"}}.

    For the workflows this project ships: no subgraphs, groups nodes, reroutes, primitives, or muted
    and bypassed nodes (tests/test_workflows.py checks that); frontend-only notes are left out.
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = links_by_id(workflow)
    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node_id} ({node['type']}) is muted or bypassed: not supported here")
        definition = definitions[node["type"]]
        inputs = widget_values(node, widget_slots(definition))
        for slot in node.get("inputs") or []:
            link = slot.get("link")
            if link is None:
                continue
            origin, origin_slot = links[link][0], links[link][1]
            inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or node["type"]}}
    return prompt


def output_folder(title: str) -> str:
    """Where a shipped workflow saves (LayerDiff/<this>/...): its title less the order number, as a
    lower-case identifier ("06 Inpaint part of a layer" -> "inpaint_part_of_a_layer")."""
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"^\d+\s+", "", title).lower()).strip("_")


def workflow_files(folder) -> list[Path]:
    """The workflow JSON files of a folder, as ComfyUI's /workflow_templates lists them (top level)."""
    return sorted(Path(folder).glob("*.json"))


# ---------------------------------------------------------------------------- pack provenance
def pack_identity(repo) -> tuple[str, str]:
    """(Registry id, version) of this pack, from pyproject.toml: what ``properties.cnr_id`` / ``ver`` of
    its nodes carry in a saved workflow, so the frontend and ComfyUI-Manager can name the pack that
    provides a missing node."""
    text = (Path(repo) / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]  # the [project] table (no tomllib on 3.10)
    name = re.search(r'^name\s*=\s*"([^"]+)"', project, re.M)
    version = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M)
    return name.group(1), version.group(1)


def stamp_pack(workflow: dict, cnr_id: str, version: str, prefix: str = "LayerDiff") -> dict:
    """Set ``properties.cnr_id`` / ``ver`` on every node of this pack (type starting with ``prefix``)."""
    for node in workflow.get("nodes", []):
        if str(node.get("type", "")).startswith(prefix):
            props = node.setdefault("properties", {})
            props["cnr_id"], props["ver"] = cnr_id, version
    return workflow
