"""Talking to a tracking store that may be down: the error policy of every MLflow call.

* :data:`HTTP_ENV_DEFAULTS` / :func:`configure_http_env`: fast-failing HTTP settings, so
  that a down server fails in seconds rather than minutes.
* :func:`store_fault`: what an error says about the store, one of three:

  - **unreachable** (:class:`Unreachable`): the store did not answer, or answered that
    it cannot now: connection refused or reset, a timeout, HTTP 5xx, 429, MLflow's
    TEMPORARILY_UNAVAILABLE and the like, a TLS connection cut short. Transient: the
    records are spooled and retried.
  - **not usable as configured** (:class:`Misconfigured`, an :class:`Unreachable`):
    something answered, but not as an MLflow server ddsmon can use: a TLS certificate
    that fails verification, ``https://`` to a server that does not speak TLS, an
    answer that is not MLflow's JSON (a sign-in page or proxy answering 200 with HTML,
    a 404 page from a URI that is not an MLflow server), credentials refused (401) or
    access denied (403). Retrying does not help until someone changes a setting, so at
    start-up the sink makes it a settings error, :class:`StoreNotUsable`, naming the
    URI and the cause (exit 2 before anything is read). Once running, the records are
    spooled as for an outage, never dropped (a proxy fixed or a certificate renewed at
    the server needs no restart), and the cause is said instead of "unreachable".
  - **the request was wrong** (None): a bad parameter, a missing run: reported,
    never retried.
* :func:`is_unreachable`: whether :func:`store_fault` sees either of the first two.
* :func:`call`: one MLflow call; a store fault is raised as its :class:`Unreachable` or
  :class:`Misconfigured`, the message scrubbed of credentials
  (:func:`ddsmon.redaction.scrub`); any other error is raised unchanged.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Iterator, MutableMapping
from typing import ParamSpec, TypeVar

from ddsmon.errors import ConfigError
from ddsmon.redaction import scrub

__all__ = (
    "HTTP_ENV_DEFAULTS",
    "Misconfigured",
    "StoreNotUsable",
    "Unreachable",
    "call",
    "configure_http_env",
    "is_unreachable",
    "misconfiguration",
    "store_fault",
)

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
#: MLflow's error codes (JSON answers) for credentials refused and access denied.
_REFUSED_CODES = frozenset({"UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"})
_DENIED_CODES = frozenset({"PERMISSION_DENIED"})
#: HTTP statuses of an answer that is not MLflow's JSON and still means "try again".
_TRANSIENT_STATUSES = frozenset({408, 425, 429})

#: MLflow's REST client (``mlflow.utils.rest_utils.verify_rest_response``): a 200 whose
#: body is not JSON, and a non-200 whose body is not JSON (a JSON body is a RestException).
_NOT_JSON_200 = "API request to endpoint was successful but the response body was not"
_NOT_JSON_STATUS = re.compile(
    r"API request to endpoint (?P<endpoint>\S+) failed with error code (?P<status>\d+) "
    r"!= \d+\. Response body: '(?P<body>.*)'\Z",
    re.S,
)
_BODY = re.compile(r"Response body: '(?P<body>.*)'\Z", re.S)
_TITLE = re.compile(r"<title[^>]*>(?P<title>.*?)</title>", re.S | re.I)
_TAGS = re.compile(r"<[^>]*>")

_CERT_ADVICE = (
    "give the CA certificate that signed it with MLFLOW_TRACKING_SERVER_CERT_PATH=FILE, "
    "or set MLFLOW_TRACKING_INSECURE_TLS=true to skip the check"
)
_NOT_MLFLOW_ADVICE = (
    "a sign-in page or proxy in front of the server, or a tracking URI that is not an MLflow server"
)
_CREDENTIALS_ADVICE = (
    "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
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


class Unreachable(Exception):
    """The tracking store did not answer; the message is scrubbed of credentials and the
    original error is the ``__cause__``."""


class Misconfigured(Unreachable):
    """The store answered, but not as an MLflow server ddsmon can use (see the module
    docstring); the message is the cause, a clause to follow ``MLflow at URI: ``.
    Spooled and retried as :class:`Unreachable` is, except at start-up."""


class StoreNotUsable(ConfigError):
    """A :class:`Misconfigured` store at start-up: a settings error (exit 2), naming the
    URI and the cause."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _shown_body(body: str, most: int = 80) -> str:
    """What an answer's body was, in a few words: an HTML page's title, else its text."""
    title = _TITLE.search(body)
    if title is not None:
        text = " ".join(_TAGS.sub(" ", title.group("title")).split())
        if text:
            return f"an HTML page titled {_cut(text, most)!r}"
    text = " ".join(body.split())
    if not text:
        return "an empty body"
    kind = "an HTML page" if text.lstrip().startswith("<") else "a body"
    return f"{kind}: {_cut(text, most)!r}"


