"""A private ComfyUI server for every test and tool that needs a real one.

The ComfyUI checkout and its venv come from COMFYUI_DIR and COMFY_VENV (default
~/.cache/comfyui-host/ComfyUI and the ``venv`` folder beside it). Each server gets its own
--base-directory: custom_nodes/ holding only a link to this pack (loaded through
--disable-all-custom-nodes --whitelist-custom-nodes), and ComfyUI's input/, output/, temp/, user/ and
models/ folders, all under that directory. It listens on a free loopback port with an in-memory
database and is stopped by whoever started it, so the checkout, other packs and links this harness
did not make are never touched.

COMFY_EXTRA_ARGS (split as a shell would) is appended to ComfyUI's command line; a caller's own
arguments (``extra_args``) come after it, so where both set one option the caller's wins.

Imports only the standard library (tools/comfy_run.py uses it outside pytest): a server that does not
come up raises ComfyUIStartError; a test module skips itself with host_skip_reason() /
browser_skip_reason(), which name what is missing and the variable to set.

    with private_server(tmp_path / "base", "LayerDiffLoader", ["--preview-method", "auto"]) as srv:
        srv.url, srv.port, srv.base, srv.log, srv.folders()["output"]   # or srv["url"], ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or os.environ.get("COMFY_DIR")
                 or Path.home() / ".cache" / "comfyui-host" / "ComfyUI")
COMFY_VENV = Path(os.environ.get("COMFY_VENV") or COMFY_DIR.parent / "venv")
PW_DIR = Path(os.environ.get("COMFY_PW_DIR") or COMFY_DIR.parent / "pw")
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
PACK = "comfyui-layerdiff"  # the pack's folder name under the private custom_nodes/
EXTRA_ARGS_VAR = "COMFY_EXTRA_ARGS"
FOLDERS = ("input", "output", "temp", "user", "models")
REQUIRED_MODULES = "diffusers, psd_tools, einops"


class ComfyUIStartError(RuntimeError):
    """The private server exited during start-up, did not answer in time, or answered without the pack."""


def user_extra_args() -> list[str]:
    """The user's extra ComfyUI arguments: COMFY_EXTRA_ARGS split as a shell would."""
    return shlex.split(os.environ.get(EXTRA_ARGS_VAR, ""))


def comfyui_version(comfy_dir: Path = COMFY_DIR) -> str:
    """The checkout's version and `git describe`, e.g. "0.3.60 (v0.3.60-3-gabc)"."""
    path = comfy_dir / "comfyui_version.py"
    text = path.read_text() if path.is_file() else ""
    version = next((ln.split("=")[1].strip().strip("\"'") for ln in text.splitlines() if "__version__" in ln), "?")
    commit = subprocess.run(["git", "-C", str(comfy_dir), "describe", "--tags", "--always"], capture_output=True,
                            text=True).stdout.strip()
    return f"{version} ({commit or 'no git'})"


# ---------------------------------------------------------------------------- what is missing here
def host_skip_reason(modules: str = REQUIRED_MODULES) -> str | None:
    """Why a real-ComfyUI test cannot run here (None: it can): the checkout, its venv, the pack's packages."""
    if not (COMFY_DIR / "main.py").is_file():
        return f"no ComfyUI checkout at {COMFY_DIR} (set COMFYUI_DIR to a ComfyUI checkout)"
    python = COMFY_VENV / "bin" / "python"
    if not python.is_file():
        return f"no ComfyUI venv at {COMFY_VENV} (set COMFY_VENV to the venv ComfyUI runs in)"
    if subprocess.run([str(python), "-c", f"import {modules}"], capture_output=True).returncode:
        return (f"the ComfyUI venv lacks the pack's requirements: {COMFY_VENV}/bin/pip install -r {REPO}/requirements.txt "
                f"&& {COMFY_VENV}/bin/python {REPO}/install.py")
    return None


