"""The daemon's settings, parsed once: :data:`SETTINGS` (every key, its type and its one
default) and :func:`resolve_config`, which turns defaults, files and flags into a frozen,
typed :class:`Config`.

Precedence (highest first): command-line flags (and ``MLFLOW_TRACKING_URI``), the file
given by ``--config``, ``ddsmon.toml`` found beside the checkpoints, the defaults in
:data:`SETTINGS`. Keys in a file are the long option names with ``-`` or ``_``; event
thresholds live in an ``[events]`` table parsed by :meth:`ddsmon.events.EventConfig.from_dict`.
Every value is checked against its type wherever it comes from: a wrong type is a
:class:`~ddsmon.errors.ConfigError` naming the file (or flag) and the key, never a
truthy string.

The trust boundary
------------------
A ``ddsmon.toml`` found in the watched directory can be written by whoever can write
checkpoints there (a shared run folder, a synced bucket). Settings that run code,
loosen loading, write files elsewhere or send the readings elsewhere
(:attr:`Setting.runs_code`: ``trust_checkpoints``, ``on_event``, ``model``/``probe``/
``loss`` given as ``MODULE:NAME`` or ``file.py:NAME``, ``events_json``, ``state_dir``,
``tracking_uri``, ``run_id``) are taken only
from the command line, from a file the user named with ``--config``, or from a directory
file the user allowed with ``ddsmon allow FILE`` (as direnv's ``allow``: the allowance
holds the file's path and a hash of its content, so an edit revokes it). Otherwise they
are dropped, with a warning naming each key and how to allow the file.

Example ``ddsmon.toml``::

    model = "examples/modular_addition/model.py:make_model"
    probe = "probe.pt"
    loss = "ce"
    experiment = "grokking"

    [events]
    ratio_decades = 2.0
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsmon.errors import ConfigError
from ddsmon.options import (
    BUILTIN_LOSSES,
    DEFAULT_FISHER,
    DEFAULT_FORWARD_DTYPE,
    DEFAULT_LOSS,
    DEFAULT_MAX_WIDTH,
    DEVICE_AUTO,
    FISHER_FAMILIES,
    FORWARD_DTYPES,
)
from ddsmon.redaction import redact_uri
from ddsmon.state import DEFAULT_STATE_NAME

if TYPE_CHECKING:
    from ddsmon.events import EventConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = (
    "CONFIG_FILENAME",
    "DEFAULT_TRACKING_URI",
    "SETTINGS",
    "AlertSettings",
    "Config",
    "ReadSettings",
    "Setting",
    "TrackingSettings",
    "WatchSettings",
    "allow_file",
    "is_allowed",
    "layer_names",
    "load_config_file",
    "parse_size",
    "redact_uri",
    "resolve_config",
)

log = logging.getLogger(__name__)

#: MLflow's embedded default: a local SQLite store in the working directory, nothing to start.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: The settings file looked for beside the checkpoints.
CONFIG_FILENAME = "ddsmon.toml"


# ------------------------------------------------------------------------ the table of keys


#: What a module name may hold (``blocks.0.attn``): a comma-separated list of such names
#: is a list of names; anything else (``^[02]{1,2}$``, ``attn|mlp``) is a regex.
_MODULE_NAME = re.compile(r"^[\w.\-]*$")


def layer_names(spec: str) -> list[str] | None:
    """``--layers`` as a list of module names when it holds a comma and every part is
    name-shaped (empty parts dropped: possibly none, which is an error to report), else
    None: a regex (or one exact name, which ``re.search`` also finds)."""
    if "," not in spec:
        return None
    parts = [p.strip() for p in spec.split(",")]
    if not all(_MODULE_NAME.match(p) for p in parts):
        return None
    return [p for p in parts if p]


def _code_spec(value: Any) -> bool:
    """True for ``MODULE:NAME`` / ``file.py:NAME``, which imports (runs) code."""
    return isinstance(value, str) and ":" in value


def _probe_runs_code(value: Any) -> bool:
    """A probe file is read with ``weights_only``; a probe *function* is imported. Any
    value with a ``:`` counts as a function, even where a file of that name exists now:
    the file could be gone by the time the probe is loaded (a check-then-use race)."""
    return _code_spec(value)


def _given(value: Any) -> bool:
    return value is not None


def _loss_runs_code(value: Any) -> bool:
    return value not in BUILTIN_LOSSES


@dataclass(frozen=True)
class Setting:
    """One settings key: its type, its default, its help text, where it can be given.

    name: the key (``--name-with-dashes`` on the command line).
    kind: ``str``, ``int``, ``float``, ``bool``, ``path``, ``choice``, ``layers`` (a
        string, or a list of module names joined by commas), ``kinds`` (event kinds),
        ``globs`` (shell globs, repeatable) or ``size`` (bytes: a whole number, or a
        string with a unit, :func:`parse_size`).
    default: the one default of the key.
    section: the typed sub-config it lands in: ``read``, ``tracking``, ``alerts``, ``watch``.
    flag: the command group that has it as a flag: ``read`` (watch, scan, report),
        ``daemon`` (watch, scan), ``watch``, ``scan``, or None (files only).
    minimum: the least value of an ``int``/``float`` (inclusive; ``above`` makes it strict).
    runs_code: for keys that run code, loosen loading, write files outside the watched
        directory or send the readings elsewhere, a predicate on the value; such values
        are never taken from an unallowed directory file.
    """

    name: str
    kind: str
    default: Any
    section: str
    help: str
    flag: str | None = "read"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    above: bool = False
    envvar: str | None = None
    runs_code: Callable[[Any], bool] | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _event_kinds() -> tuple[str, ...]:
    from ddsmon.events import EVENT_KINDS

    return tuple(EVENT_KINDS)


#: Every settings key, once: type, default, help. The CLI's options are built from it.
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # what to read, and how (the Reader)
        Setting("model", "str", None, "read", metavar="MODULE:FACTORY", runs_code=lambda v: v is not None,
                help="Zero-argument callable returning the nn.Module: 'pkg.mod:make' or 'path/to/file.py:make'."),
        Setting("probe", "str", None, "read", metavar="FILE|MODULE:FUNCTION", runs_code=_probe_runs_code,
                help="Torch file holding {'inputs', 'targets'}, or a function returning (inputs, targets)."),
        Setting("loss", "str", DEFAULT_LOSS, "read", metavar="ce|lm|mse|MODULE:FUNCTION", runs_code=_loss_runs_code,
                help="Per-sample loss: 'ce', 'lm' (next-token, for causal language models), 'mse' "
                     "or a callable (outputs, targets) -> (n,)."),
        Setting("layers", "layers", None, "read", metavar="NAMES|REGEX",
                help="Comma-separated module names, or a regex; default: every leaf module with a floating output of width 2 to --max-width."),
        Setting("device", "str", DEVICE_AUTO, "read",
                help="auto (CUDA when present), cpu, cuda, cuda:K."),
        Setting("fisher", "choice", DEFAULT_FISHER, "read", choices=FISHER_FAMILIES,
                help="Which Fisher-Gram families to read."),
        Setting("forward_dtype", "choice", DEFAULT_FORWARD_DTYPE, "read", choices=FORWARD_DTYPES,
                help="dtype of the probe pass (float32 only for models too large for float64)."),
        Setting("max_probe_rows", "int", None, "read", minimum=1,
                help="Refuse layers with more probe rows (samples x positions) than this."),
        Setting("max_width", "int", DEFAULT_MAX_WIDTH, "read", minimum=2, metavar="D",
                help="The default layer selection leaves out outputs wider than this (a language model's "
                     "vocabulary head), named once in a warning; layers named in --layers are read whatever "
                     f"their width (default {DEFAULT_MAX_WIDTH})."),
        Setting("threads", "int", None, "read", minimum=1, metavar="N",
                help="torch intra-op CPU threads of a reading. Default: per reading, the cores not busy with other work "
                     "(1-minute load average less ddsmon's own share, and the tasks runnable now), at least 1, "
                     "at most torch's default (one per core)."),
        Setting("probe_batch", "int", None, "read", minimum=1, metavar="N",
                help="Samples per micro-batch of the probe pass (default: as many as fit --memory-budget); "
                     "the readings are the same to rounding."),
        Setting("memory_budget", "size", None, "read", metavar="SIZE",
                help="Bytes one micro-batch's autograd graph may hold, e.g. 512MiB, 4GiB (default 1GiB)."),
        Setting("factor_budget", "size", None, "read", metavar="SIZE",
                help="Bytes of per-layer state one probe pass holds (R factors of X and Delta, inputs and "
                     "output gradients for the parameter-side Gram); the layers beyond it are read in "
                     "further probe passes, a group at a time (default 4GiB)."),
        Setting("trust_checkpoints", "bool", False, "read", runs_code=lambda v: v is True,
                help="Allow full unpickling of checkpoints. UNSAFE for files from others: a pickle can run code."),
        # where readings go
        Setting("tracking_uri", "str", DEFAULT_TRACKING_URI, "tracking", flag="daemon",
                envvar="MLFLOW_TRACKING_URI", runs_code=_given,
                help="MLflow tracking URI (env MLFLOW_TRACKING_URI); credentials from MLFLOW_TRACKING_USERNAME/PASSWORD."),
        Setting("experiment", "str", "ddsmon", "tracking", flag="daemon", help="MLflow experiment name."),
        Setting("run_id", "str", None, "tracking", flag="daemon", runs_code=_given,
                help="Log into this existing MLflow run (e.g. the training run); its status is left alone."),
        Setting("run_name", "str", None, "tracking", flag="daemon", help="Name of the run ddsmon creates."),
        Setting("plots", "bool", True, "tracking", flag="daemon", help="Render PNG plots into MLflow (--no-plots: do not)."),
        # alerts
        Setting("events_json", "path", None, "alerts", flag="daemon", runs_code=_given,
                help="Append one JSON object per event to this file."),
        Setting("on_event", "str", None, "alerts", flag="daemon", metavar="COMMAND", runs_code=lambda v: bool(v),
                help="Shell command run per event, with DDSMON_EVENT_* environment variables."),
        Setting("fail_on_event", "kinds", (), "alerts", flag="scan",
                help="Exit with status 1 when an event of this kind was flagged (repeatable)."),
        # the watched directory
        Setting("state_dir", "path", None, "watch", flag="daemon", runs_code=_given,
                help=f"Restart state, claim lock and spool (default DIR/{DEFAULT_STATE_NAME})."),
        Setting("poll", "float", None, "watch", flag="watch", minimum=0.05, metavar="SECONDS",
                help="Use a polling observer (NFS, bind mounts, where inotify is silent)."),
        Setting("quiet", "float", 2.0, "watch", flag="watch", minimum=0.0, metavar="SECONDS",
                help="A file must stay unchanged this long before it is read, when no close-write event is seen."),
        Setting("exclude", "globs", (), "watch", flag="daemon", metavar="GLOB",
                help="Leave out the checkpoints whose path below DIR, or whose name, matches this glob "
                     "(repeatable), e.g. 'ema_*' beside the model's own files."),
        Setting("prefetch", "bool", True, "watch", flag=None,
                help="Load the next checkpoint while the current one is read."),
    )
}  # fmt: skip


def _default(name: str) -> Any:
    return field(default=SETTINGS[name].default)


# ------------------------------------------------------------------------ the typed result


@dataclass(frozen=True)
class ReadSettings:
    """How a checkpoint is read: the engine's settings (what :class:`ddsmon.reader.Reader`
    resolves). ``model``/``probe``/``loss`` are specs (``MODULE:NAME``, a file, ``ce``)."""

    model: str | None = _default("model")
    probe: str | None = _default("probe")
    loss: str = _default("loss")
    layers: str | None = _default("layers")
    device: str = _default("device")
    fisher: str = _default("fisher")
    forward_dtype: str = _default("forward_dtype")
    max_probe_rows: int | None = _default("max_probe_rows")
    max_width: int = _default("max_width")
    threads: int | None = _default("threads")
    probe_batch: int | None = _default("probe_batch")
    memory_budget: int | None = _default("memory_budget")
    factor_budget: int | None = _default("factor_budget")
    trust_checkpoints: bool = _default("trust_checkpoints")


@dataclass(frozen=True)
class TrackingSettings:
    """Where readings go in MLflow."""

    tracking_uri: str = _default("tracking_uri")
    experiment: str = _default("experiment")
    run_id: str | None = _default("run_id")
    run_name: str | None = _default("run_name")
    plots: bool = _default("plots")


@dataclass(frozen=True)
class AlertSettings:
    """Alert outputs; ``fail_on_event``: the kinds that make ``scan`` exit 1."""

    events_json: Path | None = _default("events_json")  # noqa: RUF009 (a field())
    on_event: str | None = _default("on_event")
    fail_on_event: tuple[str, ...] = _default("fail_on_event")


@dataclass(frozen=True)
class WatchSettings:
    """The watched directory (never None) and its state directory (resolved)."""

    directory: Path
    state_dir: Path
    poll: float | None = _default("poll")
    quiet: float = _default("quiet")
    prefetch: bool = _default("prefetch")
    exclude: tuple[str, ...] = _default("exclude")


def _default_events() -> EventConfig:
    from ddsmon.events import EventConfig

    return EventConfig()


@dataclass(frozen=True)
class Config:
    """Everything a watch/scan/report run needs, fully resolved and typed.

    ``watch`` is None for ``report`` (one checkpoint, no directory to watch).
    ``ignored`` lists the keys of an unallowed directory file that were dropped at the
    trust boundary (``"file: key"``), so a later error can say why a setting is missing.
    """

    read: ReadSettings = field(default_factory=ReadSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    watch: WatchSettings | None = None
    events: EventConfig = field(default_factory=_default_events)
    ignored: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        if self.watch is None:
            raise ConfigError("no checkpoint directory: this command reads one checkpoint")
        return self.watch.directory

    @classmethod
    def for_directory(
        cls, directory: Path | str, *, state_dir: Path | str | None = None, **values: Any
    ) -> Config:
        """A Config from keyword values (checked as file values are), for Python callers
        and tests: ``Config.for_directory(ckpts, probe="p.pt", fisher="activation")``."""
        return _build(Path(directory), {**values, "state_dir": state_dir}, ())


# ------------------------------------------------------------------------ checking values


def _check(setting: Setting, value: Any, where: str, base: Path | None) -> Any:
    """``value`` checked against ``setting``'s type; ConfigError naming ``where`` and the key."""
    if value is None and setting.default is None:
        return None
    kind, key = setting.kind, setting.name

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} must be {expected}, got {value!r}")

    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false (unquoted)")
        return value
    if kind == "int":
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (setting.minimum is not None and value < setting.minimum)
        ):
            raise bad(f"a whole number >= {setting.minimum:g}")
        return value
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        if ok and setting.minimum is not None:
            ok = value > setting.minimum if setting.above else value >= setting.minimum
        if not ok:
            least = "" if setting.minimum is None else f" >= {setting.minimum:g}"
            raise bad(f"a finite number of seconds{least}")
        return float(value)
    if kind == "choice":
        assert setting.choices is not None
        if value not in setting.choices:
            raise bad(f"one of {', '.join(setting.choices)}")
        return value
    if kind == "path":
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value:
            raise bad("a path (a string)")
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else (base / path).resolve()
    if kind == "layers":
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, str) and v for v in value)
        ):
            return ",".join(value)
        if not isinstance(value, str) or not value.strip():
            raise bad("module names (a string, comma-separated, or a list) or a regex")
        listed = layer_names(value)
        if listed is None:  # a regex (one name is one too)
            try:
                re.compile(value)
            except re.error as exc:
                raise bad(f"module names or a valid regex ({exc})") from None
        elif not listed:
            raise bad("at least one module name")
        return value
    if kind == "size":
        size = parse_size(value)
        if size is None:
            raise bad("a size in bytes: a whole number, or with a unit (512MiB, 4GiB, 2GB)")
        return size
    if kind == "globs":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(g, str) and g for g in items):
            raise bad("shell globs (a string, or a list of strings)")
        return tuple(items)
    if kind == "kinds":
        kinds = _event_kinds()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(k in kinds for k in items):
            raise bad(f"event kinds among {', '.join(kinds)}")
        return tuple(items)
    raise AssertionError(f"setting {key}: unknown kind {kind}")  # pragma: no cover


