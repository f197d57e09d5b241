"""Regenerate the thumbnails of the shipped workflows from real runs on a real ComfyUI.

Every example_workflows/NAME.json is converted to the API format, queued on the server exactly as
shipped (only its output files go to a private subfolder, removed afterwards), and its saved images
are laid out into example_workflows/NAME.jpg: the template browser of the ComfyUI frontend
(comfyui-frontend-package 1.27) shows a custom-node template as NAME.jpg beside NAME.json. The
measured run times and the workflow table of example_workflows/README.md are refreshed too.

    python tools/make_workflow_thumbnails.py                 # starts a private server, stops it
    python tools/make_workflow_thumbnails.py --only "05 Edit one layer"
    python tools/make_workflow_thumbnails.py --running --port 8231 --base-directory BASE   # a server already running

The private server is the one of the real-ComfyUI tests (tests/comfy_private.py): its own base
directory with only this pack, a free loopback port, COMFY_EXTRA_ARGS appended to its command line.
A running server's files are read from its base directory (--base-directory; default the ComfyUI
checkout, for a server started without one); tools/comfy_run.py starts one that keeps running.
Run it again when the built-in model's weights change. Needs the ComfyUI checkout and its venv
(COMFYUI_DIR / COMFY_VENV) and Pillow here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_run as cr  # noqa: E402
import workflow_format as wf  # noqa: E402

SIDE = 512  # template thumbnails are square (core templates: 300-1024 px)
GAP = 6
BACKDROP = (32, 32, 32)
README = cr.WORKFLOWS / "README.md"  # a section for the top README: its links are relative to the repository root
FOLDER_LINK = cr.WORKFLOWS.name
TABLE_START, TABLE_END = "<!-- workflow-table:start -->", "<!-- workflow-table:end -->"

# What each thumbnail shows: a "hero" image with tiles around it, or rows of images, by the titles
# of the workflow's Save Image nodes. A workflow not listed shows its Save Image nodes as rows.
LAYOUTS = {
    "01 Text to 2 layers": ("hero", ["Save composite"], ["Save layers (transparent PNGs)"]),
    "02 Text to 3 layers": ("hero", ["Save composite"], ["Save layers (transparent PNGs)"]),
    "03 Text to 4 layers": ("hero", ["Save composite"], ["Save layers (transparent PNGs)"]),
    "05 Edit one layer": ("rows", ["Save before | after"], ["Save layers (transparent PNGs)"]),
    "06 Inpaint part of a layer": ("rows", ["Save before | after"], ["Save layers (transparent PNGs)"]),
    "08 Move and reorder layers": ("rows", ["Save before | after"], ["Save layers (transparent PNGs)"]),
    "09 Layers from your images": ("rows", ["Save before | after"], ["Save layers (transparent PNGs)"]),
    "10 Layers from generated images": ("rows", ["Save before | after"], ["Save layers (transparent PNGs)"]),
    "07 Restyle layers": ("rows", ["Save original | background | all"]),
    "04 CFG vs self-mask guidance": ("rows", ["Save comparison"]),
}


# ---------------------------------------------------------------------------- images
def checkerboard(size: tuple[int, int], cell: int = 8) -> Image.Image:
    w, h = size
    board = Image.new("RGB", size, (204, 204, 204))
    for y in range(0, h, cell):
        for x in range((y // cell) % 2 * cell, w, 2 * cell):
            board.paste((255, 255, 255), (x, y, min(x + cell, w), min(y + cell, h)))
    return board


def flatten(image: Image.Image) -> Image.Image:
    """RGBA over a checkerboard (transparency visible); RGB as is."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    board = checkerboard(image.size, max(4, image.width // 16))
    board.paste(image, mask=image.getchannel("A"))
    return board


