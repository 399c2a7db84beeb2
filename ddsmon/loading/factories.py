"""``MODULE:NAME`` specs: the model factory, the loss, any callable named on the command line."""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from ddsmon.checkpoints import RefusedFile, stat_regular
from ddsmon.errors import ConfigError
from ddsmon.loading.loaded import _build_module
from ddsmon.loading.wording import _describe

log = logging.getLogger(__name__)


class _Factory:
    """Zero-argument callable that builds the model named by ``spec`` and checks it."""

    def __init__(self, spec: str, target: Any) -> None:
        self.spec = spec
        self._target = target

    def __call__(self) -> nn.Module:
        if isinstance(self._target, nn.Module):
            return copy.deepcopy(self._target)
        return _build_module(self._target, f"factory {self.spec!r}")

    def __repr__(self) -> str:
        return f"<model factory {self.spec!r}>"


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """The model factory named by ``spec``: ``"pkg.module:callable"`` or ``"file.py:callable"``.

    The callable is resolved now (importing the module, or executing the file as a
    module of its own) and called, with no arguments, each time the returned factory
    is; the factory checks that it returns an ``nn.Module``. ``callable`` may be
    dotted (``module:Class.build``); an ``nn.Module`` instance is deep-copied per call.
    Raises ConfigError naming the module or file and the attribute at fault.
    """
    return _Factory(spec, _resolve_callable(spec, "factory"))


def resolve_callable(spec: str, what: str = "callable") -> Callable[..., Any]:
    """The callable named by ``MODULE:NAME`` (dotted module or ``file.py``), returned as is.

    For ``--loss MODULE:FUNCTION`` and the like, where the callable takes arguments.
    ``what`` names it in errors ("loss 'm:f' is not callable ..."). Raises ConfigError.
    """
    return _resolve_callable(spec, what)


def _resolve_callable(spec: str, what: str) -> Any:
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part.strip() or not attr.strip():
        raise ConfigError(
            f"{what} {spec!r} is not MODULE:NAME (a dotted module or path/to/file.py, "
            "a colon, then the name of a callable in it)"
        )
    module, label = _import(module_part, what)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{label} has no attribute {attr!r}") from None
        except Exception as exc:
            raise ConfigError(f"{label}: reading {attr!r} raised {_describe(exc)}") from exc
    if not callable(obj):
        raise ConfigError(f"{what} {spec!r} is not callable (it is {type(obj).__name__})")
    return obj


def _import(module_part: str, what: str) -> tuple[ModuleType, str]:
    """Import a dotted module, or execute a .py file as a module; (module, label)."""
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        return _import_file(Path(module_part).expanduser(), module_part, what), f"{module_part!r}"
    label = f"module {module_part!r}"
    if not all(part.isidentifier() for part in module_part.split(".")):
        raise ConfigError(f"{what} module {module_part!r} is not a dotted module name")
    try:
        return importlib.import_module(module_part), label
    except ModuleNotFoundError as exc:
        top = module_part.split(".")[0]
        cwd = os.getcwd()
        # An installed console script does not put the working directory on sys.path
        # as `python -m` does; add it when the module is there.
        in_cwd = (Path(cwd) / f"{top}.py").is_file() or (Path(cwd) / top).is_dir()
        if exc.name != top or not in_cwd or cwd in sys.path or "" in sys.path:
            raise ConfigError(f"cannot import {label} ({_describe(exc)})") from exc
        sys.path.append(cwd)
        log.info("added the working directory %s to sys.path to import %s", cwd, module_part)
        return _import(module_part, what)
    except Exception as exc:
        raise ConfigError(f"cannot import {label} ({_describe(exc)})") from exc


def _import_file(path: Path, shown: str, what: str) -> ModuleType:
    try:
        stat_regular(path)  # Python's loader would block on a FIFO in its place
    except RefusedFile as exc:
        raise ConfigError(f"{what} file {shown!r}: {exc.reason}") from None
    except OSError:
        raise ConfigError(f"{what} file {shown!r} does not exist") from None
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"_ddsmon_user_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {shown!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Siblings of the file import as they would when it runs as a script; appended,
    # so a user file never shadows the standard library.
    if str(resolved.parent) not in sys.path:
        sys.path.append(str(resolved.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception | SystemExit):
            raise
        raise ConfigError(f"cannot load {shown!r} ({_describe(exc)})") from exc
    return module
