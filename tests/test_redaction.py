"""Credential redaction (ddsmon.redaction): one URI, and every URI inside free text."""

from __future__ import annotations

import random
import re

import pytest

from ddsmon.redaction import SECRET_ENV_VARS, redact_uri, scrub


@pytest.fixture(autouse=True)
def _no_secrets_in_env(monkeypatch):
    for var in SECRET_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


# The two implementations this module replaced, kept here as the reference behaviour.
def _old_redact_uri(uri: str) -> str:  # was ddsmon.config.redact_uri
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{tail}"


_OLD_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@]+@")


def _old_scrub_uris(text: str) -> str:  # was the URI part of ddsmon.sinks.mlflow_http.scrub
    return _OLD_USERINFO.sub(r"\1***@", text)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:s3cret@host:5000/x", "http://***@host:5000/x"),
        ("http://host:5000", "http://host:5000"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("postgresql://u:p@127.0.0.1:5432/db", "postgresql://***@127.0.0.1:5432/db"),
        ("https://u:p@ss@host/x", "https://***@host/x"),  # an unencoded @ in the password
        ("https://token@host", "https://***@host"),
        ("http://host/path?mail=a@b", "http://host/path?mail=a@b"),  # past the authority
        ("databricks", "databricks"),
        ("", ""),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown
    assert scrub(uri) == shown  # a URI alone is free text with one URI in it


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "API request to https://u:p@host/x failed",
            "API request to https://***@host/x failed",
        ),
        (
            "tried http://a:b@h1:5000 then s3://key:secret@bucket/p",
            "tried http://***@h1:5000 then s3://***@bucket/p",
        ),
        ("glued: http://a:b@h1,http://c:d@h2/x", "glued: http://***@h1,http://***@h2/x"),
        ("('postgresql://u:p@db:5432/m')", "('postgresql://***@db:5432/m')"),
        ("no URI here: user@example.org", "no URI here: user@example.org"),
        ("http://host:5000/api refused", "http://host:5000/api refused"),
    ],
)
def test_scrub_redacts_every_uri_in_text(text: str, shown: str) -> None:
    assert scrub(text) == shown


def test_scrub_removes_secret_values_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-token")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "ab")  # too short to replace safely
    assert scrub("API request to https://u:p@host/x failed; token hunter2-token") == (
        "API request to https://***@host/x failed; token ***"
    )
    assert scrub("ab cab") == "ab cab"


def test_same_results_as_the_implementations_it_replaces() -> None:
    """``redact_uri`` is the old ``config.redact_uri`` exactly; ``scrub`` leaves nothing
    the old scrub would have redacted (and is idempotent)."""
    tokens = ["http://", "s3+x://", "u", "p", ":", "@", "/", " ", ",", "host", "9", "?", "\n"]
    rng = random.Random(20260101)
    for _ in range(5000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 14)))
        assert redact_uri(text) == _old_redact_uri(text), text
        shown = scrub(text)
        assert _old_scrub_uris(shown) == shown, (text, shown)
        assert scrub(shown) == shown, (text, shown)


def test_importing_it_pulls_in_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ddsmon; before = set(sys.modules); import ddsmon.redaction; "
        "print(sorted(m for m in set(sys.modules) - before if not m.startswith('ddsmon')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # ``re`` and ``os`` are loaded by Python itself
