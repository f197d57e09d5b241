"""Load PSD as Layers fed from the real ComfyUI frontend in headless Chromium: a PSD copied into the
input folder shows up after a refresh; one dropped on the node and one picked with the node's upload
button (web/psd_upload.js) land in the input folder and are selected in the combo; the choice survives
a save and reload of the workflow, and the queued prompt loads that PSD.

Needs a ComfyUI checkout with its venv (COMFYUI_DIR / COMFY_VENV, default ~/.cache/comfyui-host/ComfyUI
and the venv beside it), Chromium (CHROMIUM, default /usr/bin/chromium), node and playwright-core
(COMFY_PW_DIR, default the `pw` folder beside the checkout); skipped otherwise. The server is private
(tests/comfy_private.py): its own --base-directory (input, output, user settings, an in-memory
database) with only this pack under custom_nodes, on a free loopback port, COMFY_EXTRA_ARGS appended.
Run with ``pytest -m comfyui tests/test_psd_upload_frontend.py -s`` to see the timings;
LAYERDIFF_PSD_UPLOAD_SCREENSHOT=PNG saves the page after the upload.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.comfyui
pytest.importorskip("psd_tools")

from comfy_private import CHROMIUM, OPEN_PAGE_JS, PW_DIR, browser_skip_reason, private_server  # noqa: E402

_reason = browser_skip_reason("diffusers, psd_tools, einops")
if _reason:
    pytest.skip(_reason, allow_module_level=True)


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI on 127.0.0.1 with a private base directory holding only this pack (started here,
    stopped here: nothing of the shared checkout is changed)."""
    with private_server(tmp_path_factory.mktemp("comfy_base"), "LayerDiffLoadPSD") as srv:
        yield srv


def small_psd(path: Path, seed: int) -> Path:
    from layerdiff.io.psd import save_psd
    from layerdiff.stack import LayerStack

    g = torch.Generator().manual_seed(seed)
    stack = LayerStack(images=torch.rand(1, 3, 24, 32, 3, generator=g), masks=torch.rand(1, 2, 24, 32, generator=g),
                       names=("background", "star", "circle"), prompts=("", "", ""))
    return save_psd(stack, path)


# Load PSD as Layers -> Composite Layers -> Preview Image, as the editor saves it (UI format).
WORKFLOW = {
    "last_node_id": 3, "last_link_id": 2,
    "nodes": [
        {"id": 1, "type": "LayerDiffLoadPSD", "pos": [40, 60], "size": [340, 110], "flags": {}, "order": 0,
         "mode": 0, "inputs": [], "outputs": [{"name": "layers", "type": "LAYERDIFF_LAYERS", "links": [1]}],
         "properties": {}, "widgets_values": []},
        {"id": 2, "type": "LayerDiffCompositeLayers", "pos": [420, 60], "size": [240, 50], "flags": {}, "order": 1,
         "mode": 0, "inputs": [{"name": "layers", "type": "LAYERDIFF_LAYERS", "link": 1}],
         "outputs": [{"name": "image", "type": "IMAGE", "links": [2]}], "properties": {}, "widgets_values": []},
        {"id": 3, "type": "PreviewImage", "pos": [700, 60], "size": [240, 250], "flags": {}, "order": 2, "mode": 0,
         "inputs": [{"name": "images", "type": "IMAGE", "link": 2}], "outputs": [], "properties": {},
         "widgets_values": []},
    ],
    "links": [[1, 1, 0, 2, 0, "LAYERDIFF_LAYERS"], [2, 2, 0, 3, 0, "IMAGE"]],
    "groups": [], "config": {}, "extra": {}, "version": 0.4,
}

