"""shown(): names in log lines and messages stay one unforgeable line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ddsmon.shown import shown


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("runs/step_10.pt", "runs/step_10.pt"),
        ("café/模型 1.pt", "café/模型 1.pt"),  # printable non-ASCII and spaces kept
        ("a\nb", "a\\nb"),
        ("a\r\tb", "a\\r\\tb"),
        ("\x1b[31mred", "\\x1b[31mred"),  # ANSI escape
        ("x\u202ept.exe", "x\\u202ept.exe"),  # right-to-left override
        ("line\u2028sep\x85", "line\\u2028sep\\x85"),  # Unicode line breaks
        ("back\\nslash", "back\\\\nslash"),  # a literal backslash cannot fake an escape
        ("\U000e0001tag", "\\U000e0001tag"),
    ],
)
def test_escapes_what_is_not_printable(raw: str, expected: str) -> None:
    assert shown(raw) == expected
    assert shown(raw).isprintable()


def test_paths_bytes_and_other_values() -> None:
    assert shown(Path("/ckpt/step\n1.pt")) == "/ckpt/step\\n1.pt"
    assert shown(b"bad\xff\n.pt") == "bad\\udcff\\n.pt"  # undecodable byte, as fsdecode gives
    assert shown(42) == "42"


def test_a_forged_line_stays_in_its_record(caplog) -> None:
    name = "step_1.pt\nERROR ddsmon: everything is fine"
    with caplog.at_level(logging.WARNING):
        logging.getLogger("ddsmon.test").warning("%s rejected", shown(name))
    assert caplog.text.count("\n") == 1  # one record, one line
