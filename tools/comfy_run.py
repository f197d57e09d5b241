"""Run the shipped UI-format workflows on a real ComfyUI server (standard library only).

Used by tests/test_workflows_comfyui.py and tools/make_workflow_thumbnails.py. The server is started
and stopped by comfy_host.sh (COMFY_HOST_SH, default /work/shared/tools/comfy_host.sh) or is one
already running; a workflow is converted with workflow_format.to_api against the server's own
/object_info, its Save nodes are pointed into a private output subfolder, and it is queued and
waited for through /prompt and /history.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import workflow_format as wf

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "example_workflows"
EXAMPLE_INPUTS = WORKFLOWS / "input"
COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or os.environ.get("COMFY_DIR")
                 or Path.home() / ".cache" / "comfyui-host" / "ComfyUI")
COMFY_VENV = Path(os.environ.get("COMFY_VENV") or COMFY_DIR.parent / "venv")
HOST_SH = Path(os.environ.get("COMFY_HOST_SH") or "/work/shared/tools/comfy_host.sh")


def comfyui_version(comfy_dir: Path = COMFY_DIR) -> str:
    path = comfy_dir / "comfyui_version.py"
    text = path.read_text() if path.is_file() else ""
    version = next((ln.split("=")[1].strip().strip("\"'") for ln in text.splitlines() if "__version__" in ln), "?")
    commit = subprocess.run(["git", "-C", str(comfy_dir), "describe", "--tags", "--always"], capture_output=True,
                            text=True).stdout.strip()
    return f"{version} ({commit or 'no git'})"


class Server:
    """A ComfyUI server on 127.0.0.1:port: started here (start()/stop()) or already running."""

    def __init__(self, port: int, state_dir: Path | None = None, env: dict | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.state_dir = Path(state_dir or f"/tmp/layerdiff-workflows-{port}")
        self.env = dict(os.environ if env is None else env, COMFY_DIR=str(COMFY_DIR), COMFY_VENV=str(COMFY_VENV),
                        COMFY_STATE_DIR=str(self.state_dir))
        self.env.setdefault("OMP_NUM_THREADS", "1")  # the toy model runs faster unthreaded on a shared CPU
        self.started = False
        self._definitions = None

    # ---------------------------------------------------------------- lifecycle
    def host(self, *args, timeout=300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(HOST_SH), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> subprocess.CompletedProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        done = self.host("start", str(REPO), str(self.port))
        self.started = done.returncode == 0
        return done

    def stop(self) -> subprocess.CompletedProcess:
        return self.host("stop", str(self.port), timeout=60)

    def answers(self) -> bool:
        try:
            self.http("GET", "/system_stats")
            return True
        except OSError:
            return False

    # ---------------------------------------------------------------- http
    def http(self, method: str, path: str, body=None, timeout=120):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw or b"null")
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get_bytes(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def definitions(self) -> dict:
        if self._definitions is None:
            status, info = self.http("GET", "/object_info")
            if status != 200:
                raise RuntimeError(f"/object_info answered HTTP {status}")
            self._definitions = info
        return self._definitions

    def folders(self) -> dict[str, Path]:
        """ComfyUI's output / temp / input folders (the defaults under the checkout)."""
        return {k: COMFY_DIR / k for k in ("output", "temp", "input")}

    # ---------------------------------------------------------------- workflows
    def api_prompt(self, workflow: dict, subfolder: str) -> dict:
        """The workflow as an API prompt, every filename_prefix moved under ``subfolder``."""
        prompt = wf.to_api(workflow, self.definitions())
        for node in prompt.values():
            prefix = node["inputs"].get("filename_prefix")
            if isinstance(prefix, str):
                node["inputs"]["filename_prefix"] = f"{subfolder}/{prefix}"
        return prompt

    def free(self) -> None:
        """Drop ComfyUI's cached node outputs (and models), so the next prompt runs every node."""
        self.http("POST", "/free", {"unload_models": True, "free_memory": True})

    def run_prompt(self, prompt: dict, timeout: float = 600, cold: bool = True) -> tuple[dict, float]:
        """Queue an API prompt and wait: (history entry, seconds from queueing to completion).
        cold: clear ComfyUI's caches first, so the time is the whole workflow's, model load included."""
        if cold:
            self.free()
        t0 = time.time()
        status, answer = self.http("POST", "/prompt", {"prompt": prompt, "client_id": "layerdiff-workflows"})
        if status != 200:
            raise RuntimeError(f"prompt rejected (HTTP {status}): {json.dumps(answer)[:2000]}")
        prompt_id = answer["prompt_id"]
        while time.time() - t0 < timeout:
            _, history = self.http("GET", f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry and entry["status"].get("completed") is not None and entry["status"].get("status_str"):
                return entry, time.time() - t0
            time.sleep(0.2)
        self.http("POST", "/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run_workflow(self, path: Path, subfolder: str, timeout: float = 600, cold: bool = True
                     ) -> tuple[dict, float, dict]:
        """Run a UI-format workflow file: (history entry, seconds, the API prompt that was queued)."""
        prompt = self.api_prompt(wf.load(path), subfolder)
        entry, seconds = self.run_prompt(prompt, timeout, cold)
        return entry, seconds, prompt

    def output_files(self, entry: dict, node_id: str, key: str = "images") -> list[Path]:
        folders = self.folders()
        return [folders[f["type"]] / f.get("subfolder", "") / f["filename"]
                for f in (entry.get("outputs", {}).get(node_id, {}).get(key) or [])]


def error_text(entry: dict) -> str:
    """The execution error of a history entry, readable."""
    lines = []
    for event, data in entry["status"].get("messages", []):
        if event in ("execution_error", "execution_interrupted"):
            lines.append(f"{event} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".strip())
            lines.extend("    " + ln for ln in "".join(data.get("traceback") or [])[-3000:].splitlines())
    return "\n".join(lines) or json.dumps(entry["status"])[:2000]


class ExampleInputs:
    """Copies example_workflows/input/* into ComfyUI's input folder (as a user would) for the Load
    Image workflows, and removes afterwards only what it added."""

    def __init__(self, input_dir: Path):
        self.input_dir, self.added = Path(input_dir), []

    def __enter__(self):
        self.input_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(EXAMPLE_INPUTS.glob("*.png")):
            dst = self.input_dir / src.name
            if dst.exists():  # never overwrite a user's file (the same name with other content runs as is)
                continue
            shutil.copyfile(src, dst)
            self.added.append(dst)
        return self

    def __exit__(self, *exc):
        for path in self.added:
            path.unlink(missing_ok=True)


def new_run_id(prefix: str = "layerdiff_wf") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- the real frontend
PW_DIR = Path(os.environ.get("COMFY_PW_DIR") or COMFY_DIR.parent / "pw")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FRONTEND_JS = r"""
import { chromium } from 'playwright-core';
import fs from 'fs';
const [port, listPath, outPath, chromiumPath] = process.argv.slice(2);
const files = JSON.parse(fs.readFileSync(listPath, 'utf8'));
const browser = await chromium.launch({ executablePath: chromiumPath,
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'] });
const out = {};
try {
  const ctx = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  await ctx.route('**/*', (r) => { const u = new URL(r.request().url());  // loopback only
    if (['127.0.0.1', 'localhost'].includes(u.hostname) || ['data:', 'blob:'].includes(u.protocol)) return r.continue();
    return r.abort(); });
  const page = await ctx.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`http://127.0.0.1:${port}/`, { waitUntil: 'load', timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 120000 });
  await page.waitForTimeout(1500);
  for (const [name, path] of Object.entries(files)) {
    const wf = JSON.parse(fs.readFileSync(path, 'utf8'));
    errors.length = 0;
    out[name] = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf, true, false);
      const missing = window.app.graph.nodes.filter((n) => n.has_errors || n.type === undefined).map((n) => n.type);
      const p = await window.app.graphToPrompt();
      return { api: p.output, missing };
    }, wf);
    out[name].errors = [...errors];
  }
} finally { await browser.close(); }
fs.writeFileSync(outPath, JSON.stringify(out));
"""


def frontend_available() -> str | None:
    """Why the frontend conversion cannot run here (None: it can)."""
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (comfy_host.sh setup --browser)"
    if not (PW_DIR / "node_modules" / "playwright-core").is_dir():
        return f"no playwright-core in {PW_DIR} (comfy_host.sh setup --browser)"
    if not shutil.which("node"):
        return "no node"
    return None


def frontend_prompts(port: int, files: dict[str, Path]) -> dict:
    """Each UI-format workflow loaded into the real frontend and converted by its graphToPrompt():
    {name: {"api": prompt, "missing": [...], "errors": [...]}} (one headless Chromium session)."""
    import tempfile

    script = PW_DIR / "layerdiff_frontend_prompts.mjs"  # beside node_modules: ESM resolves playwright-core there
    script.write_text(FRONTEND_JS)
    with tempfile.TemporaryDirectory() as tmp:
        listing, out = Path(tmp) / "files.json", Path(tmp) / "out.json"
        listing.write_text(json.dumps({k: str(v) for k, v in files.items()}))
        subprocess.run(["node", str(script), str(port), str(listing), str(out), CHROMIUM], check=True, timeout=600,
                       capture_output=True, text=True)
        return json.loads(out.read_text())
