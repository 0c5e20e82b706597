"""Glob matching for ``like`` (fnmatch semantics, case-sensitive) with a bounded cache.

The standard library's fnmatch keeps up to 32,768 compiled patterns whatever
their size, so clients' filters (each pattern up to limits.filter_bytes)
could make it hold gigabytes. Here compiled patterns live in an LRU of
``MAX_CACHED`` entries, and patterns longer than ``MAX_CACHED_LENGTH`` are
compiled for their caller and never kept.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable

MAX_CACHED = 256
MAX_CACHED_LENGTH = 1024

Matcher = Callable[[str | bytes], re.Match | None]


def _build(pattern: str | bytes) -> Matcher:
    if isinstance(pattern, bytes):  # as fnmatch does: bytes patterns through latin-1
        return re.compile(fnmatch.translate(pattern.decode("latin-1")).encode("latin-1")).match
    return re.compile(fnmatch.translate(pattern)).match


_cached = functools.lru_cache(maxsize=MAX_CACHED, typed=True)(_build)


def compile(pattern: str | bytes) -> Matcher:  # noqa: A001 (re.compile's name, on purpose)
    """A function telling whether a whole name matches ``pattern`` (truthy match or None)."""
    return _cached(pattern) if len(pattern) <= MAX_CACHED_LENGTH else _build(pattern)


def fnmatchcase(name: str | bytes, pattern: str | bytes) -> bool:
    """``fnmatch.fnmatchcase`` with the bounded cache: * ? [seq] [!seq], case-sensitive."""
    return compile(pattern)(name) is not None


def cache_info():
    """The LRU's statistics (hits, misses, maxsize, currsize)."""
    return _cached.cache_info()
