"""The libraries a model needs (diffusers, transformers), checked once, with the one command that fixes them.

The node pack must load even when a host's ComfyUI cannot import diffusers (an installer moved
huggingface-hub under transformers, say): nothing at import time needs diffusers, and every entry
point that builds a model calls :func:`require_model_libraries`, which raises one line naming the
problem and the command that repairs it. That command runs the pack's ``install.py``, which picks
the newest diffusers that fits the torch / transformers / huggingface-hub / tokenizers already
installed, and never changes them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import shlex
import sys

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff")

DIFFUSERS_REQUIREMENT = "diffusers>=0.27.0"
TRANSFORMERS_REQUIREMENT = "transformers>=4.38.0"

# (module, names imported from it): what building a LayerDiff model touches.
_CHECKS = (
    ("transformers", ("CLIPTextModel", "CLIPTextConfig", "PreTrainedTokenizerFast")),
    ("diffusers", ("UNet2DConditionModel", "AutoencoderKL")),
)

_PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_script() -> str | None:
    """The pack's ``install.py`` beside the ``layerdiff`` package, when this is a pack checkout."""
    path = os.path.join(_PACK_DIR, "install.py")
    return path if os.path.isfile(path) else None


def fix_command() -> str:
    """The shell command that installs the model libraries without moving torch/transformers/hub."""
    python = shlex.quote(sys.executable)
    script = install_script()
    if script is not None:
        return f"{python} {shlex.quote(script)}"
    return f"{python} -m pip install {shlex.quote(DIFFUSERS_REQUIREMENT)} {shlex.quote(TRANSFORMERS_REQUIREMENT)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _probe() -> str | None:
    for module_name, names in _CHECKS:
        try:
            module = importlib.import_module(module_name)
            for name in names:
                getattr(module, name)  # diffusers/transformers import lazily: this is the real import
        except Exception as exc:  # any failure here (ImportError, RuntimeError from a lazy module, ...)
            return f"{module_name} cannot be imported ({_first_line(exc)})"
    return None


@functools.lru_cache(maxsize=1)
def model_libraries_problem() -> str | None:
    """None when diffusers and transformers import; else one line: what fails and the fix."""
    problem = _probe()
    if problem is None:
        return None
    return f"LayerDiff needs diffusers and transformers: {problem}. Fix: run {fix_command()} and restart"


def require_model_libraries() -> None:
    """Raise LayerDiffError (one line, with the fixing command) when diffusers/transformers cannot be used."""
    problem = model_libraries_problem()
    if problem is not None:
        raise LayerDiffError(problem)


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata_problem() -> str | None:
    """The same question answered from package metadata only (milliseconds, nothing imported): a model
    library missing, older than this pack needs, or with one of its own requirements unmet (the usual
    way an installer breaks diffusers: huggingface-hub moved under it). None when all is consistent."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging comes with transformers; without it, fall back to the import probe
        return model_libraries_problem()
    for requirement in (TRANSFORMERS_REQUIREMENT, DIFFUSERS_REQUIREMENT):
        ours = Requirement(requirement)
        version = _installed_version(ours.name)
        if version is None:
            return f"{ours.name} is not installed"
        try:
            if not ours.specifier.contains(Version(version), prereleases=True):
                return f"{ours.name} {version} is installed, this pack needs {ours.specifier}"
        except InvalidVersion:
            continue
        for text in importlib.metadata.requires(ours.name) or ():
            try:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue  # an optional extra, or another platform's dependency
                have = _installed_version(req.name)
                if have is None:
                    return f"{ours.name} {version} needs {req}, which is not installed"
                if req.specifier and not req.specifier.contains(Version(have), prereleases=True):
                    return f"{ours.name} {version} needs {req}, but {req.name} {have} is installed"
            except (InvalidRequirement, InvalidVersion):
                continue
    return None


def log_problem_once() -> str | None:
    """At the pack's load time: log, as one warning line, why diffusers/transformers would not work
    (judged from package metadata, so loading stays fast); return that line or None."""
    problem = metadata_problem()
    if problem is not None:
        problem = f"LayerDiff needs diffusers and transformers: {problem}. Fix: run {fix_command()} and restart"
    if problem is not None and not getattr(log_problem_once, "_done", False):
        log_problem_once._done = True  # type: ignore[attr-defined]
        logger.warning(problem)
    return problem
