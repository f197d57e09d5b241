"""A private ComfyUI server for the real-host tests: the checkout and venv of comfy_host.sh (or
COMFYUI_DIR / COMFY_VENV), its own --base-directory with only this pack under custom_nodes, an
in-memory database and a free loopback port; started and stopped by the test, so nothing of the shared
checkout changes. Also the skip reasons when the host, its packages or the browser tools are missing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or os.environ.get("COMFY_DIR")
                 or Path.home() / ".cache" / "comfyui-host" / "ComfyUI")
COMFY_VENV = Path(os.environ.get("COMFY_VENV") or COMFY_DIR.parent / "venv")
PW_DIR = Path(os.environ.get("COMFY_PW_DIR") or COMFY_DIR.parent / "pw")
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
PACK = "comfyui-layerdiff"  # the pack's folder name under the private custom_nodes/


def host_skip_reason(modules: str = "diffusers, psd_tools, einops") -> str | None:
    """Why a real-ComfyUI test cannot run here (None: it can): checkout, venv, the pack's packages."""
    if not (COMFY_DIR / "main.py").is_file():
        return f"no ComfyUI checkout at {COMFY_DIR} (set COMFYUI_DIR)"
    python = COMFY_VENV / "bin" / "python"
    if not python.is_file():
        return f"no ComfyUI venv at {COMFY_VENV} (set COMFY_VENV)"
    if subprocess.run([str(python), "-c", f"import {modules}"], capture_output=True).returncode:
        return (f"the ComfyUI venv lacks the pack's requirements: {COMFY_VENV}/bin/pip install -r {REPO}/requirements.txt "
                f"&& {COMFY_VENV}/bin/python {REPO}/install.py")
    return None


def browser_skip_reason(modules: str = "diffusers, psd_tools, einops") -> str | None:
    """host_skip_reason, plus Chromium, node and playwright-core for driving the frontend."""
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if not shutil.which("node"):
        return "no node on PATH (apt-get install nodejs)"
    if not (PW_DIR / "node_modules" / "playwright-core").is_dir():
        return f"no playwright-core in {PW_DIR} (npm install --prefix {PW_DIR} playwright-core, or set COMFY_PW_DIR)"
    return host_skip_reason(modules)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def private_server(base: Path, ready_node: str):
    """Start ComfyUI in ``base`` (made here: custom_nodes/ with this pack, input/, user settings); yield
    {"url", "port", "base", "log"} once /object_info/<ready_node> answers; stop it on exit."""
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no template browser over the canvas
    port = free_port()
    log = base / "comfyui.log"
    t0 = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(COMFY_VENV / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(base),
             "--database-url", "sqlite:///:memory:", "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK],
            cwd=COMFY_DIR, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited during start-up (code {proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/object_info/{ready_node}", timeout=60) as r:
                    info = json.loads(r.read())
                break
            except (OSError, ValueError):
                if time.time() - t0 > 240:
                    pytest.fail(f"ComfyUI did not answer in 240 s:\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
        print(f"\nComfyUI server up in {time.time() - t0:.1f}s on port {port}")
        assert ready_node in info, log.read_text()[-4000:]
        yield {"url": url, "port": port, "base": base, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# JavaScript put before a test's own node script: `openPage(args, beforeGoto)` starts the headless Chromium
# (fresh profile, loopback requests only, page and console errors collected in `seen`) and opens the
# server's page; `beforeGoto(page)` runs first (listeners that must exist before the page loads).
OPEN_PAGE_JS = r"""
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

async function openPage(args, beforeGoto) {
  const context = await chromium.launchPersistentContext(args.profile, {
    executablePath: args.chromium, headless: true, viewport: { width: 1280, height: 800 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
  const seen = { pageErrors: [], consoleErrors: [], blocked: [] };
  try {
    await context.route('**/*', (route) => {  // loopback only
      const u = new URL(route.request().url());
      if (u.hostname === '127.0.0.1' || ['data:', 'blob:'].includes(u.protocol)) return route.continue();
      seen.blocked.push(u.hostname);
      return route.abort();
    });
    const page = context.pages()[0] || await context.newPage();
    page.on('pageerror', (e) => seen.pageErrors.push(String(e.stack || e)));
    page.on('console', (m) => { if (m.type() === 'error') seen.consoleErrors.push(m.text()); });
    if (beforeGoto) beforeGoto(page);
    await page.goto(args.url, { waitUntil: 'load', timeout: 120000 });
    return { context, page, seen };
  } catch (e) {
    await context.close();
    throw e;
  }
}
"""
