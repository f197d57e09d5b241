"""Install LayerDiff's Python dependencies into the Python that runs this file, moving nothing the host has.

ComfyUI-Manager runs this file after installing ``requirements.txt`` line by line (and the Comfy
Registry's installer does the same); after a ``git clone`` run it yourself with ComfyUI's Python:

    <ComfyUI's python> custom_nodes/comfyui-layerdiff/install.py

``requirements.txt`` holds only lines that cannot move a host's torch, transformers,
huggingface-hub or tokenizers. diffusers cannot be such a line: each diffusers release needs a
different huggingface-hub range (0.36-0.39 accept hub 0.34-1.x, 0.40-0.41 need hub 1.x, 0.42 also
accepts 2.x), and ``pip install diffusers`` picks the newest release and moves the hub under a
host's transformers. So this script asks pip for diffusers with every installed package pinned
to its installed version (pip then picks the newest diffusers that fits), and if that cannot be
solved, with only the protected packages pinned. If neither works it changes nothing and prints
one line saying why. Standard library only; no network except pip's own package index.

Options: --dry-run (print the pip command), --python PATH (install into another Python).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
DIFFUSERS = "diffusers>=0.27.0"
TRANSFORMERS = "transformers>=4.38.0"
# Never changed by this script, whatever it installs.
PROTECTED = ("torch", "torchvision", "torchaudio", "transformers", "huggingface-hub", "tokenizers",
             "safetensors", "numpy")
# Packages this script may install or replace (never pinned).
OURS = ("diffusers",)
PREFIX = "[LayerDiff install]"

_PROBE = r"""
import importlib.metadata as md, json, sys
out = {"dists": {}}
for d in md.distributions():
    name = (d.metadata["Name"] or "").strip()
    if name:
        out["dists"][name.lower().replace("_", "-").replace(".", "-")] = d.version
try:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401
    out["import_error"] = None
except Exception as exc:
    out["import_error"] = (type(exc).__name__ + ": " + (str(exc).strip().splitlines() or [""])[0]).strip()
print(json.dumps(out))
"""


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def probe(python: str) -> dict:
    """Installed distributions {normalised name: version} and whether the model libraries import."""
    done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{python} cannot run ({done.stderr.strip().splitlines()[-1:] or ['no output']})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pip_command(python: str) -> list[str] | None:
    """``python -m pip install``, or uv's (venvs made by uv have no pip)."""
    if subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return [python, "-m", "pip", "install"]
    uv = shutil.which("uv")
    if uv:
        return [uv, "pip", "install", "--python", python]
    return None


def requirement_lines() -> list[str]:
    lines = []
    if os.path.isfile(REQUIREMENTS):
        with open(REQUIREMENTS, encoding="utf-8") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line and not line.startswith("-"):
                    lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    """``Pillow>=9.5`` -> ``pillow`` (normalised as the probe normalises installed names)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line.strip())
    return match.group(0).lower().replace("_", "-").replace(".", "-") if match else line.strip().lower()


def install(pip: list[str], wanted: list[str], pins: dict[str, str], dry_run: bool) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="layerdiff-constraints-", delete=False) as f:
        for name, version in sorted(pins.items()):
            f.write(f"{name}=={version}\n")
        constraints = f.name
    try:
        cmd = [*pip, "-c", constraints, *wanted]
        say(("would run: " if dry_run else "running: ") + " ".join(cmd) + f"  ({len(pins)} packages pinned)")
        if dry_run:
            return True
        return subprocess.run(cmd).returncode == 0
    finally:
        os.unlink(constraints)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python to install into (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed, install nothing")
    args = parser.parse_args(argv)
    python = args.python

    before = probe(python)
    dists = before["dists"]
    wanted = [line for line in requirement_lines() if requirement_name(line) not in dists]
    if before["import_error"] is None and not wanted:
        say(f"diffusers {dists.get('diffusers')} and transformers {dists.get('transformers')} import; "
            "all requirements present; nothing to do")
        return 0
    if before["import_error"] is not None:
        say(f"diffusers/transformers do not import yet ({before['import_error']})")
        wanted.append(DIFFUSERS)
        if "transformers" not in dists:
            wanted.append(TRANSFORMERS)

    pip = pip_command(python)
    if pip is None:
        say(f"no pip for {python} (and no uv): install pip, then run this file again")
        return 1

    everything = {name: v for name, v in dists.items() if name not in OURS}
    protected = {name: v for name, v in dists.items() if name in PROTECTED}
    for pins in (everything, protected):
        if install(pip, wanted, pins, args.dry_run):
            break
        say("pip found no solution with those pins; trying again with only "
            + ", ".join(sorted(protected)) + " pinned")
    else:
        say("could not install diffusers without changing "
            + ", ".join(f"{n} {v}" for n, v in sorted(protected.items()))
            + f": nothing was changed. Install a diffusers that fits them by hand ({DIFFUSERS})")
        return 1
    if args.dry_run:
        return 0

    after = probe(python)
    moved = {n: (v, after["dists"].get(n)) for n, v in protected.items() if after["dists"].get(n) != v}
    if moved:  # cannot happen with the pins above; said loudly if a tool ever ignores them
        say("WARNING: these changed: " + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in moved.items()))
    if after["import_error"] is not None:
        say(f"installed, but diffusers/transformers still do not import: {after['import_error']}")
        return 1
    say(f"ready: diffusers {after['dists'].get('diffusers')}, transformers {after['dists'].get('transformers')}, "
        f"huggingface-hub {after['dists'].get('huggingface-hub')}, torch {after['dists'].get('torch')}; "
        "restart ComfyUI if it is running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
