"""Names as they may appear in a log line or an error message: one line, unforgeable.

A checkpoint directory is written by other people's code, so a file name can hold a
newline, a carriage return, an ANSI escape or a right-to-left override. Put into a log
line as is, such a name starts a second, forged line (``step_1.pt\\nERROR ...``) or
rewrites the terminal. :func:`shown` escapes every character that is not printable the
way :func:`repr` does (``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\u202e``, and the
``\\udcXX`` surrogates :func:`os.fsdecode` makes of undecodable bytes), and doubles a
backslash so that an escape can never be faked by a name either. Printable text, spaces
and non-ASCII letters included, is kept as it is, so ordinary paths read unchanged:

>>> shown("runs/step_10.pt")
'runs/step_10.pt'
>>> shown("step_1.pt\\nERROR forged")
'step_1.pt\\\\nERROR forged'
>>> shown(b"caf\\xc3\\xa9/\\xff.pt")
'café/\\\\udcff.pt'

Use it for every file name, path or user-supplied string in a log line or a message:
``log.warning("%s rejected: %s", shown(path), shown(reason))``.
"""

from __future__ import annotations

import os

__all__ = ("shown",)

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def shown(value: object) -> str:
    """``value`` (a path, a str, bytes, or anything :func:`str` takes) as one safe line:
    control, format and other unprintable characters escaped repr-style, a backslash
    doubled; everything printable unchanged."""
    if isinstance(value, bytes):
        text = os.fsdecode(value)
    elif isinstance(value, os.PathLike):
        text = os.fsdecode(os.fspath(value))
    else:
        text = str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text)