# Drives the page like a user: load the workflow; copy a PSD into input/ and refresh; drag a PSD from
# the desktop onto the node; click the node's upload button on the canvas and pick a PSD in the file
# chooser; save and reopen the workflow; queue it. Prints one JSON object with what it saw.
BROWSER_JS = r"""
const fs = require('fs');
const path = require('path');
const args = JSON.parse(process.argv[2]);
const comboValue = () => window.app.graph.getNodeById(1).widgets[0].value;

(async () => {
  let chooserShown;  // file choosers intercepted from the start: enabled only around the click, interception can come too late
  const { context, page, seen } = await openPage(args, (p) => {
    chooserShown = new Promise((resolve) => p.once('filechooser', resolve));
  });
  try {
    await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas, null, { timeout: 120000 });
    seen.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));

    seen.loaded = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf, true, false);
      const node = window.app.graph.getNodeById(1);
      return { widgets: node.widgets.map((w) => [w.name, w.type]), values: [...node.widgets[0].options.values] };
    }, args.workflow);

    fs.copyFileSync(args.copied, path.join(args.inputDir, path.basename(args.copied)));
    seen.afterRefresh = await page.evaluate(async () => {
      await window.app.refreshComboInNodes();
      return [...window.app.graph.getNodeById(1).widgets[0].options.values];
    });

    const target = await page.evaluate(() => {  // the upload button's centre on screen
      const app = window.app;
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [0, 0];
      app.canvas.draw(true, true);
      const node = app.graph.getNodeById(1);
      const button = node.widgets.find((w) => w.type === 'button');
      const height = button.computedHeight || 20;
      const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2,
                                                          node.pos[1] + button.y + height / 2]);
      const rect = app.canvasEl.getBoundingClientRect();
      return { x: rect.left + x, y: rect.top + y, label: button.label };
    });
    seen.button = target;

    // Dropped from the desktop onto the node, with no MIME type (what browsers give a .psd).
    const dragged = { bytes: fs.readFileSync(args.dragged).toString('base64'), name: path.basename(args.dragged),
                      x: target.x, y: target.y };
    await page.evaluate(({ bytes, name, x, y }) => {
      const transfer = new DataTransfer();
      transfer.items.add(new File([Uint8Array.from(atob(bytes), (c) => c.charCodeAt(0))], name, { type: '' }));
      const init = { dataTransfer: transfer, clientX: x, clientY: y, bubbles: true, cancelable: true };
      window.app.canvasEl.dispatchEvent(new DragEvent('dragover', init));
      window.app.canvasEl.dispatchEvent(new DragEvent('drop', init));
    }, dragged);
    await page.waitForFunction((name) => window.app.graph.getNodeById(1).widgets[0].value === name,
                               dragged.name, { timeout: 30000 });
    seen.afterDrop = await page.evaluate(comboValue);

    await page.mouse.click(target.x, target.y);
    const chooser = await Promise.race([chooserShown, page.waitForTimeout(15000)]);
    if (!chooser) throw new Error('no file chooser opened within 15 s of clicking the upload button');
    seen.accept = await chooser.element().getAttribute('accept');
    await chooser.setFiles(args.uploaded);
    await page.waitForFunction((name) => window.app.graph.getNodeById(1).widgets[0].value === name,
                               path.basename(args.uploaded), { timeout: 30000 });
    seen.afterUpload = await page.evaluate(comboValue);
    if (args.screenshot) await page.screenshot({ path: args.screenshot });

    seen.reloaded = await page.evaluate(async () => {  // save the workflow and open it again
      const saved = JSON.parse(JSON.stringify(window.app.graph.serialize()));
      await window.app.loadGraphData(saved, true, false);
      const node = window.app.graph.getNodeById(1);
      return { widgetsValues: saved.nodes.find((n) => n.id === 1).widgets_values, value: node.widgets[0].value,
               buttons: node.widgets.filter((w) => w.type === 'button').length };
    });
    seen.apiPrompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    const [queued] = await Promise.all([  // queuePrompt's own answer is false even when the prompt is accepted
      page.waitForResponse((r) => r.url().endsWith('/prompt') && r.request().method() === 'POST', { timeout: 30000 }),
      page.evaluate(async () => await window.app.queuePrompt(0, 1)),
    ]);
    seen.queued = { status: queued.status(), body: await queued.json() };
  } finally {
    await context.close();
  }
  console.log(JSON.stringify(seen));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_psd_upload_button_and_refresh_in_the_frontend(server, tmp_path):
    t0 = time.time()
    sources = tmp_path / "psd"
    sources.mkdir()
    copied = small_psd(sources / "copied.psd", seed=1)
    dragged = small_psd(sources / "dragged.psd", seed=2)
    uploaded = small_psd(sources / "uploaded.psd", seed=3)
    input_dir = server["base"] / "input"
    script = tmp_path / "psd_upload.cjs"
    script.write_text(OPEN_PAGE_JS + BROWSER_JS)
    args = {"url": server["url"], "chromium": str(CHROMIUM), "profile": str(tmp_path / "profile"),
            "workflow": WORKFLOW, "inputDir": str(input_dir), "copied": str(copied), "dragged": str(dragged),
            "uploaded": str(uploaded), "screenshot": os.environ.get("LAYERDIFF_PSD_UPLOAD_SCREENSHOT", "")}
    env = dict(os.environ, PLAYWRIGHT_CORE=str(PW_DIR / "node_modules" / "playwright-core"))
    done = subprocess.run(["node", str(script), json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    browser_s = time.time() - t0

    assert "LayerDiff.PsdUpload" in seen["extensions"]
    assert seen["loaded"]["widgets"] == [["psd", "combo"], ["psd_upload", "button"]]
    assert seen["loaded"]["values"] == []
    assert seen["afterRefresh"] == ["copied.psd"]  # a file copied into input/ is listed after a refresh
    assert seen["button"]["label"] == "choose .psd/.psb to upload"
    assert seen["accept"] == ".psd,.psb"
    assert seen["afterDrop"] == "dragged.psd" and seen["afterUpload"] == "uploaded.psd"
    for source in (dragged, uploaded):  # both landed in input/, byte for byte
        assert (input_dir / source.name).read_bytes() == source.read_bytes()
    assert seen["reloaded"] == {"widgetsValues": ["uploaded.psd"], "value": "uploaded.psd", "buttons": 1}
    assert seen["apiPrompt"]["1"] == {"class_type": "LayerDiffLoadPSD", "inputs": {"psd": "uploaded.psd"},
                                      "_meta": {"title": "Load PSD as Layers"}}
    assert seen["queued"]["status"] == 200 and not seen["queued"]["body"]["node_errors"], seen["queued"]
    ours = [e for e in seen["pageErrors"] + seen["consoleErrors"] if "psd_upload" in e or "LayerDiff" in e]
    assert not ours, ours  # (frontend 1.27.10 throws one error of its own at start-up, in its settings store)

    prompt_id = seen["queued"]["body"]["prompt_id"]
    end = time.time() + 120
    while (entry := http_json(f"{server['url']}/history/{prompt_id}").get(prompt_id)) is None \
            or entry["status"].get("completed") is None:
        assert time.time() < end, f"prompt {prompt_id} did not finish in 120 s"
        time.sleep(0.2)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert entry["prompt"][2]["1"]["inputs"] == {"psd": "uploaded.psd"}
    (image,) = entry["outputs"]["3"]["images"]
    preview = np.asarray(Image.open(server["base"] / image["type"] / image["subfolder"] / image["filename"]))
    from layerdiff.io.psd import load_psd

    expected = load_psd(uploaded).composite()[0].numpy() * 255
    assert preview.shape == (24, 32, 3)
    assert np.abs(preview.astype(np.float32) - expected).max() <= 1.0  # the uploaded file's layers, composited
    print(f"browser session {browser_s:.1f}s, prompt run included: {time.time() - t0:.1f}s")
