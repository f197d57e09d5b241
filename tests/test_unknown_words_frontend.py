"""Unknown prompt words reach the user in the real ComfyUI frontend (headless Chromium): a queued
workflow whose prompts hold words the model does not know ("pink hexagon") shows a warning toast naming
them and keeps the line on the Prompt Enhancer (web/unknown_words.js), without saving it; a workflow
whose prompts are all known shows none; `executed` messages without text, or for nodes not in the graph,
change nothing.

Needs what tests/test_psd_upload_frontend.py needs: a ComfyUI checkout with its venv (COMFYUI_DIR /
COMFY_VENV), Chromium (CHROMIUM), node and playwright-core (COMFY_PW_DIR); skipped otherwise. The server
is private (tests/comfy_private.py: its own --base-directory, only this pack under custom_nodes, a free
loopback port, COMFY_EXTRA_ARGS appended) and is stopped at the end. Run with
``pytest -m comfyui tests/test_unknown_words_frontend.py -s`` to see the timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

pytestmark = pytest.mark.comfyui

from comfy_private import CHROMIUM, OPEN_PAGE_JS, PW_DIR, browser_skip_reason, private_server  # noqa: E402

_reason = browser_skip_reason("diffusers, einops")
if _reason:
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI on 127.0.0.1 with a private base directory holding only this pack (started here,
    stopped here: nothing of the shared checkout is changed)."""
    with private_server(tmp_path_factory.mktemp("comfy_base"), "LayerDiffPromptEnhancer") as srv:
        yield srv