def scaled(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit into width x height keeping the aspect; whole-number upscales stay pixel-sharp."""
    factor = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    whole = factor >= 1 and abs(factor - round(factor)) < 1e-6
    return image.resize(size, Image.NEAREST if whole else Image.LANCZOS)


def hero_layout(hero: Image.Image, tiles: list[Image.Image]) -> Image.Image:
    """3x3 cells: the hero over the top-left 2x2, up to five tiles in the right column and bottom row."""
    cell = (SIDE - 2 * GAP) // 3
    canvas = Image.new("RGB", (SIDE, SIDE), BACKDROP)
    big = scaled(flatten(hero), 2 * cell + GAP, 2 * cell + GAP)
    canvas.paste(big, (0, 0))
    slots = [(2, 0), (2, 1), (0, 2), (1, 2), (2, 2)]
    for (cx, cy), tile in zip(slots, tiles):
        canvas.paste(scaled(flatten(tile), cell, cell), (cx * (cell + GAP), cy * (cell + GAP)))
    return canvas


def rows_layout(rows: list[list[Image.Image]]) -> Image.Image:
    """Each row side by side, scaled to the thumbnail's width; the rows centred in the square."""
    strips = []
    for row in rows:
        if not row:
            continue
        images = [flatten(i) for i in row]
        h = max(i.height for i in images)
        strip = Image.new("RGB", (sum(i.width for i in images) + GAP * (len(images) - 1), h), BACKDROP)
        x = 0
        for i in images:
            strip.paste(i, (x, 0))
            x += i.width + GAP
        strips.append(scaled(strip, SIDE, SIDE))
    total = sum(s.height for s in strips) + GAP * (len(strips) - 1)
    if total > SIDE:  # too tall together: shrink every row alike
        strips = [scaled(s, SIDE, max(1, s.height * (SIDE - GAP * (len(strips) - 1)) // total)) for s in strips]
        total = sum(s.height for s in strips) + GAP * (len(strips) - 1)
    canvas = Image.new("RGB", (SIDE, SIDE), BACKDROP)
    y = (SIDE - total) // 2
    for s in strips:
        canvas.paste(s, ((SIDE - s.width) // 2, y))
        y += s.height + GAP
    return canvas


# ---------------------------------------------------------------------------- runs
def images_by_title(server: cr.Server, workflow: dict, entry: dict) -> dict[str, list[Image.Image]]:
    out = {}
    for node in workflow["nodes"]:
        if node["type"] == "SaveImage":
            files = server.output_files(entry, str(node["id"]))
            out[node.get("title") or "Save Image"] = [Image.open(f).copy() for f in files]
    return out


def thumbnail(name: str, saved: dict[str, list[Image.Image]]) -> Image.Image:
    kind, *groups = LAYOUTS.get(name, ("rows", *[[t] for t in saved]))
    picked = [[img for title in titles for img in saved.get(title, [])] for titles in groups]
    if kind == "hero" and picked[0]:
        return hero_layout(picked[0][0], picked[1] if len(picked) > 1 else [])
    return rows_layout(picked)


def note_text(workflow: dict) -> str:
    return next((n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in wf.FRONTEND_ONLY), "")


def update_readme(rows: list[tuple[str, str, float]], version: str) -> None:
    if not README.is_file():
        return
    text = README.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        print(f"{README}: no {TABLE_START} ... {TABLE_END} markers; table not updated")
        return
    known = {}  # keep the rows of workflows not run this time
    head, rest = text.split(TABLE_START, 1)
    old, tail = rest.split(TABLE_END, 1)
    for line in old.splitlines():
        if line.startswith("| [`"):
            known[line.split("`")[1].removesuffix(".json")] = line
    for name, note, seconds in rows:
        link = urllib.parse.quote(name)  # titles have spaces
        known[name] = (f"| [`{name}.json`]({FOLDER_LINK}/{link}.json) | <img src=\"{FOLDER_LINK}/{link}.jpg\" "
                       f"width=\"160\"> | {note} | {seconds:.1f} s |")
    order = [p.stem for p in wf.workflow_files(cr.WORKFLOWS)]  # the titles' numbers give the order
    table = [f"Run times: one cold run each (caches cleared, model load included) on a 2-core CPU, ComfyUI "
             f"{version}, {time.strftime('%Y-%m-%d')}.", "",
             "| workflow | output | what it does | time |", "|---|---|---|---|"]
    table += [known[n] for n in order if n in known]
    README.write_text(head + TABLE_START + "\n" + "\n".join(table) + "\n" + TABLE_END + tail)
    print(f"updated the table in {README}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=None,
                    help="the running server's port (with --running), else the private server's (default: a free one)")
    ap.add_argument("--running", action="store_true", help="use the server already running on --port")
    ap.add_argument("--base-directory", type=Path, default=None,
                    help="with --running: that server's base directory (default: the ComfyUI checkout)")
    ap.add_argument("--only", nargs="*", default=[], help="workflow names (default: all)")
    args = ap.parse_args(argv)
    if args.running and args.port is None:
        ap.error("--running needs --port")
    with contextlib.ExitStack() as stack:
        if args.running:
            server = cr.Server(args.port, args.base_directory)
        else:
            reason = cr.host_skip_reason()
            if reason:
                print(reason, file=sys.stderr)
                return 1
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="layerdiff-thumbs-")))
            server = stack.enter_context(cr.private_server(base, port=args.port))
        rows, failures = run_all(server, args.only)
    update_readme(rows, cr.comfyui_version())
    print(json.dumps({name: round(s, 1) for name, _, s in rows}, indent=1))
    return 1 if failures else 0


def run_all(server: cr.Server, only: list[str]) -> tuple[list[tuple[str, str, float]], int]:
    """Run the workflows (all, or those named in ``only``) and save their thumbnails: (table rows, failures)."""
    run_id = cr.new_run_id("layerdiff_thumbs")
    rows, failures = [], 0
    try:
        with cr.ExampleInputs(server.folders()["input"]):
            files = {p.stem: p for p in wf.workflow_files(cr.WORKFLOWS)}
            for path in [files[n] for n in LAYOUTS if n in files] + [p for n, p in files.items() if n not in LAYOUTS]:
                if only and path.stem not in only:
                    continue
                workflow = wf.load(path)
                if any(n["type"] == "LayerDiffApplyModel" for n in workflow["nodes"]):
                    print(f"{path.stem}: needs the user's model files; its thumbnail is the editor canvas "
                          "(tools/build_workflows.py)")
                    continue
                entry, seconds, _ = server.run_workflow(path, run_id)
                if entry["status"]["status_str"] != "success":
                    print(f"{path.stem}: FAILED after {seconds:.1f}s\n{cr.error_text(entry)}")
                    failures += 1
                    continue
                image = thumbnail(path.stem, images_by_title(server, workflow, entry))
                image.save(path.with_suffix(".jpg"), quality=90, optimize=True)
                rows.append((path.stem, note_text(workflow), seconds))
                print(f"{path.stem}: {seconds:.1f}s -> {path.with_suffix('.jpg').relative_to(cr.REPO)}", flush=True)
    finally:
        for kind in ("output", "temp"):
            shutil.rmtree(server.folders()[kind] / run_id, ignore_errors=True)
    return rows, failures

if __name__ == "__main__":
    sys.exit(main())
