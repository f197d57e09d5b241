"""Run the shipped UI-format workflows on a real ComfyUI server (standard library only).

Used by tests/test_workflows_comfyui.py and tools/make_workflow_thumbnails.py. The server is a
private one started and stopped through the harness of the real-ComfyUI tests (tests/comfy_private.py:
its own base directory, only this pack, a free loopback port, COMFY_EXTRA_ARGS honoured), or one
already running. A workflow is converted with workflow_format.to_api against the server's own
/object_info, its Save nodes are pointed into a private output subfolder, and it is queued and
waited for through /prompt and /history.

    python tools/comfy_run.py --port 8231 --base-directory /tmp/layerdiff-comfy

starts such a private server for other tools (tools/build_workflows.py, make_workflow_thumbnails.py
--running) and keeps it running until Ctrl-C or `kill`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import comfy_private as harness  # noqa: E402
import workflow_format as wf  # noqa: E402

WORKFLOWS = REPO / "example_workflows"
EXAMPLE_INPUTS = WORKFLOWS / "input"
COMFY_DIR = harness.COMFY_DIR
COMFY_VENV = harness.COMFY_VENV
PACK = harness.PACK
comfyui_version = harness.comfyui_version
host_skip_reason = harness.host_skip_reason


class Server:
    """HTTP client of a ComfyUI server on 127.0.0.1:port whose folders (input, output, temp) are under
    ``base``: its --base-directory (private_server() gives one), default the checkout's own folders."""

    def __init__(self, port: int, base: Path | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.base = Path(base or COMFY_DIR)
        self.process: harness.PrivateComfyUI | None = None  # set by private_server()
        self._definitions = None

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
        """ComfyUI's output / temp / input folders (under the server's base directory)."""
        return {k: self.base / k for k in ("output", "temp", "input")}

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


@contextlib.contextmanager
def private_server(base: Path, extra_args: Sequence[str] = (), port: int | None = None) -> Iterator[Server]:
    """A private ComfyUI started in ``base`` (tests/comfy_private.py) and stopped on exit, as a Server;
    its ``process`` is the harness's PrivateComfyUI (log file, stop())."""
    with harness.private_server(base, "LayerDiffLoader", extra_args, port) as comfy:
        server = Server(comfy.port, comfy.base)
        server.process = comfy
        yield server


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
PW_DIR = harness.PW_DIR
CHROMIUM = str(harness.CHROMIUM)
FRONTEND_JS = r"""
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
const fs = require('fs');
const [port, listPath, outPath, chromiumPath] = process.argv.slice(2);
const files = JSON.parse(fs.readFileSync(listPath, 'utf8'));

(async () => {
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
})().catch((e) => { console.error(e); process.exit(1); });
"""


def frontend_available() -> str | None:
    """Why the frontend conversion cannot run here (None: it can): Chromium, node, playwright-core."""
    if not harness.CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if not (PW_DIR / "node_modules" / "playwright-core").is_dir():
        return f"no playwright-core in {PW_DIR} (npm install --prefix {PW_DIR} playwright-core, or set COMFY_PW_DIR)"
    if not shutil.which("node"):
        return "no node on PATH (apt-get install nodejs)"
    return None


def frontend_prompts(port: int, files: dict[str, Path]) -> dict:
    """Each UI-format workflow loaded into the real frontend and converted by its graphToPrompt():
    {name: {"api": prompt, "missing": [...], "errors": [...]}} (one headless Chromium session)."""
    with tempfile.TemporaryDirectory() as tmp:
        script, listing, out = Path(tmp) / "frontend_prompts.cjs", Path(tmp) / "files.json", Path(tmp) / "out.json"
        script.write_text(FRONTEND_JS)
        listing.write_text(json.dumps({k: str(v) for k, v in files.items()}))
        env = dict(os.environ, PLAYWRIGHT_CORE=str(PW_DIR / "node_modules" / "playwright-core"))
        subprocess.run(["node", str(script), str(port), str(listing), str(out), CHROMIUM], check=True, timeout=600,
                       capture_output=True, text=True, env=env)
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------- a server for other tools
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Start a private ComfyUI with this pack (tests/comfy_private.py) "
                                             "and keep it running until Ctrl-C or SIGTERM.")
    ap.add_argument("--port", type=int, default=None, help="loopback port (default: a free one)")
    ap.add_argument("--base-directory", type=Path, default=None,
                    help="its base directory: input, output, temp, user, models, custom_nodes "
                         "(default: a new temporary folder, removed at the end)")
    ap.add_argument("extra_args", nargs="*", help=f"more ComfyUI arguments after '--' (they come after ${harness.EXTRA_ARGS_VAR})")
    args = ap.parse_args(argv)
    reason = harness.host_skip_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the server too, as Ctrl-C does
    with contextlib.ExitStack() as stack:
        base = args.base_directory or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="layerdiff-comfy-")))
        server = stack.enter_context(private_server(base, args.extra_args, args.port))
        print(f"ComfyUI on {server.url}, base directory {server.base}, log {server.process.log}; Ctrl-C stops it",
              flush=True)
        try:
            while server.process.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            return 0
        print(f"ComfyUI exited (code {server.process.proc.returncode}):\n{server.process.log_tail()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
