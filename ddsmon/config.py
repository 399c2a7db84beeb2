"""The daemon's settings: one frozen :class:`Config`, from flags and ``ddsmon.toml``.

Precedence (highest first): command-line flags (and their environment variables), the
file given by ``--config``, ``ddsmon.toml`` in the watched directory, the defaults below.
Keys in the file are the long option names with ``-`` or ``_``; event thresholds live
in an ``[events]`` table whose keys are :class:`ddsmon.events.EventConfig` fields.

Example ``ddsmon.toml``::

    model = "examples/modular_addition/model.py:make_model"
    probe = "probe.pt"
    loss = "ce"
    experiment = "grokking"

    [events]
    ratio_decades = 2.0
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddsmon.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ("DEFAULT_TRACKING_URI", "Config", "load_config_file", "redact_uri")

log = logging.getLogger(__name__)

#: MLflow's embedded default: a local SQLite store in the working directory, nothing to start.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CONFIG_FILENAME = "ddsmon.toml"


@dataclass(frozen=True)
class Config:
    """Everything a watch/scan/report run needs, fully resolved.

    directory: the checkpoint directory (None for ``report``).
    model: ``MODULE:FACTORY`` or ``path/to/file.py:FACTORY`` (None only for Hugging Face
        folders, built from their config.json).
    probe: a torch file holding {"inputs", "targets"} or ``MODULE:FUNCTION``.
    loss / layers / device / fisher / forward_dtype / max_probe_rows: engine settings.
    threads: torch's intra-op CPU threads (``torch.set_num_threads``; None: torch's
        default, ``OMP_NUM_THREADS`` or the physical cores), applied by the Daemon and
        ``report``. Below the core count when ddsmon shares the machine with a training
        job, whose threads would otherwise contend with ddsmon's (oversubscription).
    tracking_uri / experiment / run_id / run_name: where readings go in MLflow.
    events_json / on_event: alert outputs. fail_on_event: kinds that make ``scan`` exit 1.
    poll: polling-observer interval (None: native events). quiet: seconds a file must
        stay unchanged before it is read when no close-write event is seen.
    trust_checkpoints: allow full unpickling (unsafe for files from others).
    state_dir: where restart state, the claim lock and the spool live
        (default ``<directory>/.ddsmon``).
    events: keyword arguments for :class:`ddsmon.events.EventConfig`.
    """

    directory: Path | None = None
    model: str | None = None
    probe: str | None = None
    loss: str = "ce"
    layers: str | None = None
    device: str = "auto"
    fisher: str = "both"
    forward_dtype: str = "float64"
    max_probe_rows: int | None = None
    threads: int | None = None
    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = "ddsmon"
    run_id: str | None = None
    run_name: str | None = None
    events_json: Path | None = None
    on_event: str | None = None
    fail_on_event: tuple[str, ...] = ()
    poll: float | None = None
    quiet: float = 2.0
    trust_checkpoints: bool = False
    state_dir: Path | None = None
    plots: bool = True
    prefetch: bool = True
    events: Mapping[str, Any] = field(default_factory=dict)

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        if self.directory is None:
            raise ConfigError("no state directory: give --state-dir or a checkpoint directory")
        return self.directory / ".ddsmon"


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_PATH_KEYS = {"directory", "events_json", "state_dir"}
_POSITIVE_INT_KEYS = {"threads", "max_probe_rows"}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ``ddsmon.toml``; unknown keys and bad values name the file and the key."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _FIELDS or name == "directory":
            known = ", ".join(sorted(k for k in _FIELDS if k != "directory"))
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: {known})")
        if name == "events":
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: [events] must be a table")
            _check_event_keys(path, value)
        elif name in _PATH_KEYS and isinstance(value, str):
            value = (
                (path.parent / value).resolve() if not Path(value).is_absolute() else Path(value)
            )
        elif name in _POSITIVE_INT_KEYS and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(
                f"config file {path}: {key} must be a whole number >= 1, got {value!r}"
            )
        elif name == "fail_on_event":
            value = tuple([value] if isinstance(value, str) else value)
        out[name] = value
    return out


def _check_event_keys(path: Path, table: Mapping[str, Any]) -> None:
    from ddsmon.events import EventConfig

    known = {f.name for f in dataclasses.fields(EventConfig)}
    for key in table:
        if key not in known:
            raise ConfigError(
                f"config file {path}: unknown key {key!r} in [events] (known: {', '.join(sorted(known))})"
            )


def redact_uri(uri: str) -> str:
    """A tracking URI safe to print: any ``user:password@`` part replaced by ``***@``."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{tail}"
