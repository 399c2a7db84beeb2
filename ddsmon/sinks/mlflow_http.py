"""Talking to a tracking store that may be down: the error policy of every MLflow call.

* :data:`HTTP_ENV_DEFAULTS` / :func:`configure_http_env`: fast-failing HTTP settings, so
  that a down server fails in seconds rather than minutes.
* :func:`is_unreachable`: whether an error means "the store did not answer" (worth
  spooling and retrying) rather than "the request was wrong" (reported, never retried).
* :func:`call`: one MLflow call; a connection-type failure becomes :class:`Unreachable`,
  its message scrubbed of credentials (:func:`ddsmon.redaction.scrub`); any other error
  is raised unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from typing import ParamSpec, TypeVar

from ddsmon.redaction import scrub

__all__ = ("HTTP_ENV_DEFAULTS", "Unreachable", "call", "configure_http_env", "is_unreachable")

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: Environment defaults the sink sets (only where unset) so a down server fails fast.
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

_TRANSIENT_CODES = frozenset(
    {
        "TEMPORARILY_UNAVAILABLE",
        "WORKSPACE_TEMPORARILY_UNAVAILABLE",
        "SERVICE_UNDER_MAINTENANCE",
        "DEADLINE_EXCEEDED",
        "ABORTED",
        "REQUEST_LIMIT_EXCEEDED",
    }
)
_TRANSIENT_NAMES = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"}
)


def configure_http_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`HTTP_ENV_DEFAULTS` where the environment does not already say; return
    what was set."""
    env = os.environ if environ is None else environ
    applied = {}
    for key, value in HTTP_ENV_DEFAULTS.items():
        if key not in env:
            env[key] = value
            applied[key] = value
    return applied


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking store could not be reached (worth spooling and
    retrying) rather than that the request itself was wrong.

    Connection-type: builtin ConnectionError/TimeoutError, any ``requests`` exception,
    botocore endpoint/timeout errors (S3 artifact stores), and MlflowExceptions coded
    TEMPORARILY_UNAVAILABLE, DEADLINE_EXCEEDED, REQUEST_LIMIT_EXCEEDED and the like, or
    INTERNAL_ERROR raised by MLflow's REST client for a failed transport ("API request to
    ... failed": refused, reset, 5xx after retries). Any other MlflowException (a bad
    request, a missing run) is not.
    """
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()  # type: ignore[assignment,misc]
    try:
        from requests.exceptions import RequestException
    except ImportError:  # pragma: no cover
        RequestException = ()  # type: ignore[assignment,misc]
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionError, TimeoutError, RequestException)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(cur).__mro__):
            return True
        if isinstance(cur, MlflowException):
            code = getattr(cur, "error_code", "")
            if code in _TRANSIENT_CODES:
                return True
            if code != "INTERNAL_ERROR":
                return False
            if str(getattr(cur, "message", cur)).startswith("API request to"):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


class Unreachable(Exception):
    """The tracking store did not answer; the message is scrubbed of credentials and the
    original error is the ``__cause__``."""


def call(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``fn(*args, **kwargs)``; a connection-type failure (:func:`is_unreachable`) is
    raised as :class:`Unreachable`, anything else as it is."""
    try:
        return fn(*args, **kwargs)
    except Unreachable:
        raise
    except Exception as exc:
        if is_unreachable(exc):
            raise Unreachable(scrub(str(exc))) from exc
        raise
