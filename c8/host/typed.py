"""Typed access to parsed JSON: a value of the wrong type reads as absent.

Runtime state files are written by whoever can write them; a reader asks for
the type it uses (``text(doc, "Config", "Image")``), and a list where a map
was expected gives the default, never a TypeError.
"""

from __future__ import annotations

from typing import Any

MAX_TEXT = 4096  # characters kept of one string value


def _walk(doc: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def mapping(doc: Any, *keys: str) -> dict:
    """The dict at ``keys`` below ``doc``; {} when absent or not a dict."""
    value = _walk(doc, keys)
    return value if isinstance(value, dict) else {}


def text(doc: Any, *keys: str, default: str = "") -> str:
    """The string at ``keys`` (cut to MAX_TEXT); ``default`` when absent or not a string."""
    value = _walk(doc, keys)
    return value[:MAX_TEXT] if isinstance(value, str) else default


def texts(doc: Any, *keys: str, limit: int = 4096) -> list[str]:
    """The strings of the list at ``keys`` (non-strings skipped, at most ``limit``)."""
    value = _walk(doc, keys)
    if not isinstance(value, list):
        return []
    return [v[:MAX_TEXT] for v in value[:limit] if isinstance(v, str)]


def records(doc: Any, limit: int = 1 << 16) -> list[dict]:
    """The dicts of a top-level list (other items skipped)."""
    if not isinstance(doc, list):
        return []
    return [v for v in doc[:limit] if isinstance(v, dict)]


def string_map(value: Any) -> dict[str, str]:
    """The str -> str items of a dict (annotations); others dropped."""
    if not isinstance(value, dict):
        return {}
    return {k: v[:MAX_TEXT] for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