def _cut(text: str, most: int) -> str:
    return scrub(text if len(text) <= most else text[: most - 1] + "…")


#: OpenSSL's verify codes of a certificate issued for another name, and of one expired.
_NAME_MISMATCH = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
_EXPIRED = frozenset({10})  # X509_V_ERR_CERT_HAS_EXPIRED


def _tls_fault(exc: ssl.SSLError) -> str | None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = str(exc.verify_message or exc.reason or exc).rstrip(".")
        if exc.verify_code in _NAME_MISMATCH:
            return (
                f"its TLS certificate was issued for another name ({why}); use the host "
                "name the certificate names in the URI, or have it issued with this one "
                "in its subjectAltName"
            )
        if exc.verify_code in _EXPIRED:
            return f"its TLS certificate has expired ({why}); renew it at the server"
        return f"its TLS certificate failed verification ({why}); {_CERT_ADVICE}"
    if exc.reason == "WRONG_VERSION_NUMBER":
        return (
            "the TLS handshake failed (wrong version number): the server does not speak "
            "TLS; a plain HTTP server takes an http:// URI"
        )
    return None  # a handshake cut short (EOF, reset): transient


def misconfiguration(exc: BaseException) -> str | None:
    """Why ``exc`` says the store answered but is not usable as configured (a clause to
    follow ``MLflow at URI: ``), or None. See the module docstring for what counts."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()  # type: ignore[assignment,misc]
    for cur in _chain(exc):
        if isinstance(cur, ssl.SSLError):
            return _tls_fault(cur)
        if not isinstance(cur, MlflowException):
            continue
        code = str(getattr(cur, "error_code", ""))
        message = str(getattr(cur, "message", cur))
        if message.startswith(_NOT_JSON_200):
            body = _BODY.search(message)
            shown = _shown_body(body.group("body")) if body else "a body"
            return f"it answered HTTP 200 with {shown}, not MLflow's JSON ({_NOT_MLFLOW_ADVICE}?)"
        status_answer = _NOT_JSON_STATUS.match(message)
        if status_answer is not None:
            status = int(status_answer.group("status"))
            if status >= 500 or status in _TRANSIENT_STATUSES:
                return None
            shown = _shown_body(status_answer.group("body"))
            endpoint = status_answer.group("endpoint")
            if status == 401:
                return f"it answered HTTP 401 (not signed in) with {shown}; {_CREDENTIALS_ADVICE}"
            return (
                f"it answered HTTP {status} to {endpoint} with {shown}, not MLflow's JSON "
                f"({_NOT_MLFLOW_ADVICE}?)"
            )
        first = message.strip().splitlines()[0] if message.strip() else ""
        first = _cut(first.removeprefix(f"{code}: ") or code, 200)
        if code in _REFUSED_CODES:
            return f"it refused the credentials ({code}: {first}); {_CREDENTIALS_ADVICE}"
        if code in _DENIED_CODES:
            return (
                f"it denied access ({code}: {first}); the user needs permission to read and "
                "write the experiment's runs"
            )
    return None


def _unreachable(exc: BaseException) -> bool:
    """Connection-type: builtin ConnectionError/TimeoutError, any ``requests`` exception,
    botocore endpoint/timeout errors (S3 artifact stores), and MlflowExceptions coded
    TEMPORARILY_UNAVAILABLE, DEADLINE_EXCEEDED, REQUEST_LIMIT_EXCEEDED and the like, or
    INTERNAL_ERROR raised by MLflow's REST client for a failed transport ("API request to
    ... failed": refused, reset, 5xx after retries). Any other MlflowException (a bad
    request, a missing run) is not."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()  # type: ignore[assignment,misc]
    try:
        from requests.exceptions import RequestException
    except ImportError:  # pragma: no cover
        RequestException = ()  # type: ignore[assignment,misc]
    for cur in _chain(exc):
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
    return False


def store_fault(exc: BaseException) -> Unreachable | None:
    """What ``exc`` says about the store (the module docstring's three cases): a
    :class:`Misconfigured`, an :class:`Unreachable` (both with ``exc`` to raise them
    from), or None for a request that was wrong."""
    if isinstance(exc, Unreachable):
        return exc
    reason = misconfiguration(exc)
    if reason is not None:
        return Misconfigured(reason)
    if _unreachable(exc):
        return Unreachable(scrub(str(exc)))
    return None


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is a store fault (unreachable, or not usable as configured: both
    spooled and retried) rather than a request that was wrong."""
    return store_fault(exc) is not None


def call(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``fn(*args, **kwargs)``; a store fault (:func:`store_fault`) is raised as
    :class:`Unreachable` or :class:`Misconfigured`, anything else as it is."""
    try:
        return fn(*args, **kwargs)
    except Unreachable:
        raise
    except Exception as exc:
        fault = store_fault(exc)
        if fault is not None:
            raise fault from exc
        raise
