"""Installing the pack into a user's ComfyUI Python: what the Manager and the Registry really do.

ComfyUI-Manager installs ``requirements.txt`` one ``pip install <line>`` at a time, then runs
``install.py`` (comfy-cli: ``pip install -r requirements.txt``, then ``install.py``). The slow tests
build real venvs of the two kinds of host found in the field — transformers 4.57 with
huggingface-hub 0.3x (ComfyUI 0.3.x), and the latest transformers — with torch already present,
run exactly that sequence from PyPI, and check that torch, transformers, huggingface-hub and
tokenizers did not move and that the library then loads the built-in model and generates.
The fast tests check the files those installers read.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
PROTECTED = ("torch", "transformers", "huggingface-hub", "tokenizers")


def _requirement_lines(path: Path) -> list[str]:
    """The lines an installer acts on, parsed the way ComfyUI-Manager does (comments and blanks dropped)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0).lower().replace("_", "-")


# ---------------------------------------------------------------------------- the files installers read


def test_requirements_never_name_a_host_package_or_a_resolver_of_one():
    from packaging.requirements import Requirement

    lines = _requirement_lines(REPO / "requirements.txt")
    assert lines, "requirements.txt is empty"
    names = [_name(line) for line in lines]
    # torch & co. belong to the host; diffusers would move huggingface-hub; accelerate can move torch.
    forbidden = set(PROTECTED) | {"torchvision", "torchaudio", "diffusers", "accelerate"}
    assert not forbidden & set(names), f"requirements.txt names {sorted(forbidden & set(names))}"
    for line in lines:
        req = Requirement(line)  # one PEP 508 requirement per line, as `pip install <line>` needs
        assert all(spec.operator == ">=" for spec in req.specifier), f"{line!r}: floors only"
        assert not req.url and not req.marker, line


def test_pyproject_dependencies_are_the_requirements_plus_the_model_libraries():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = {_name(d): d for d in project["dependencies"]}
    lines = {_name(line): line for line in _requirement_lines(REPO / "requirements.txt")}
    from layerdiff.deps import DIFFUSERS_REQUIREMENT, TRANSFORMERS_REQUIREMENT

    assert deps == {**lines, "diffusers": DIFFUSERS_REQUIREMENT, "transformers": TRANSFORMERS_REQUIREMENT}
    train = {_name(line): line for line in _requirement_lines(REPO / "requirements-train.txt")}
    assert {_name(d): d for d in project["optional-dependencies"]["train"]} == train
    assert "accelerate" in train
    # install.py carries its own copy of the diffusers floor (it runs before the library can import)
    install_py = (REPO / "install.py").read_text()
    assert f'DIFFUSERS = "{DIFFUSERS_REQUIREMENT}"' in install_py
    assert f'TRANSFORMERS = "{TRANSFORMERS_REQUIREMENT}"' in install_py


def test_registry_metadata_is_complete():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] == "comfyui-layerdiff" and re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"]
    repository = project["urls"]["Repository"]
    assert repository.startswith("https://github.com/") and repository.endswith("/comfyui-layerdiff")
    for key in ("PublisherId", "DisplayName", "requires-comfyui"):
        assert comfy[key], key


def _literal_mapping(tree: ast.Module, name: str) -> dict[str, ast.expr]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            assert isinstance(node.value, ast.Dict), f"{name} must be a literal dict, not {type(node.value).__name__}"
            keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
            assert len(keys) == len(node.value.keys), f"{name} has non-literal keys"
            return dict(zip(keys, node.value.values))
    raise AssertionError(f"no {name} = {{...}} in nodes/__init__.py")


def test_node_mappings_are_literal_dicts_that_a_text_scanner_reads():
    import nodes

    source = (REPO / "nodes" / "__init__.py").read_text()
    tree = ast.parse(source)
    classes = _literal_mapping(tree, "NODE_CLASS_MAPPINGS")
    names = _literal_mapping(tree, "NODE_DISPLAY_NAME_MAPPINGS")
    assert set(classes) == set(nodes.NODE_CLASS_MAPPINGS) == set(names) and len(classes) == 14
    for key, value in classes.items():
        assert isinstance(value, ast.Name) and value.id == key, f"{key!r} maps to a class of another name"
    for key, value in names.items():
        assert isinstance(value, ast.Constant) and nodes.NODE_DISPLAY_NAME_MAPPINGS[key] == value.value
    # ComfyUI-Manager's scanner: a regex over the text, `_CLASS_MAPPINGS = {...}` then `"key": value` pairs.
    found = set()
    for body in re.findall(r"_CLASS_MAPPINGS\s*(?::\s*\w+\s*)?=\s*(?:\\\s*)?{([^}]*)}", source, re.DOTALL):
        found |= {k for k, _ in re.findall(r"\"([^\"]*)\"\s*:\s*([^,\n]*)", body)}
    assert set(nodes.NODE_CLASS_MAPPINGS) <= found


# ---------------------------------------------------------------------------- a host without diffusers


_BLOCKED = textwrap.dedent(
    """
    import json, logging
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("layerdiff").addHandler(Keep())
    import nodes
    from layerdiff.errors import LayerDiffError
    out = {"nodes": len(nodes.NODE_CLASS_MAPPINGS), "log": records}
    try:
        nodes.NODE_CLASS_MAPPINGS["LayerDiffLoader"]().load("layerdiff-toy")
        out["error"] = None
    except LayerDiffError as exc:
        out["error"] = str(exc)
    print(json.dumps(out))
    """
)


