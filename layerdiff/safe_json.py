"""JSON text nobody vouches for (a model file's config, a safetensors header, a data file), parsed with
bounds: ``json.loads`` recurses once per nesting level (RecursionError on deep input), accepts
NaN/Infinity and turns a 10**6-digit integer into minutes of work; :func:`parse_json` does none of that.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# a string literal, or an unterminated one up to the end (so no quote is scanned twice: linear time)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_JSON_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_JSON_PAIR = re.compile(r"[\[{][\]}]")
_JSON_INT_DIGITS = 40  # safetensors offsets need 20


def _json_depth_exceeds(text: str, max_depth: int) -> bool:
    """True when the brackets outside strings nest deeper than ``max_depth`` (or do not balance)."""
    brackets = _JSON_NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(max_depth):  # each pass removes the innermost pairs
        brackets, n = _JSON_PAIR.subn("", brackets)
        if not n:
            break
    return bool(brackets)


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} overflows a float")
    return value


def _json_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {show_json(key)} appears twice in one object")
        out[key] = value
    return out


def parse_json(text: str, max_depth: int) -> Any:
    """``json.loads`` for untrusted text: refuses nesting deeper than ``max_depth`` (checked before
    parsing), NaN/Infinity, overflowing numbers, integers of more than 40 digits and repeated keys.
    Raises ValueError with a one-line reason."""
    if _json_depth_exceeds(text, max_depth):
        raise ValueError(f"brackets nested deeper than {max_depth} levels, or unbalanced")
    return json.loads(
        text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant,
        object_pairs_hook=_json_object,
    )


def show_json(value: Any, limit: int = 40) -> str:
    """``value`` as JSON text (its repr if it has none) of at most ``limit`` characters, for a message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
