"""How loading errors word what they found: exceptions, listings, kinds of object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_LISTED = 5

_TRUST_HINT = (
    "pass --trust-checkpoints to load it anyway, only for files you trust "
    "(unpickling can run arbitrary code)"
)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(str(exc))}" if str(exc) else type(exc).__name__


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 300 else line[:297] + "..."


def _listing(items: list[Any], noun: str) -> str:
    """``"3 keys ('a', 'b', 'c')"``: the first few items, quoted, and the count."""
    shown = ", ".join(repr(i) for i in items[:_LISTED])
    more = ", ..." if len(items) > _LISTED else ""
    if not noun:
        return f"{shown}{more}"
    return f"{len(items)} {noun if len(items) != 1 else noun.rstrip('s')} ({shown}{more})"


def _kind_of(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with keys {_listing(list(obj), '')}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"
