"""Build the shipped example workflows (example_workflows/*.json) with ComfyUI's own editor.

Each workflow is written below as a short recipe (nodes, widget values by input name, links by
socket name, groups). The recipe is played in the real frontend in headless Chromium: the nodes are
created with LiteGraph.createNode, their widgets set, linked and laid out, and the graph is saved
with the editor's Export (app.graphToPrompt().workflow), so every file is exactly what the editor
writes. The frontend's own API conversion is compared with tools/workflow_format.to_api on the way.

Also: the example input images of the Load Image workflow (example_workflows/input/, rendered by the
toy world), and the snapshot of the ComfyUI core node definitions the workflows use
(tests/data/comfyui_core_nodes.json, from the live /object_info).

Needs a ComfyUI with this pack running (tools/comfy_run.py starts a private one: its own base
directory with only this pack) and the browser tools: Chromium (CHROMIUM) and playwright-core in
COMFY_PW_DIR (default the `pw` folder beside the ComfyUI checkout):

    python tools/comfy_run.py --port 8231 &                # a private server; Ctrl-C or kill stops it
    python tools/build_workflows.py --port 8231            # all, or: --only "05 Edit one layer"
    python tools/make_workflow_thumbnails.py               # then the thumbnails from real runs

A workflow edited and saved in the editor may simply be copied over its file instead: CI
(tests/test_workflows.py) checks the files, not this recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]
import workflow_format as wf  # noqa: E402

WORKFLOWS = REPO / "example_workflows"
INPUTS = WORKFLOWS / "input"
SNAPSHOT = REPO / "tests" / "data" / "comfyui_core_nodes.json"
COMFY_HOME = Path(os.environ.get("COMFY_HOME", Path.home() / ".cache" / "comfyui-host"))
COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or os.environ.get("COMFY_DIR") or COMFY_HOME / "ComfyUI")
PW_DIR = Path(os.environ.get("COMFY_PW_DIR", COMFY_HOME / "pw"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

MODEL = "layerdiff-toy"
SIZE = 128
STEPS = 20  # the toy model's own default (config preset "toy")
CFG = 3  # the built-in model's calibrated foreground guidance (its file's sampling defaults)
NOTE_COLOR, NOTE_BG = "#432", "#653"
GROUP_COLORS = {"model": "#3f789e", "prompts": "#8A8", "generate": "#b06634", "edit": "#a1309b",
                "output": "#88A", "inputs": "#b58b2a"}


# ---------------------------------------------------------------------------- recipe
class Out:
    def __init__(self, node: Node, slot: int | str):
        self.node, self.slot = node, slot


class Node:
    def __init__(self, recipe: Recipe, key: str, type_: str, col: int, title, size, group, values: dict):
        self.recipe, self.key, self.type, self.col = recipe, key, type_, col
        self.title, self.size, self.group = title, size, group
        self.widgets = {k: v for k, v in values.items() if not isinstance(v, Out) and v is not None}
        self.links = {k: v for k, v in values.items() if isinstance(v, Out)}

    def out(self, slot: int | str = 0) -> Out:
        return Out(self, slot)


class Recipe:
    """A workflow as code: nodes in columns (placed top to bottom), links by socket name, groups."""

    def __init__(self, name: str, note: str, columns: list[int]):
        self.name, self.columns, self.nodes, self.groups = name, columns, [], {}
        self.node("Note", 0, title="About this workflow", size=(columns[1] - columns[0] - 40, 110), text=note)

    def node(self, type_: str, col: int, title=None, size=None, group=None, **values) -> Node:
        n = Node(self, f"n{len(self.nodes)}", type_, col, title, size, group, values)
        self.nodes.append(n)
        if group:
            self.groups.setdefault(group, []).append(n.key)
        return n

    def to_json(self) -> dict:
        return {
            "name": self.name, "columns": self.columns,
            "nodes": [{"key": n.key, "type": n.type, "col": n.col, "title": n.title, "size": n.size,
                       "group": n.group, "widgets": n.widgets,
                       "links": {k: [o.node.key, o.slot] for k, o in n.links.items()},
                       "color": NOTE_COLOR if n.type == "Note" else None,
                       "bgcolor": NOTE_BG if n.type == "Note" else None} for n in self.nodes],
            "groups": [{"title": t, "nodes": keys, "color": GROUP_COLORS.get(t.split(":")[0].lower(), "#888")}
                       for t, keys in self.groups.items()],
        }


# ---------------------------------------------------------------------------- building blocks
def loader(r: Recipe, col=0) -> Node:
    return r.node("LayerDiffLoader", col, group="Model", model_name=MODEL, base_checkpoint="none", dtype="auto",
                  device="auto")


def prompt_chain(r: Recipe, prompts: list[str], col=1, group="Prompts") -> list[Node]:
    nodes, previous = [], None
    for i, text in enumerate(prompts):
        title = "Background (layer 0)" if i == 0 else f"Layer {i}"
        previous = r.node("LayerDiffLayerPrompt", col, title=title, size=(300, 110), group=group, prompt=text,
                          previous=previous.out(0) if previous else None)
        nodes.append(previous)
    return nodes


def generate(r: Recipe, model: Node, prompts: list[Node], global_prompt: str, seed: int, col=2, group="Generate",
             title=None, **sampler) -> Node:
    enhancer = r.node("LayerDiffPromptEnhancer", col, size=(320, 190), group=group, model=model.out(),
                      prompts=prompts[-1].out(0), global_prompt=global_prompt, negative_prompt="")
    settings = dict(seed=seed, steps=STEPS, cfg=CFG, mask_guidance=0.0, mask_guidance_start=0.25,
                    sampler_name="ddim", scheduler="normal", width=SIZE, height=SIZE, batch_size=1)
    settings.update(sampler)
    return r.node("LayerDiffKSampler", col, title=title, group=group, model=model.out(),
                  conditioning=enhancer.out(), **settings)


def save_layers(r: Recipe, layers: Node, col: int, what: str = "", group="Output", composite=True) -> None:
    """Composite -> Save Image; every layer as a transparent PNG; the PSD."""
    prefix = f"LayerDiff/{wf.output_folder(r.name)}/{what}"
    if composite:
        comp = r.node("LayerDiffCompositeLayers", col, group=group, layers=layers.out())
        r.node("SaveImage", col, title="Save composite", size=(260, 300), group=group, images=comp.out(),
               filename_prefix=prefix + "composite")
    split = r.node("LayerDiffSplitLayers", col, group=group, layers=layers.out(), layer_index=1)
    r.node("SaveImage", col + 1, title="Save layers (transparent PNGs)", size=(300, 300), group=group,
           images=split.out("all_layers"), filename_prefix=prefix + "layer")
    r.node("LayerDiffSavePSD", col + 1, title="Save layers as PSD", size=(300, 300), group=group,
           layers=layers.out(), filename_prefix=prefix + "layers")


def before_after(r: Recipe, before: Node, after: Node, col: int, title: str, group="Output") -> Node:
    """Composites of two layer stacks side by side -> Save Image."""
    a = r.node("LayerDiffCompositeLayers", col, title="Composite (before)", group=group, layers=before.out())
    b = r.node("LayerDiffCompositeLayers", col, title="Composite (after)", group=group, layers=after.out())
    stitch = r.node("ImageStitch", col, group=group, image1=a.out(), direction="right", match_image_size=True,
                    spacing_width=4, spacing_color="white", image2=b.out())
    r.node("SaveImage", col + 1, title=title, size=(300, 220), group=group, images=stitch.out(),
           filename_prefix=f"LayerDiff/{wf.output_folder(r.name)}/before_after")
    return stitch


# ---------------------------------------------------------------------------- the workflows
SCENE_3 = (["a brick wall", "a large red star", "a small blue circle"],
           "a large red star and a small blue circle in front of a brick wall")


def text_to_layers(name: str, prompts: list[str], global_prompt: str, seed: int) -> Recipe:
    k = len(prompts)
    r = Recipe(name, f"Text to {k} layers: a global prompt and one Layer Prompt per layer (background first) -> "
               f"Layered KSampler -> composite (Save Image), each layer as a transparent PNG, and a layered PSD.",
               [0, 380, 720, 1080, 1380])
    model = loader(r)
    chain = prompt_chain(r, prompts)
    layers = generate(r, model, chain, global_prompt, seed)
    save_layers(r, layers, 3)
    return r


def edit_one_layer() -> Recipe:
    r = Recipe("05 Edit one layer", "Edit one layer: the red star (layer 1) is regenerated as a green heart with a new "
               "seed; the brick wall and the blue circle are locked and come back bit-identical.",
               [0, 380, 720, 1080, 1440, 1780])
    model = loader(r)
    chain = prompt_chain(r, SCENE_3[0])
    layers = generate(r, model, chain, SCENE_3[1], seed=3)
    edited = r.node("LayerDiffLayerEdit", 3, size=(320, 420), group="Edit", model=model.out(), layers=layers.out(),
                    layer_index=chain[1].out("layer_index"), prompt="a large green heart", seed=7,
                    regenerate="image and mask", steps=STEPS, cfg=7.5, sampler_name="ddim", scheduler="normal", global_prompt="",
                    negative_prompt="")
    before_after(r, layers, edited, 4, "Save before | after")
    save_layers(r, edited, 4, "edited_", composite=False)
    return r


def inpaint_layer() -> Recipe:
    r = Recipe("06 Inpaint part of a layer", "Inpaint a region of one layer: the left half of the background (layer 0) is "
               "redrawn as a snowy field; outside the region and on every other layer nothing changes.",
               [0, 380, 720, 1080, 1440, 1780])
    model = loader(r)
    chain = prompt_chain(r, SCENE_3[0])
    layers = generate(r, model, chain, SCENE_3[1], seed=3)
    empty = r.node("SolidMask", 2, title="Canvas (nothing selected)", group="Region", value=0.0, width=SIZE,
                   height=SIZE)
    half = r.node("SolidMask", 2, title="Left half", group="Region", value=1.0, width=SIZE // 2, height=SIZE)
    region = r.node("MaskComposite", 2, title="Region (1 = change)", group="Region", destination=empty.out(),
                    source=half.out(), x=0, y=0, operation="add")
    inpainted = r.node("LayerDiffLayerInpaint", 3, size=(320, 440), group="Edit", model=model.out(),
                       layers=layers.out(), layer_index=0, region=region.out(), prompt="a snowy field", seed=11,
                       grow=1, regenerate="image and mask", steps=STEPS, cfg=7.5, sampler_name="ddim", scheduler="normal",
                       global_prompt="", negative_prompt="")
    before_after(r, layers, inpainted, 4, "Save before | after")
    save_layers(r, inpainted, 4, "inpainted_", composite=False)
    return r


def restyle_layers() -> Recipe:
    r = Recipe("07 Restyle layers", "Restyle the background only (layers_to_style '0') and every layer ('all'), masks "
               "kept. The built-in model knows no style words: with it this makes a variation; 'watercolor style' "
               "needs an SD 1.5 model. Left to right: original, background, all.",
               [0, 380, 720, 1080, 1440, 1780])
    model = loader(r)
    chain = prompt_chain(r, SCENE_3[0])
    layers = generate(r, model, chain, SCENE_3[1], seed=3)
    common = dict(model=model.out(), layers=layers.out(), strength=0.5, steps=STEPS, cfg=7.5, sampler_name="ddim", scheduler="normal",
                  negative_prompt="")
    bg = r.node("LayerDiffLayerStyle", 3, title="Layer Style: background only", group="Edit",
                style="watercolor style", layers_to_style="0", seed=5, **common)
    everything = r.node("LayerDiffLayerStyle", 3, title="Layer Style: all layers", group="Edit",
                        style="watercolor style", layers_to_style="all", seed=5, **common)
    c0 = r.node("LayerDiffCompositeLayers", 4, title="Composite (original)", group="Output", layers=layers.out())
    c1 = r.node("LayerDiffCompositeLayers", 4, title="Composite (background restyled)", group="Output",
                layers=bg.out())
    c2 = r.node("LayerDiffCompositeLayers", 4, title="Composite (all restyled)", group="Output",
                layers=everything.out())
    s1 = r.node("ImageStitch", 4, group="Output", image1=c0.out(), direction="right", match_image_size=True,
                spacing_width=4, spacing_color="white", image2=c1.out())
    s2 = r.node("ImageStitch", 4, group="Output", image1=s1.out(), direction="right", match_image_size=True,
                spacing_width=4, spacing_color="white", image2=c2.out())
    r.node("SaveImage", 5, title="Save original | background | all", size=(360, 200), group="Output",
           images=s2.out(), filename_prefix=f"LayerDiff/{wf.output_folder(r.name)}/original_background_all")
    r.node("LayerDiffSavePSD", 5, title="Save PSD (background restyled)", size=(300, 280), group="Output",
           layers=bg.out(), filename_prefix=f"LayerDiff/{wf.output_folder(r.name)}/background_restyled")
    r.node("LayerDiffSavePSD", 5, title="Save PSD (all restyled)", size=(300, 280), group="Output",
           layers=everything.out(), filename_prefix=f"LayerDiff/{wf.output_folder(r.name)}/all_restyled")
    return r


def move_reorder_layers() -> Recipe:
    r = Recipe("08 Move and reorder layers", "Move and reorder: the blue circle (layer 2) is moved left and enlarged, then "
               "the red star (layer 1) is brought to the front; no model pass, pixels and masks just move.",
               [0, 380, 720, 1080, 1440, 1780])
    model = loader(r)
    chain = prompt_chain(r, SCENE_3[0])
    layers = generate(r, model, chain, SCENE_3[1], seed=3)
    moved = r.node("LayerDiffTransformLayer", 3, title="Move + scale the circle", group="Edit", layers=layers.out(),
                   layer_index=2, dx=-24, dy=8, scale=1.5, move_to=0, remove=False, harmonize=0.0, seed=0)
    front = r.node("LayerDiffTransformLayer", 3, title="Star to the front", group="Edit", layers=moved.out(),
                   layer_index=1, dx=0, dy=0, scale=1.0, move_to=2, remove=False, harmonize=0.0, seed=0)
    before_after(r, layers, front, 4, "Save before | after")
    save_layers(r, front, 4, "moved_", composite=False)
    return r


def cfg_vs_self_mask_guidance() -> Recipe:
    r = Recipe("04 CFG vs self-mask guidance", "CFG vs self-mask guidance, same prompts and seed. Columns: CFG only "
               "(mask_guidance 0), self-mask guidance only (cfg 1), both. Top: composites; bottom: layer 1's mask.",
               [0, 380, 720, 1080, 1420, 1760, 2100])
    model = loader(r)
    chain = prompt_chain(r, SCENE_3[0])
    enhancer = r.node("LayerDiffPromptEnhancer", 2, size=(320, 190), group="Generate", model=model.out(),
                      prompts=chain[-1].out(0), global_prompt=SCENE_3[1], negative_prompt="")
    runs = [("CFG only", CFG, 0.0), ("Self-mask guidance only", 1.0, 0.75), ("CFG + self-mask guidance", CFG, 0.75)]
    composites, masks = [], []
    for title, cfg, smg in runs:
        ks = r.node("LayerDiffKSampler", 3, title=title, group="Generate", model=model.out(),
                    conditioning=enhancer.out(), seed=3, steps=STEPS, cfg=cfg, mask_guidance=smg,
                    mask_guidance_start=0.25, sampler_name="ddim", scheduler="normal", width=SIZE, height=SIZE, batch_size=1)
        composites.append(r.node("LayerDiffCompositeLayers", 4, group="Compare", layers=ks.out()))
        split = r.node("LayerDiffSplitLayers", 4, group="Compare", layers=ks.out(), layer_index=1)
        masks.append(r.node("MaskToImage", 4, group="Compare", mask=split.out("layer_mask")))

    def row(images: list[Node]) -> Node:
        left = images[0]
        for image in images[1:]:
            left = r.node("ImageStitch", 5, group="Compare", image1=left.out(), direction="right",
                          match_image_size=True, spacing_width=4, spacing_color="white", image2=image.out())
        return left

    grid = r.node("ImageStitch", 5, title="Composites over masks", group="Compare", image1=row(composites).out(),
                  direction="down", match_image_size=True, spacing_width=4, spacing_color="white",
                  image2=row(masks).out())
    r.node("SaveImage", 6, title="Save comparison", size=(360, 300), group="Compare", images=grid.out(),
           filename_prefix=f"LayerDiff/{wf.output_folder(r.name)}/cfg_smg_both")
    return r


LOADED_SCENE = (["a wooden floor", "a large orange heart", "a small green triangle"],
                "a large orange heart and a small green triangle in front of a wooden floor")
INPUT_FILES = ("layerdiff_example_background.png", "layerdiff_example_layer1.png", "layerdiff_example_layer2.png")


def layers_from_images() -> Recipe:
    r = Recipe("09 Layers from your images", "Bring your own layers: Load Image x 3 (RGBA PNGs; copy example_workflows/input/"
               "*.png into ComfyUI/input or upload them) -> Layers from Images -> edit layer 2 -> PSD.",
               [0, 380, 720, 1080, 1440, 1780])
    model = loader(r, col=2)
    bg = r.node("LoadImage", 0, title="Background", size=(300, 330), group="Inputs", image=INPUT_FILES[0])
    fg1 = r.node("LoadImage", 0, title="Layer 1 (RGBA)", size=(300, 330), group="Inputs", image=INPUT_FILES[1])
    fg2 = r.node("LoadImage", 0, title="Layer 2 (RGBA)", size=(300, 330), group="Inputs", image=INPUT_FILES[2])
    # Load Image's MASK is 1 - alpha; Join Image with Alpha inverts it back: the PNG's own alpha
    rgba1 = r.node("JoinImageWithAlpha", 1, group="Inputs", image=fg1.out("IMAGE"), alpha=fg1.out("MASK"))
    rgba2 = r.node("JoinImageWithAlpha", 1, group="Inputs", image=fg2.out("IMAGE"), alpha=fg2.out("MASK"))
    batch = r.node("ImageBatch", 1, title="Foregrounds, back to front", group="Inputs", image1=rgba1.out(),
                   image2=rgba2.out())
    chain = prompt_chain(r, LOADED_SCENE[0], col=1, group="Prompts")
    layers = r.node("LayerDiffLayersFromImages", 2, group="Edit", background=bg.out("IMAGE"), invert_masks=False,
                    foregrounds=batch.out(), prompts=chain[-1].out(0))
    edited = r.node("LayerDiffLayerEdit", 3, size=(320, 420), group="Edit", model=model.out(), layers=layers.out(),
                    layer_index=2, prompt="a small purple star", seed=9, regenerate="image and mask", steps=STEPS,
                    cfg=7.5, sampler_name="ddim", scheduler="normal", global_prompt="", negative_prompt="")
    before_after(r, layers, edited, 4, "Save before | after")
    save_layers(r, edited, 4, "edited_", composite=False)
    return r


def layers_from_generated_images() -> Recipe:
    r = Recipe("10 Layers from generated images", "Layers from images made by core nodes (flat colours + square masks, "
               "runs as shipped): Layers from Images -> the background redrawn as a snowy field -> PSD.",
               [0, 330, 660, 1000, 1360, 1720, 2060])
    model = loader(r, col=3)
    bg = r.node("EmptyImage", 0, title="Background: flat grey", group="Inputs", width=SIZE, height=SIZE,
                batch_size=1, color=0x9AA0A6)
    red = r.node("EmptyImage", 0, title="Layer 1: red", group="Inputs", width=SIZE, height=SIZE, batch_size=1,
                 color=0xDC1E23)
    blue = r.node("EmptyImage", 0, title="Layer 2: blue", group="Inputs", width=SIZE, height=SIZE, batch_size=1,
                  color=0x234BE1)
    images = r.node("ImageBatch", 0, title="Foregrounds, back to front", group="Inputs", image1=red.out(),
                    image2=blue.out())
    canvas = r.node("SolidMask", 1, title="Empty mask", group="Masks", value=0.0, width=SIZE, height=SIZE)
    big = r.node("SolidMask", 1, title="Large square", group="Masks", value=1.0, width=56, height=56)
    small = r.node("SolidMask", 1, title="Small square", group="Masks", value=1.0, width=32, height=32)
    m1 = r.node("MaskComposite", 1, title="Mask of layer 1", group="Masks", destination=canvas.out(),
                source=big.out(), x=16, y=48, operation="add")
    m2 = r.node("MaskComposite", 2, title="Mask of layer 2", group="Masks", destination=canvas.out(),
                source=small.out(), x=80, y=24, operation="add")
    i1 = r.node("MaskToImage", 2, group="Masks", mask=m1.out())
    i2 = r.node("MaskToImage", 2, group="Masks", mask=m2.out())
    both = r.node("ImageBatch", 2, group="Masks", image1=i1.out(), image2=i2.out())
    masks = r.node("ImageToMask", 2, title="Masks, back to front", group="Masks", image=both.out(), channel="red")
    chain = prompt_chain(r, ["a snowy field", "a large red square", "a small blue square"], col=3,
                         group="Prompts")
    layers = r.node("LayerDiffLayersFromImages", 4, group="Edit", background=bg.out(), invert_masks=False,
                    foregrounds=images.out(), masks=masks.out(), prompts=chain[-1].out(0))
    edited = r.node("LayerDiffLayerEdit", 4, title="Redraw the background", size=(320, 420), group="Edit",
                    model=model.out(), layers=layers.out(), layer_index=0, prompt="a snowy field", seed=5,
                    regenerate="image and mask", steps=STEPS, cfg=7.5, sampler_name="ddim", scheduler="normal", global_prompt="",
                    negative_prompt="")
    before_after(r, layers, edited, 5, "Save before | after")
    save_layers(r, edited, 5, "edited_", composite=False)
    return r


# The files the user-checkpoint workflow names (its note says where each goes); tests supply random ones.
USER_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
USER_LORA = "your_sd15_lora.safetensors"
USER_LAYERDIFF = "layerdiff_sd15.safetensors"
USER_SIZE = 512


def your_checkpoint_to_layers() -> Recipe:
    r = Recipe("11 Your checkpoint and LoRA to layers",
               f"Your SD 1.5 checkpoint + LoRA -> Apply LayerDiff to Model -> 3 layers and a PSD. Needs {USER_CHECKPOINT} "
               f"(models/checkpoints), {USER_LORA} (models/loras), {USER_LAYERDIFF} (models/layerdiff).",
               [0, 380, 720, 1080, 1380])
    ckpt = r.node("CheckpointLoaderSimple", 0, group="Model", ckpt_name=USER_CHECKPOINT)
    lora = r.node("LoraLoader", 0, group="Model", model=ckpt.out("MODEL"), clip=ckpt.out("CLIP"), lora_name=USER_LORA,
                  strength_model=1.0, strength_clip=1.0)
    model = r.node("LayerDiffApplyModel", 0, group="Model", model=lora.out("MODEL"), clip=lora.out("CLIP"),
                   vae=ckpt.out("VAE"), layerdiff_name=USER_LAYERDIFF, base_weights="model", dtype="auto",
                   device="auto")
    chain = prompt_chain(r, ["a sunny beach with palm trees", "a red beach umbrella on the left",
                             "a golden retriever lying on the sand"])
    layers = generate(r, model, chain, "a golden retriever lying on the sand beside a red beach umbrella on a sunny "
                      "beach with palm trees", seed=11, width=USER_SIZE, height=USER_SIZE, cfg=7.5)
    save_layers(r, layers, 3)
    return r


def recipes() -> list[Recipe]:
    return [
        text_to_layers("01 Text to 2 layers", ["a brick wall", "a large red star"],
                       "a large red star in front of a brick wall", seed=1),
        text_to_layers("02 Text to 3 layers", *SCENE_3, seed=3),
        text_to_layers("03 Text to 4 layers",
                       ["a green meadow", "a large yellow square on the left", "a small red heart on the right",
                        "a small blue triangle at the top"],
                       "a large yellow square on the left, a small red heart on the right and a small blue triangle "
                       "at the top in front of a green meadow", seed=4),
        edit_one_layer(),
        inpaint_layer(),
        restyle_layers(),
        move_reorder_layers(),
        layers_from_images(),
        layers_from_generated_images(),
        cfg_vs_self_mask_guidance(),
        your_checkpoint_to_layers(),
    ]


# ---------------------------------------------------------------------------- the browser part
BUILD_JS = r"""
import { chromium } from 'playwright-core';
import fs from 'fs';
const [port, recipesPath, outDir, chromiumPath] = process.argv.slice(2);
const recipes = JSON.parse(fs.readFileSync(recipesPath, 'utf8'));
const browser = await chromium.launch({ executablePath: chromiumPath,
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'] });
const results = {};
try {
  const ctx = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  await ctx.route('**/*', (r) => { const u = new URL(r.request().url());  // loopback only
    if (['127.0.0.1', 'localhost'].includes(u.hostname) || ['data:', 'blob:'].includes(u.protocol)) return r.continue();
    return r.abort(); });
  const page = await ctx.newPage();
  await page.goto(`http://127.0.0.1:${port}/`, { waitUntil: 'load', timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 120000 });
  await page.waitForTimeout(1500);
  await page.keyboard.press('Escape');
  for (const recipe of recipes) {
    const res = await page.evaluate(async (recipe) => {
      const app = window.app, LG = window.LiteGraph, graph = app.graph;
      graph.clear();
      const byKey = {}, errors = [];
      const TITLE = LG.NODE_TITLE_HEIGHT || 30;
      const colY = recipe.columns.map(() => 40 + TITLE);
      const lastGroup = recipe.columns.map(() => undefined);
      for (const spec of recipe.nodes) {
        const node = LG.createNode(spec.type);
        if (!node) { errors.push(`unknown node type ${spec.type}`); continue; }
        graph.add(node);
        byKey[spec.key] = node;
        if (spec.title) node.title = spec.title;
        for (const [name, value] of Object.entries(spec.widgets)) {
          const w = (node.widgets || []).find((w) => w.name === name);
          if (!w) { errors.push(`${spec.type}: no widget ${name}`); continue; }
          w.value = value;
          w.callback?.(value);
        }
        for (const w of node.widgets || []) {   // reproducible runs: every seed fixed
          if (w.name === 'control_after_generate') w.value = 'fixed';
        }
        if (spec.color) { node.color = spec.color; node.bgcolor = spec.bgcolor; }
        const size = node.computeSize();
        const colWidth = (recipe.columns[spec.col + 1] ?? recipe.columns[spec.col] + 340) - recipe.columns[spec.col];
        const want = spec.size || [Math.min(colWidth - 40, 320), 0];
        node.size = [Math.max(want[0], size[0]), Math.max(want[1], size[1])];
        const newGroup = lastGroup[spec.col] !== undefined && lastGroup[spec.col] !== spec.group;
        const y = colY[spec.col] + (newGroup ? 70 : 0);
        node.pos = [recipe.columns[spec.col] + 20, y];
        colY[spec.col] = y + node.size[1] + TITLE + 20;
        lastGroup[spec.col] = spec.group;
      }
      for (const spec of recipe.nodes) {
        const node = byKey[spec.key];
        for (const [input, [fromKey, slot]] of Object.entries(spec.links)) {
          const src = byKey[fromKey];
          const outSlot = typeof slot === 'number' ? slot : src.outputs.findIndex((o) => o.name === slot);
          const inSlot = node.inputs.findIndex((i) => i.name === input);
          if (outSlot < 0 || inSlot < 0) { errors.push(`${spec.type}.${input} <- ${src.type}.${slot}: no such socket`); continue; }
          if (!src.connect(outSlot, node, inSlot)) errors.push(`${spec.type}.${input} <- ${src.type}.${slot}: refused`);
        }
      }
      for (const g of recipe.groups) {
        const members = g.nodes.map((k) => byKey[k]).filter(Boolean);
        const x0 = Math.min(...members.map((n) => n.pos[0])) - 10;
        const y0 = Math.min(...members.map((n) => n.pos[1] - TITLE)) - 45;
        const x1 = Math.max(...members.map((n) => n.pos[0] + n.size[0])) + 10;
        const y1 = Math.max(...members.map((n) => n.pos[1] + n.size[1])) + 10;
        const group = new LG.LGraphGroup(g.title);
        group.pos = [x0, y0];
        group.size = [x1 - x0, y1 - y0];
        group.color = g.color;
        graph.add(group);
      }
      graph.setDirtyCanvas(true, true);
      // the editor's Export: graphToPrompt().workflow, with the view (extra.ds) that fits the graph
      const xs = graph.nodes.map((n) => [n.pos[0], n.pos[1] - TITLE, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
      const bx0 = Math.min(...xs.map((b) => b[0])) - 60, by0 = Math.min(...xs.map((b) => b[1])) - 80;
      const bx1 = Math.max(...xs.map((b) => b[2])) + 40, by1 = Math.max(...xs.map((b) => b[3])) + 40;
      // the canvas is the page less the side bar (~70 px) and the top bars (~90 px)
      const scale = Math.min(1400 / (bx1 - bx0), 820 / (by1 - by0), 1);
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [-bx0 + 70 / scale, -by0 + 90 / scale];
      app.canvas.setDirty(true, true);
      const p = await app.graphToPrompt();
      p.workflow.extra = p.workflow.extra || {};
      p.workflow.extra.ds = { scale, offset: app.canvas.ds.offset.slice() };
      return { workflow: p.workflow, api: p.output, errors };
    }, recipe);
    await page.waitForTimeout(500);
    await page.screenshot({ path: `${outDir}/${recipe.name}.canvas.png` });
    results[recipe.name] = res;
  }
} finally { await browser.close(); }
fs.writeFileSync(`${outDir}/results.json`, JSON.stringify(results));
"""


def http_json(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as r:
        return json.loads(r.read())


def build(port: int, only: list[str], canvas_dir: Path) -> int:
    todo = [r for r in recipes() if not only or r.name in only]
    definitions = http_json(port, "/object_info")
    with tempfile.TemporaryDirectory() as tmp:
        recipes_path = Path(tmp) / "recipes.json"
        recipes_path.write_text(json.dumps([r.to_json() for r in todo]))
        script = PW_DIR / "layerdiff_build_workflows.mjs"  # beside node_modules: ESM resolves playwright-core there
        script.write_text(BUILD_JS)
        canvas_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["node", str(script), str(port), str(recipes_path), str(canvas_dir), CHROMIUM], check=True,
                       timeout=600)
        results = json.loads((canvas_dir / "results.json").read_text())
    failures = 0
    for recipe in todo:
        res = results[recipe.name]
        if res["errors"]:
            print(f"{recipe.name}: ERRORS {res['errors']}")
            failures += 1
            continue
        ours = wf.to_api(res["workflow"], definitions)
        theirs = res["api"]
        strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
        if strip(ours) != strip(theirs):
            print(f"{recipe.name}: our UI->API conversion differs from the frontend's:\n  ours   {strip(ours)}\n"
                  f"  theirs {strip(theirs)}")
            failures += 1
        path = WORKFLOWS / f"{recipe.name}.json"
        workflow = wf.stamp_pack(res["workflow"], *wf.pack_identity(REPO))
        path.write_text(json.dumps(workflow, indent=2) + "\n")
        if needs_user_files(workflow):
            canvas_thumbnail(canvas_dir / f"{recipe.name}.canvas.png", workflow, path.with_suffix(".jpg"))
        print(f"{path.relative_to(REPO)}: {len(res['workflow']['nodes'])} nodes, {len(res['workflow']['links'])} "
              f"links; canvas screenshot {canvas_dir / (recipe.name + '.canvas.png')}")
    return failures


def needs_user_files(workflow: dict) -> bool:
    """A workflow that runs on the user's own model files (none ship): its thumbnail is its canvas."""
    return any(n["type"] == "LayerDiffApplyModel" for n in workflow["nodes"])


CANVAS_ORIGIN = (64, 77)  # where the graph canvas starts on the page (side bar, top bars; frontend 1.27)


def canvas_thumbnail(screenshot: Path, workflow: dict, out: Path, side: int = 512) -> None:
    """The editor's screenshot cut to the graph (its nodes and groups, placed by the saved view
    extra.ds), square on a dark backdrop."""
    from PIL import Image

    ds = workflow["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]
    boxes += [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in workflow.get("groups", [])]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    left, top = CANVAS_ORIGIN
    page = [left + round((x0 + ox) * scale) - 8, top + round((y0 + oy) * scale) - 8,
            left + round((x1 + ox) * scale) + 8, top + round((y1 + oy) * scale) + 8]
    with Image.open(screenshot) as im:
        view = im.convert("RGB").crop((max(page[0], 0), max(page[1], 0), min(page[2], im.width),
                                       min(page[3], im.height)))
    factor = side / max(view.size)
    view = view.resize((max(1, round(view.width * factor)), max(1, round(view.height * factor))), Image.LANCZOS)
    square = Image.new("RGB", (side, side), (32, 32, 32))
    square.paste(view, ((side - view.width) // 2, (side - view.height) // 2))
    square.save(out, quality=90, optimize=True)
    print(f"{out}: thumbnail from the editor canvas (the workflow needs the user's model files)")


# ---------------------------------------------------------------------------- inputs and snapshot
def write_example_inputs() -> None:
    """The Load Image workflow's inputs: a toy-world scene rendered as RGB background + RGBA layers."""
    import numpy as np
    from PIL import Image

    from layerdiff.data.toy import ToyObject, ToySpec, render_from_spec

    spec = ToySpec("wooden floor", (ToyObject("heart", "orange", "large", "left"),
                                    ToyObject("triangle", "green", "small", "right")))
    sample = render_from_spec(spec, size=SIZE, rng=2)
    INPUTS.mkdir(parents=True, exist_ok=True)
    sample.background.convert("RGB").save(INPUTS / INPUT_FILES[0], optimize=True)
    for name, fg, mask in zip(INPUT_FILES[1:], sample.foregrounds, sample.masks):
        rgba = np.concatenate([np.asarray(fg.convert("RGB")), np.asarray(mask.convert("L"))[..., None]], axis=-1)
        Image.fromarray(rgba, "RGBA").save(INPUTS / name, optimize=True)
    print(f"wrote {', '.join(INPUT_FILES)} in {INPUTS.relative_to(REPO)} (toy scene: {spec.global_prompt})")


def comfyui_version() -> str:
    text = (COMFY_DIR / "comfyui_version.py").read_text() if (COMFY_DIR / "comfyui_version.py").is_file() else ""
    version = next((ln.split("=")[1].strip().strip("\"'") for ln in text.splitlines() if "__version__" in ln), "?")
    commit = subprocess.run(["git", "-C", str(COMFY_DIR), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"{version} ({commit or 'no git'})"


def frontend_version() -> str:
    """The comfyui-frontend-package version the checkout pins (requirements.txt)."""
    req = COMFY_DIR / "requirements.txt"
    for line in req.read_text().splitlines() if req.is_file() else []:
        if line.startswith("comfyui-frontend-package"):
            return line.split("==")[-1].strip()
    return "?"


def write_snapshot(port: int) -> None:
    """The definitions of the core nodes the shipped workflows use, from the live /object_info."""
    info = http_json(port, "/object_info")
    used = sorted({n["type"] for p in wf.workflow_files(WORKFLOWS) for n in wf.load(p)["nodes"]})
    core = [t for t in used if t not in wf.FRONTEND_ONLY and not t.startswith("LayerDiff")]
    keep = ("input", "input_order", "output", "output_name", "output_is_list", "output_node", "python_module",
            "category", "display_name")
    snapshot = {
        "about": "ComfyUI core node definitions used by example_workflows/, from /object_info "
                 "(written by tools/build_workflows.py). Frontend-only nodes (Note, MarkdownNote) are in "
                 "tools/workflow_format.FRONTEND_ONLY.",
        "comfyui_version": comfyui_version(),
        "frontend_version": frontend_version(),
        "nodes": {t: wf.without_machine_choices(t, {k: info[t][k] for k in keep if k in info[t]}) for t in core},
    }
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(snapshot, indent=1) + "\n")
    print(f"wrote {SNAPSHOT.relative_to(REPO)}: {', '.join(core)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True, help="port of a running ComfyUI with this pack")
    ap.add_argument("--only", nargs="*", default=[], help="workflow names (default: all)")
    ap.add_argument("--canvas-dir", type=Path, default=Path(tempfile.gettempdir()) / "layerdiff_workflow_canvas",
                    help="where the editor screenshots go")
    ap.add_argument("--no-inputs", action="store_true", help="keep example_workflows/input/ as it is")
    args = ap.parse_args(argv)
    if not args.no_inputs:
        write_example_inputs()
    failures = build(args.port, args.only, args.canvas_dir)
    write_snapshot(args.port)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