def test_the_pack_loads_without_diffusers_and_the_model_node_names_the_fix(tmp_path):
    # A diffusers whose import fails the way a moved huggingface-hub makes it fail.
    fake = tmp_path / "diffusers"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ImportError(\"cannot import name 'resolve_revision' from 'huggingface_hub'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 14
    error = out["error"]
    assert error is not None and "\n" not in error
    assert "resolve_revision" in error and "install.py" in error and sys.executable in error


def test_metadata_check_names_a_requirement_the_host_broke(monkeypatch):
    from layerdiff import deps

    real = importlib.metadata.version

    def fake_version(name):
        if name.lower().replace("_", "-") == "huggingface-hub":
            return "0.0.1"  # older than every diffusers and transformers release this pack accepts
        return real(name)

    monkeypatch.setattr(deps, "_installed_version", lambda n: fake_version(n))
    problem = deps.metadata_problem()
    assert problem is not None and "huggingface" in problem and "0.0.1" in problem
    monkeypatch.undo()
    assert deps.metadata_problem() is None  # this environment is consistent


# ---------------------------------------------------------------------------- real hosts, real installers

HOST_A = ["transformers==4.57.6", "huggingface-hub>=0.34,<1.0", "numpy<2", "safetensors", "pillow", "einops",
          "tqdm"]
HOST_B = ["transformers", "numpy", "safetensors", "pillow", "einops", "tqdm"]

_SMOKE = textwrap.dedent(
    """
    import json, logging, sys
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("layerdiff").addHandler(Keep())
    import nodes
    from layerdiff.deps import metadata_problem
    out = {"nodes": len(nodes.NODE_CLASS_MAPPINGS), "log": records, "metadata_problem": metadata_problem()}
    if "--generate" in sys.argv:
        from layerdiff.io.checkpoint import load_model
        from layerdiff.conditioning import LayerPrompts
        from layerdiff.pipeline import generate
        from layerdiff.settings import SamplerSettings
        model = load_model("layerdiff-toy")
        stack = generate(model, LayerPrompts("a red circle in front of a brick wall", ("a brick wall", "a red circle")),
                         SamplerSettings(steps=1), seed=0)
        out["images"] = list(stack.images.shape)
        out["finite"] = bool(stack.images.isfinite().all())
    print(json.dumps(out))
    """
)


def _versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; names = sys.argv[1:]; "
            "print(json.dumps({n: (m.version(n) if any(True for _ in m.distributions(name=n)) else None) "
            "for n in names}))")
    done = subprocess.run([str(python), "-c", code, *PROTECTED, "diffusers"], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def _pip(python: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"pip install {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def torch_dir(tmp_path_factory):
    """The running torch, installed once into a folder each test venv sees through a .pth file (the
    host's torch, present before the pack), so no venv downloads or copies a torch of its own."""
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("no package index reachable: these tests install real packages from PyPI")
    torch_version = importlib.metadata.version("torch")
    target = tmp_path_factory.mktemp("torch")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           f"torch=={torch_version}"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"torch=={torch_version} cannot be installed into a folder here: {done.stderr[-300:]}")
    from packaging.requirements import Requirement

    deps = []
    for text in importlib.metadata.requires("torch") or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            deps.append(str(req).split(";")[0])
    return target, deps


def _host(tmp_path: Path, torch_dir, packages: list[str]) -> Path:
    target, torch_deps = torch_dir
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "host_torch.pth").write_text(f"{target}\n")
    _pip(python, *torch_deps, *packages)
    return python


def _manager_install(python: Path) -> None:
    """ComfyUI-Manager's install: `pip install <line>` for each requirements line, then `python install.py`
    run from the pack's folder."""
    for line in _requirement_lines(REPO / "requirements.txt"):
        _pip(python, line)
    done = subprocess.run([str(python), "install.py"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"install.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "[LayerDiff install] ready" in done.stdout, done.stdout[-2000:]


def _smoke(python: Path, *args: str, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([str(python), "-c", _SMOKE, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("host", [HOST_A, HOST_B], ids=["transformers-4.57-hub-0.3x", "latest"])
def test_manager_install_moves_nothing_and_the_library_generates(tmp_path, torch_dir, host):
    python = _host(tmp_path, torch_dir, host)
    before = _versions(python)
    assert before["diffusers"] is None and all(before[n] for n in PROTECTED)
    _manager_install(python)
    after = _versions(python)
    assert {n: after[n] for n in PROTECTED} == {n: before[n] for n in PROTECTED}
    assert after["diffusers"] is not None
    out = _smoke(python, "--generate", cwd=tmp_path)
    assert out["nodes"] == 14 and out["metadata_problem"] is None and out["finite"]
    assert out["images"] == [1, 2, 128, 128, 3]
    print(f"\n{host[0]}: {before} -> {after}")


@pytest.mark.slow
def test_install_py_repairs_a_host_broken_by_a_line_by_line_diffusers_install(tmp_path, torch_dir):
    """The state the earlier requirements left: `pip install diffusers` moved the hub to 2.x, the next
    line moved it back under transformers 4.57, and diffusers no longer imports. The pack loads anyway,
    logs one line with the fix; running that fix repairs it without touching the hub."""
    python = _host(tmp_path, torch_dir, HOST_A)
    _pip(python, "diffusers>=0.27.0")
    _pip(python, "transformers==4.57.6")  # pulls huggingface-hub back below 1.0, as the old line did
    broken = _versions(python)
    assert broken["huggingface-hub"].startswith("0.")
    out = _smoke(python, cwd=tmp_path)
    assert out["nodes"] == 14 and out["metadata_problem"] is not None
    [line] = [r for r in out["log"] if "install.py" in r]
    assert "huggingface-hub" in line and str(python) in line
    _manager_install(python)
    after = _versions(python)
    assert {n: after[n] for n in PROTECTED} == {n: broken[n] for n in PROTECTED}
    out = _smoke(python, "--generate", cwd=tmp_path)
    assert out["metadata_problem"] is None and out["finite"]