def text_to_layers(background: str, foreground: str, global_prompt: str) -> dict:
    """Load LayerDiff -> Layer Prompt x2 -> Prompt Enhancer -> Layered KSampler -> Composite Layers ->
    Preview Image, in ComfyUI's API format (input names as in nodes/*.py INPUT_TYPES)."""
    return {
        "1": {"class_type": "LayerDiffLoader", "inputs": {
            "model_name": "layerdiff-toy", "base_checkpoint": "none", "dtype": "auto", "device": "auto"}},
        "2": {"class_type": "LayerDiffLayerPrompt", "inputs": {"prompt": background}},
        "3": {"class_type": "LayerDiffLayerPrompt", "inputs": {"prompt": foreground, "previous": ["2", 0]}},
        "4": {"class_type": "LayerDiffPromptEnhancer", "inputs": {
            "model": ["1", 0], "prompts": ["3", 0], "global_prompt": global_prompt, "negative_prompt": ""}},
        "5": {"class_type": "LayerDiffKSampler", "inputs": {
            "model": ["1", 0], "conditioning": ["4", 0], "seed": 1, "steps": 2, "cfg": 3.0, "mask_guidance": 0.75,
            "mask_guidance_start": 0.25, "sampler_name": "ddim", "scheduler": "normal", "width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "LayerDiffCompositeLayers", "inputs": {"layers": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


UNKNOWN = text_to_layers("a brick wall", "a pink hexagon", "a pink hexagon in front of a brick wall")
KNOWN = text_to_layers("a brick wall", "a red star", "a red star in front of a brick wall")

# Opens the editor, then for each workflow: load it (API format), queue it, wait for it to finish and
# read the toasts on screen and the notes on the nodes; between the two, `executed` messages without
# text or for nodes the graph lacks are fed to the page. Prints one JSON object with what it saw.
BROWSER_JS = r"""
const args = JSON.parse(process.argv[2]);

const toastTexts = () => Array.from(document.querySelectorAll('.p-toast-message'), (e) => e.innerText);

async function run(page, workflow, expectToast) {
  await page.evaluate(async (wf) => {
    window.app.extensionManager.toast.removeAll();
    window.app.loadApiJson(wf, 'unknown_words.json');
    const api = window.comfyAPI.api.api;
    window.layerdiffDone = new Promise((resolve) => {
      const finished = ({ detail }) => {
        for (const type of ['execution_success', 'execution_error']) api.removeEventListener(type, finished);
        resolve(detail);
      };
      for (const type of ['execution_success', 'execution_error']) api.addEventListener(type, finished);
    });
  }, workflow);
  await page.waitForFunction(() => !document.querySelector('.p-toast-message'), null, { timeout: 10000 });
  const [queued] = await Promise.all([  // queuePrompt's own answer is false even when the prompt is accepted
    page.waitForResponse((r) => r.url().endsWith('/prompt') && r.request().method() === 'POST', { timeout: 30000 }),
    page.evaluate(async () => await window.app.queuePrompt(0, 1)),
  ]);
  const seen = { queued: { status: queued.status(), body: await queued.json() } };
  seen.finished = await page.evaluate(async () => {
    const detail = await window.layerdiffDone;
    return { ok: !detail.exception_message, error: detail.exception_message ?? null };
  });
  if (expectToast) {
    await page.waitForFunction(() => Array.from(document.querySelectorAll('.p-toast-message'))
      .some((e) => /pink/.test(e.innerText) && /hexagon/.test(e.innerText)), null, { timeout: 10000 });
  } else {
    await page.waitForTimeout(1000);  // a toast comes with the node's `executed`, before execution_success
  }
  seen.toasts = await page.evaluate(toastTexts);
  seen.nodes = await page.evaluate(() => {
    const nodes = {};
    for (const node of window.app.graph.nodes) nodes[node.id] = { type: node.type, note: node.layerdiffUnknownWords ?? null };
    const saved = window.app.graph.serialize();
    return { nodes, widgetsValues: Object.fromEntries(saved.nodes.map((n) => [n.id, n.widgets_values ?? null])),
             savedText: JSON.stringify(saved) };
  });
  return seen;
}

(async () => {
  const { context, page, seen } = await openPage(args);
  try {
    await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas && window.app.extensionManager,
                               null, { timeout: 120000 });
    seen.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));

    seen.unknown = await run(page, args.unknown, true);
    if (args.screenshot) await page.screenshot({ path: args.screenshot });

    seen.odd = await page.evaluate(async () => {  // messages the extension must shrug off
      window.app.extensionManager.toast.removeAll();
      const api = window.comfyAPI.api.api;
      const messages = [
        { node: '4', display_node: '4', output: null, prompt_id: 'x' },
        { node: '4', display_node: '4', output: {}, prompt_id: 'x' },
        { node: '4', display_node: '4', output: { text: [] }, prompt_id: 'x' },
        { node: '7', display_node: '7', output: { images: [] }, prompt_id: 'x' },
        { node: '999', display_node: '999', output: { text: ['words the model does not know: ghost'] }, prompt_id: 'x' },
        { node: '999:3', output: { text: ['words the model does not know: ghost'] }, prompt_id: 'x' },
        { node: '7', display_node: '7', output: { text: ['not ours: ghost'] }, prompt_id: 'x' },
      ];
      for (const detail of messages) api.dispatchEvent(new CustomEvent('executed', { detail }));
      await new Promise((resolve) => setTimeout(resolve, 500));
      return { toasts: Array.from(document.querySelectorAll('.p-toast-message'), (e) => e.innerText),
               note: window.app.graph.getNodeById(4).layerdiffUnknownWords ?? null };
    });

    seen.known = await run(page, args.known, false);
  } finally {
    await context.close();
  }
  console.log(JSON.stringify(seen));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_unknown_words_toast_in_the_frontend(server, tmp_path):
    t0 = time.time()
    script = tmp_path / "unknown_words.cjs"
    script.write_text(OPEN_PAGE_JS + BROWSER_JS)
    args = {"url": server["url"], "chromium": str(CHROMIUM), "profile": str(tmp_path / "profile"),
            "unknown": UNKNOWN, "known": KNOWN, "screenshot": os.environ.get("LAYERDIFF_UNKNOWN_WORDS_SCREENSHOT", "")}
    env = dict(os.environ, PLAYWRIGHT_CORE=str(PW_DIR / "node_modules" / "playwright-core"))
    done = subprocess.run(["node", str(script), json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + server["log"].read_text()[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    assert "LayerDiff.UnknownWords" in seen["extensions"]
    unknown, known, odd = seen["unknown"], seen["known"], seen["odd"]
    for run in (unknown, known):
        assert run["queued"]["status"] == 200 and not run["queued"]["body"]["node_errors"], run["queued"]
        assert run["finished"]["ok"], run["finished"]

    (toast,) = [t for t in unknown["toasts"] if "pink" in t and "hexagon" in t]  # one toast: Prompt Enhancer's line
    assert "Prompt Enhancer" in toast and "does not know" in toast, toast
    notes = {nid: n["note"] for nid, n in unknown["nodes"]["nodes"].items() if n["note"]}
    assert list(notes) == ["4"] and "pink" in notes["4"] and "hexagon" in notes["4"], notes
    assert unknown["nodes"]["widgetsValues"]["4"] == ["a pink hexagon in front of a brick wall", ""]
    assert "does not know" not in unknown["nodes"]["savedText"]  # shown, never saved with the workflow

    assert odd == {"toasts": [], "note": notes["4"]}, odd  # no text, no node, not ours: nothing shown

    assert not any("does not know" in t or "unknown prompt words" in t for t in known["toasts"]), known["toasts"]
    assert not any(n["note"] for n in known["nodes"]["nodes"].values()), known["nodes"]["nodes"]

    ours = [e for e in seen["pageErrors"] + seen["consoleErrors"] if "unknown_words" in e or "LayerDiff" in e]
    assert not ours, ours  # (frontend 1.27.10 throws one error of its own at start-up, in its settings store)
    print(f"browser session with two prompt runs: {time.time() - t0:.1f}s")