def browser_skip_reason(modules: str = REQUIRED_MODULES) -> str | None:
    """host_skip_reason, then Chromium, node and playwright-core for driving the frontend."""
    reason = host_skip_reason(modules)
    if reason:
        return reason
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if not shutil.which("node"):
        return "no node on PATH (apt-get install nodejs)"
    if not (PW_DIR / "node_modules" / "playwright-core").is_dir():
        return f"no playwright-core in {PW_DIR} (npm install --prefix {PW_DIR} playwright-core, or set COMFY_PW_DIR)"
    return None


# ---------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateComfyUI:
    """One ComfyUI process in its own base directory: start() waits until /object_info/<ready_node>
    answers, stop() ends the process. Also readable as a mapping: srv["url"], ["port"], ["base"], ["log"]."""

    def __init__(self, base: Path, ready_node: str = "LayerDiffLoader", extra_args: Sequence[str] = (),
                 port: int | None = None, start_timeout: float = 240):
        self.base = Path(base).resolve()
        self.ready_node = ready_node
        self.extra_args = list(extra_args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.base / "comfyui.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __getitem__(self, key: str):
        if key not in ("url", "port", "base", "log"):
            raise KeyError(key)
        return getattr(self, key)

    def folders(self) -> dict[str, Path]:
        """ComfyUI's input / output / temp / user / models folders of this server."""
        return {k: self.base / k for k in FOLDERS}

    def prepare(self) -> None:
        """The base directory: custom_nodes/ with a link to this pack, the folders, frontend settings."""
        nodes = self.base / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        link = nodes / PACK
        if not link.is_symlink():
            link.symlink_to(REPO, target_is_directory=True)
        elif link.resolve() != REPO:
            raise ComfyUIStartError(f"{link} points to {link.resolve()}, not to this pack ({REPO})")
        for folder in self.folders().values():
            folder.mkdir(exist_ok=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no template browser over the canvas

    def command(self) -> list[str]:
        return [str(COMFY_VENV / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
                "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
                "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK,
                *user_extra_args(), *self.extra_args]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def start(self) -> float:
        """Start the server and wait for it: the seconds it took. Raises ComfyUIStartError (the server
        stopped) when it exits, does not answer within start_timeout, or lacks ready_node."""
        self.prepare()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # the toy models run faster unthreaded on a shared CPU
        t0 = time.time()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.command(), cwd=COMFY_DIR, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            info = self._wait_ready(t0)
            if self.ready_node not in info:
                raise ComfyUIStartError(f"ComfyUI answered without {self.ready_node}: the pack did not load\n"
                                        f"{self.log_tail()}")
        except BaseException:
            self.stop()
            raise
        return time.time() - t0

    def _wait_ready(self, t0: float) -> dict:
        while True:
            if self.proc.poll() is not None:
                raise ComfyUIStartError(f"ComfyUI exited during start-up (code {self.proc.returncode}), "
                                        f"command: {shlex.join(self.command())}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/object_info/{self.ready_node}", timeout=60) as r:
                    return json.loads(r.read())
            except (OSError, ValueError):
                if time.time() - t0 > self.start_timeout:
                    raise ComfyUIStartError(f"ComfyUI did not answer in {self.start_timeout:.0f} s\n"
                                            f"{self.log_tail()}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        """End the server process (terminate, then kill after 30 s); nothing else is removed."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> PrivateComfyUI:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def private_server(base: Path, ready_node: str = "LayerDiffLoader", extra_args: Sequence[str] = (),
                   port: int | None = None) -> Iterator[PrivateComfyUI]:
    """A started PrivateComfyUI in ``base`` (made if missing), stopped on exit."""
    server = PrivateComfyUI(base, ready_node, extra_args, port)
    seconds = server.start()
    print(f"\nComfyUI {comfyui_version()} up in {seconds:.1f}s on port {server.port} (base {server.base})")
    try:
        yield server
    finally:
        server.stop()


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