#: Units of a size: decimal (kB, MB, ...: powers of 1000) and binary (KiB, MiB, ...:
#: powers of 1024), case-insensitive, with ``B`` or without (``4G`` is ``4GB``).
SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}  # fmt: skip


def parse_size(value: Any) -> int | None:
    """Bytes from ``value``: a whole number >= 1, or a string ``NUMBER[ ]UNIT``
    (``"512MiB"`` = 512 * 2**20, ``"1.5GiB"``, ``"2GB"`` = 2 * 10**9, ``"1073741824"``).
    None when it is not one (the caller names the key); a fraction of a byte rounds down,
    and less than one byte is not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if not isinstance(value, str):
        return None
    text = value.strip().replace("_", "")
    digits = len(text) - len(text.lstrip("0123456789."))
    number, unit = text[:digits], text[digits:].strip().lower()
    if unit not in SIZE_UNITS or not number or number.count(".") > 1 or number == ".":
        return None
    whole, _, frac = number.partition(".")
    # exact: whole and fractional digits as integers, no float rounding
    scale = 10 ** len(frac)
    size = (int(whole or "0") * scale + int(frac or "0")) * SIZE_UNITS[unit] // scale
    return size if size >= 1 else None


# ------------------------------------------------------------------------ files


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ``ddsmon.toml``: every key known and checked against its type, paths made
    absolute relative to the file, ``[events]`` kept as a table (parsed by
    :func:`resolve_config`). Errors name the file and the key."""
    return _parse_config_file(path)[0]


