"""The layout's rules (docs/architecture.md), read from the code itself: who may import whom (lazy
imports inside functions included), and how long a module or a function may grow."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "layerdiff"
MODULE_LINES = 500
FUNCTION_LINES = 100
REASON = "Why long:"  # a module or function past its limit says why in its docstring, after these words

# (importer prefix, forbidden prefixes): the arrows of docs/architecture.md
RULES = [
    ("layerdiff.sampling", ("layerdiff.io", "layerdiff.data", "layerdiff.training", "layerdiff.evaluation",
                            "layerdiff.cli")),
    ("layerdiff.pipeline", ("layerdiff.io", "layerdiff.data", "layerdiff.training", "layerdiff.evaluation",
                            "layerdiff.cli")),
    ("layerdiff.conditioning", ("layerdiff.io", "layerdiff.data", "layerdiff.training", "layerdiff.evaluation",
                                "layerdiff.cli")),
    ("layerdiff.settings", ("layerdiff.io", "layerdiff.data", "layerdiff.training", "layerdiff.evaluation",
                            "layerdiff.cli", "layerdiff.model", "layerdiff.sampling")),
    ("layerdiff.config", ("layerdiff.io",)),
    ("layerdiff.config_check", ("layerdiff.io",)),
    ("layerdiff.safe_json", ("layerdiff.io",)),
    ("layerdiff.model", ("layerdiff.io",)),
    ("layerdiff", ("nodes", "comfy", "folder_paths", "comfy_extras", "server", "execution")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]  # `from layerdiff import io`
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(files) -> list[str]:
    found = []
    for path in files:
        me = module_name(path)
        for line, target in imports(path):
            for importer, forbidden in RULES:
                if _under(me, importer) and any(_under(target, f) for f in forbidden):
                    found.append(f"{path.relative_to(REPO)}:{line}: {me} imports {target}")
            if _under(target, "layerdiff.cli") and not (_under(me, "layerdiff.cli") or me == "layerdiff.__main__"
                                                        or path.parts[-2] == "tests"):
                found.append(f"{path.relative_to(REPO)}:{line}: {me} imports the command line ({target})")
    return sorted(set(found))


def library_files():
    return sorted(LIBRARY.rglob("*.py"))


def test_the_import_rules_hold():
    assert violations(library_files()) == []


def test_only_host_reaches_comfyui():
    found = []
    for path in sorted((REPO / "nodes").rglob("*.py")):
        if path.name == "_host.py":
            continue
        for line, target in imports(path):
            if any(_under(target, f) for f in ("comfy", "folder_paths", "comfy_extras", "server", "execution")):
                found.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert found == []


def test_the_rule_checker_catches_what_it_should(tmp_path, monkeypatch):
    """The checker itself: a lazy import inside a function, a relative import and a `from x import
    io` are all seen."""
    pkg = tmp_path / "layerdiff"
    (pkg / "sampling").mkdir(parents=True)
    (pkg / "config.py").write_text("def f():\n    from layerdiff.io import files\n")
    (pkg / "sampling" / "loop.py").write_text("from ..data import toy\nfrom layerdiff import evaluation\n")
    (pkg / "pipeline.py").write_text("import layerdiff.cli.generate\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = violations(sorted(pkg.rglob("*.py")))
    assert any("config imports layerdiff.io" in f for f in found)
    assert any("loop imports layerdiff.data" in f for f in found)
    assert any("imports layerdiff.evaluation" in f for f in found)
    assert any("pipeline imports layerdiff.cli.generate" in f for f in found)


def _docstring(node) -> str:
    return ast.get_docstring(node) or ""


def too_long(files) -> list[str]:
    found = []
    for path in files:
        text = path.read_text()
        tree = ast.parse(text)
        lines = len(text.splitlines())
        if lines > MODULE_LINES and REASON not in _docstring(tree):
            found.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > FUNCTION_LINES and REASON not in _docstring(node):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name}() {n} lines")
    return found


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_modules_and_functions_stay_small_or_say_why(path):
    assert too_long([path]) == []
