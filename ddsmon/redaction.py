"""Credentials kept out of anything ddsmon prints or logs: one implementation.

:func:`redact_uri`
    One URI (a tracking URI, a database URL) made safe to show: everything up to the last
    ``@`` of its authority (the part between ``scheme://`` and the first ``/``), the
    ``user:password`` of ``scheme://user:password@host``, becomes ``***``. A string with no
    ``://`` is returned as it is.
:func:`scrub`
    Free text (an error message, a log line) made safe to log: :func:`redact_uri` applied
    to every ``scheme://authority`` inside it (an authority ends at a ``/``, at white space
    or where another ``scheme://`` begins), then the values of the environment variables
    ``MLFLOW_TRACKING_PASSWORD`` and ``MLFLOW_TRACKING_TOKEN`` (3 characters or more)
    replaced by ``***`` wherever they appear.

Standard library only: importable before any heavy dependency.
"""

from __future__ import annotations

import os
import re

__all__ = ("SECRET_ENV_VARS", "redact_uri", "scrub")

#: Environment variables whose values :func:`scrub` removes from free text.
SECRET_ENV_VARS: tuple[str, ...] = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

_SCHEME = r"[a-zA-Z][a-zA-Z0-9+.\-]*://"
#: ``scheme://authority`` in free text: the authority stops at ``/``, white space or the
#: start of the next ``scheme://``.
_URI_AUTHORITY = re.compile(rf"\b{_SCHEME}(?:(?!{_SCHEME})[^/\s])*")


def redact_uri(uri: str) -> str:
    """``uri`` safe to print: any ``user:password@`` part replaced by ``***@``.

    >>> redact_uri("http://alice:s3cret@host:5000/x")
    'http://***@host:5000/x'
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{tail}"


def scrub(text: str) -> str:
    """``text`` with the credentials of every URI in it (``scheme://user:pass@``) and the
    values of :data:`SECRET_ENV_VARS` replaced by ``***``.

    >>> scrub("API request to https://u:p@host/x failed")
    'API request to https://***@host/x failed'
    """
    out = _URI_AUTHORITY.sub(lambda m: redact_uri(m.group(0)), text)
    for var in SECRET_ENV_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 3:
            out = out.replace(secret, "***")
    return out