def _parse_config_file(path: Path) -> tuple[dict[str, Any], str]:
    """:func:`load_config_file`'s values and the hash of the very bytes parsed (so an
    allowance is checked against what was read, not against a second read)."""
    try:
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise ConfigError(f"config file {path} {what}")
        with open(path, "rb") as fh:
            data = fh.read(1 << 20)
        digest = hashlib.sha256(data).hexdigest()
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from exc
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "events":
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: [events] must be a table")
            from ddsmon.events import EventConfig

            EventConfig.from_dict(value, source=f"config file {path}")
            out[name] = dict(value)
            continue
        if name not in SETTINGS:
            known = ", ".join(sorted([*SETTINGS, "events"]))
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: {known})")
        out[name] = _check(SETTINGS[name], value, f"config file {path}", path.parent)
    return out, digest


def _allow_list() -> Path:
    home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(home) / "ddsmon" / "allowed.json"


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(1 << 20)).hexdigest()


def _read_allowed() -> dict[str, str]:
    try:
        data = json.loads(_allow_list().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def is_allowed(path: Path, digest: str | None = None) -> bool:
    """True when ``ddsmon allow`` recorded this file with its present content (or with
    the content whose hash is ``digest``, the bytes a caller parsed)."""
    try:
        return _read_allowed().get(str(path.resolve())) == (digest or _digest(path))
    except OSError:
        return False


def allow_file(path: Path) -> Path:
    """Record ``path`` (resolved) and the hash of its content as allowed to set every key,
    code-running ones included; an edit of the file revokes it. Returns the allow list."""
    path = path.resolve()
    load_config_file(path)  # refuse to allow a file that does not parse
    allowed = _read_allowed()
    allowed[str(path)] = _digest(path)
    target = _allow_list()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(allowed, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def _untrusted(
    path: Path, values: dict[str, Any], digest: str
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``values`` of the directory file ``path`` less the code-running ones, unless allowed."""
    risky = [
        k
        for k, v in values.items()
        if k in SETTINGS and SETTINGS[k].runs_code is not None and SETTINGS[k].runs_code(v)  # type: ignore[misc]
    ]
    if not risky or is_allowed(path, digest):
        return values, ()
    log.warning(
        "%s: ignored %s: settings that run code, loosen loading, write elsewhere or send "
        "the readings elsewhere are taken from a "
        "ddsmon.toml beside the checkpoints only once you allow that file "
        "(`ddsmon allow %s`), or give them on the command line or with --config FILE",
        path,
        ", ".join(risky),
        path,
    )
    kept = {k: v for k, v in values.items() if k not in risky}
    return kept, tuple(f"{path}: {k}" for k in risky)


# ------------------------------------------------------------------------ resolving


def _is_config_file(path: Path) -> bool:
    """Whether a settings file lies at ``path``; a folder that cannot be searched (no
    execute permission: every lookup in it fails) is a ConfigError naming it, as
    :func:`ddsmon.checkpoints.discover` says of a checkpoint directory."""
    try:
        return path.is_file()
    except PermissionError:
        raise ConfigError(
            f"{path.parent}: permission denied looking for {path.name} in it (the folder "
            "cannot be searched: no execute permission)"
        ) from None


def resolve_config(
    directory: Path | None,
    flags: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    search_dir: Path | None = None,
) -> Config:
    """Defaults < ``search_dir/ddsmon.toml`` (trust-bounded) < ``config_file`` < ``flags``.

    ``directory``: the watched directory (None for ``report``). ``search_dir``: where a
    ``ddsmon.toml`` is looked for (default ``directory``). ``flags``: the values given on
    the command line (or by its environment variables) only, by key.
    """
    values: dict[str, Any] = {}
    ignored: tuple[str, ...] = ()
    found = (search_dir or directory or Path("/nonexistent")) / CONFIG_FILENAME
    if (search_dir or directory) is not None and _is_config_file(found):
        dir_values, ignored = _untrusted(found, *_parse_config_file(found))
        values.update(dir_values)
    if config_file is not None:
        named = load_config_file(config_file)
        values.update(named)
        ignored = tuple(i for i in ignored if i.rpartition(": ")[2] not in named)
    for key, value in flags.items():
        setting = SETTINGS[key]
        values[key] = _check(setting, value, setting.option, Path.cwd())
        ignored = tuple(i for i in ignored if i.rpartition(": ")[2] != key)
    return _build(directory, values, ignored)


def _build(directory: Path | None, values: Mapping[str, Any], ignored: tuple[str, ...]) -> Config:
    sections: dict[str, dict[str, Any]] = {"read": {}, "tracking": {}, "alerts": {}, "watch": {}}
    events = values.get("events", {})
    for key, value in values.items():
        if key == "events":
            continue
        if key not in SETTINGS:
            raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(SETTINGS))})")
        setting = SETTINGS[key]
        if value is None and setting.default is not None:
            continue
        sections[setting.section][key] = _check(setting, value, key, Path.cwd())
    from ddsmon.events import EventConfig

    watch = None
    if directory is not None:
        state_dir = sections["watch"].pop("state_dir", None) or directory / DEFAULT_STATE_NAME
        watch = WatchSettings(directory=directory, state_dir=state_dir, **sections["watch"])
    return Config(
        read=ReadSettings(**sections["read"]),
        tracking=TrackingSettings(**sections["tracking"]),
        alerts=AlertSettings(**sections["alerts"]),
        watch=watch,
        events=events if isinstance(events, EventConfig) else EventConfig.from_dict(events),
        ignored=ignored,
    )
