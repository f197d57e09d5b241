"""Record what the project produces, to prove a refactor changed nothing: run it before and after,
then ``compare`` the two folders.

    OMP_NUM_THREADS=1 python tools/behaviour_snapshot.py record OUT [--parts generate,recipe,eval,workflows]
    python tools/behaviour_snapshot.py compare BEFORE AFTER

Parts (each through a public entry point only, so the same script runs on both sides):
- generate: ``python -m layerdiff generate`` over a matrix of samplers and settings; the pixels of
  every PNG, the PSD bytes and each meta.json are recorded.
- recipe: the toy training recipe at a few steps (toy data, VAE, decoder, latent cache, LayerDiff,
  calibration); every tensor of every written .safetensors and calibration.json.
- eval: ``python -m layerdiff eval --samples 48 --details`` JSON.
- workflows: every shipped workflow on a private real ComfyUI server (tests/comfy_private.py); the
  pixels of every saved image and the bytes of every PSD.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

GENERATE = {
    "two-layers": ["--prompt", "a red circle in front of a brick wall", "--layer", "a brick wall",
                   "--layer", "a red circle", "--batch", "2"],
    "four-layers": ["--prompt", "a scene", "--layer", "a snowy field", "--layer", "a blue square",
                    "--layer", "a green triangle", "--layer", "a yellow star"],
    "negative": ["--prompt", "a red circle", "--layer", "a meadow", "--layer", "a red circle",
                 "--negative", "blue"],
    "no-smg": ["--prompt", "a scene", "--layer", "a night sky", "--layer", "a white heart",
               "--layer", "a purple circle", "--mask-guidance", "0"],
    "smg-strong-early": ["--prompt", "a scene", "--layer", "a night sky", "--layer", "a white heart",
                         "--layer", "a purple circle", "--mask-guidance", "3", "--mask-guidance-start", "0"],
    "no-cleanup-no-retry": ["--prompt", "a scene", "--layer", "a brick wall", "--layer", "a red star",
                            "--layer", "a blue star", "--layout-cleanup", "0", "--empty-layer-retries", "0"],
    "background-cfg": ["--prompt", "a scene", "--layer", "a brick wall", "--layer", "a red star",
                       "--background-cfg", "12", "--cfg", "5", "--steps", "12"],
    "size": ["--prompt", "a scene", "--layer", "a meadow", "--layer", "a red square",
             "--width", "96", "--height", "64"],
}
SAMPLERS = ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
for _name in SAMPLERS:
    GENERATE[f"sampler-{_name}"] = ["--prompt", "a scene", "--layer", "a meadow", "--layer", "a orange circle",
                                    "--layer", "a blue square", "--scheduler", _name, "--steps", "10"]


def pixels(path: Path) -> str:
    with Image.open(path) as im:
        arr = np.asarray(im)
        return hashlib.sha256(f"{im.mode}{arr.shape}".encode() + arr.tobytes()).hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def psd_layers(path: Path) -> list:
    """(name, pixel hash) of every layer, back to front: what a PSD holds besides its bytes' layout."""
    from psd_tools import PSDImage

    out = []
    for layer in PSDImage.open(path):
        arr = np.asarray(layer.topil())
        out.append([layer.name, hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()])
    return out


def tensors_hash(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()
            for k, v in sorted(load_file(str(path)).items())}


def hash_tree(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(root))
        if path.suffix.lower() in (".png", ".jpg", ".webp"):
            out[rel] = pixels(path)
        elif path.suffix == ".json":
            out[rel] = json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            out[rel] = tensors_hash(path)
        elif path.suffix.lower() == ".psd":
            out[rel] = {"bytes": file_hash(path), "layers": psd_layers(path)}
    return out


def run(cmd: list[str], **kw) -> None:
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    print(f"  {time.time() - t0:6.1f}s  {' '.join(cmd[3:6])} ...", file=sys.stderr)


def part_generate(out: Path) -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in GENERATE.items():
            folder = Path(tmp) / name
            run([PY, "-m", "layerdiff", "generate", *args, "--seed", "7", "--out", str(folder)])
            result[name] = hash_tree(folder)
    return result


RECIPE = {"unet": {"block_out_channels": [16, 32, 32], "norm_num_groups": 8}, "samples": 6,
          "vae": {"steps": 2, "batch_size": 2, "crop": 32, "latent_stats": "channel"},
          "decoder": {"steps": 1, "batch_size": 2, "crop": 32}, "texture": {"steps": 1, "batch_size": 2, "crop": 32},
          "train": {"steps": 3, "batch_size": 2, "sample_every": 0, "checkpoint_every": 1},
          "calibration": {"samples": 3, "candidates": [5, 20], "foreground_candidates": [3, 9]}}


def part_recipe(out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "recipe.json"
        cfg.write_text(json.dumps(RECIPE))
        run([PY, "-m", "layerdiff", "train", "--preset", "toy", "--config", str(cfg), "--data", f"{tmp}/data",
             "--out", f"{tmp}/run"])
        tree = hash_tree(Path(tmp) / "run")
        # wall times and dates are not behaviour
        return {k: v for k, v in tree.items() if not k.endswith(("timings.json", "log.jsonl"))}


def part_eval(out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "eval.json"
        run([PY, "-m", "layerdiff", "eval", "--samples", "48", "--details", "--out", str(target)])
        return json.loads(target.read_text())


def part_workflows(out: Path) -> dict:
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tools")]
    import comfy_private as cp
    import workflow_format as wf

    reason = cp.host_skip_reason()
    if reason:
        raise SystemExit(f"workflows: {reason}")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        with cp.private_server(base, "LayerDiffKSampler") as srv:
            import shutil
            import urllib.request

            for f in (REPO / "example_workflows" / "input").iterdir():
                shutil.copy(f, base / "input" / f.name)
            with urllib.request.urlopen(f"{srv['url']}/object_info", timeout=120) as r:
                defs = json.loads(r.read())
            for path in sorted((REPO / "example_workflows").glob("*.json")):
                prompt = wf.to_api(wf.load(path), defs)
                body = json.dumps({"prompt": prompt, "client_id": "snapshot"}).encode()
                req = urllib.request.Request(f"{srv['url']}/prompt", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    pid = json.loads(r.read())["prompt_id"]
                t0 = time.time()
                while True:
                    with urllib.request.urlopen(f"{srv['url']}/history/{pid}", timeout=60) as r:
                        entry = json.loads(r.read()).get(pid)
                    if entry and entry["status"].get("completed") is not None and entry["status"].get("status_str"):
                        break
                    if time.time() - t0 > 900:
                        raise SystemExit(f"{path.name} did not finish")
                    time.sleep(0.3)
                if entry["status"]["status_str"] != "success":
                    raise SystemExit(f"{path.name} failed: {json.dumps(entry['status'])[:3000]}")
                print(f"  {time.time() - t0:6.1f}s  {path.name}", file=sys.stderr)
            result = {k: v for k, v in hash_tree(base / "output").items() if not k.endswith(".json")}
    return result


PARTS = {"generate": part_generate, "recipe": part_recipe, "eval": part_eval, "workflows": part_workflows}


def record(out: Path, parts: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for name in parts:
        print(f"{name}:", file=sys.stderr)
        data = PARTS[name](out)
        (out / f"{name}.json").write_text(json.dumps({"commit": commit, "data": data}, indent=1, sort_keys=True))


def _diff(a, b, where: str, lines: list[str]) -> None:
    if isinstance(a, str) and isinstance(b, dict) and "bytes" in b:  # a PSD recorded by an earlier version
        b = b["bytes"]
    elif isinstance(b, str) and isinstance(a, dict) and "bytes" in a:
        a = a["bytes"]
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                lines.append(f"{where}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}/{k}", lines)
    elif a != b:
        lines.append(f"{where}: {str(a)[:80]} != {str(b)[:80]}")


def compare(before: Path, after: Path) -> int:
    lines: list[str] = []
    for path in sorted(before.glob("*.json")):
        other = after / path.name
        if not other.is_file():
            lines.append(f"{path.name}: not recorded after")
            continue
        _diff(json.loads(path.read_text())["data"], json.loads(other.read_text())["data"], path.stem, lines)
    print("\n".join(lines) if lines else "identical")
    return 1 if lines else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--parts", default=",".join(PARTS))
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = p.parse_args()
    if args.cmd == "record":
        record(args.out, args.parts.split(","))
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    raise SystemExit(main())
