"""Command line: ``ddsmon watch DIR``, ``ddsmon scan DIR``, ``ddsmon report CKPT``,
``ddsmon allow FILE``.

The CLI only parses: its options are built from :data:`ddsmon.config.SETTINGS` (one
default, one type and one help text per key), the values given on the command line go
to :func:`ddsmon.config.resolve_config`, and the resulting :class:`~ddsmon.config.Config`
is handed to :class:`ddsmon.daemon.Daemon` (watch, scan) or to a
:class:`ddsmon.reader.Reader` (report). Importing this module does not import torch,
so ``ddsmon --help`` and ``ddsmon --version`` answer at once.

Exit status (the ``EXIT_*`` constants): 0 done; 1 ``scan --fail-on-event`` saw such an
event, or ``report`` could not read the checkpoint; 2 bad settings (missing factory,
probe or directory, a second daemon on the directory) before anything is read, or a
setting that failed on every checkpoint; 3 ``scan`` ended with records still undelivered
in the spool (the tracking server unreachable); 4 the state directory could not be
written (a full disk), stopped cleanly; 130 interrupted before the daemon took over
its signals (while starting up: importing torch, opening the store) or by a second
SIGINT/SIGTERM, which abandons the checkpoint being read. A first signal once the daemon
runs finishes the current checkpoint and stops with the usual status.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings

_interrupt_line = b"ddsmon: interrupted while starting up; nothing was read\n"


def _interrupted_starting(signum: int, frame: object) -> None:
    """SIGINT while the CLI is still importing (click, ddsmon's settings) or ``report``
    reads (which writes nothing): nothing to finish, so one line and exit 130 now, not a
    traceback out of an import."""
    os.write(2, _interrupt_line)
    os._exit(130)


def _take_over_interrupts() -> None:
    """From here on SIGINT is KeyboardInterrupt again, caught by ``_run_daemon`` (and then
    taken over by the daemon's own handler)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _cli_process() -> bool:
    """Whether this process is the ``ddsmon`` command (the console script, or ``python -m
    ddsmon.cli``), not a program importing the module."""
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    return getattr(spec, "name", None) == "ddsmon.cli" or (
        os.path.basename(sys.argv[0] if sys.argv else "") == "ddsmon"
    )


def _fill_closed_standard_streams() -> None:
    """Put ``/dev/null`` on a standard descriptor the parent closed (``2>&-``, a job
    launcher or daemonizer that closes what it does not pass on).

    Python leaves ``sys.stderr`` None then, and the first log line raised (``scan 2>&-``
    exited 1 at once, nothing read, nothing said). Worse, the next file opened takes the
    free descriptor: the store, the state or a checkpoint would become "stderr", and
    whatever writes there (a C library's warning, a child process) would land in it."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        # os.open makes it close-on-exec: a child given the streams (a compiler or worker
        # a model factory or torch.compile starts) would have it closed again
        os.set_inheritable(fd, True)
        if getattr(sys, name) is None:
            mode = "r" if fd == 0 else "w"
            setattr(sys, name, open(fd, mode, closefd=False, errors="backslashreplace"))


# The first things the command does (the imports below take a few hundred milliseconds);
# a SIGINT a parent set to be ignored (a background job, nohup) stays ignored.
if _cli_process():
    _fill_closed_standard_streams()
if _cli_process() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_starting)

import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from ddsmon import __version__  # noqa: E402
from ddsmon.config import CONFIG_FILENAME, SETTINGS, Setting, resolve_config  # noqa: E402
from ddsmon.errors import CheckpointError, ConfigError, DDSError  # noqa: E402
from ddsmon.shown import shown  # noqa: E402
from ddsmon.state import StateError  # noqa: E402

__all__ = (
    "EXIT_EVENT",
    "EXIT_INTERRUPTED",
    "EXIT_SETTINGS",
    "EXIT_STATE",
    "EXIT_UNDELIVERED",
    "main",
)

EXIT_EVENT = 1
EXIT_SETTINGS = 2
EXIT_UNDELIVERED = 3
EXIT_STATE = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

log = logging.getLogger("ddsmon")

_EXPLICIT = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def _option(setting: Setting) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one settings key, typed and defaulted from the table."""
    kw: dict[str, Any] = {"help": setting.help, "metavar": setting.metavar}
    if setting.envvar:
        kw["envvar"] = setting.envvar
    if setting.kind == "bool":
        if setting.default:
            return click.option(f"--no-{setting.name.replace('_', '-')}", setting.name,
                                flag_value=False, default=True, help=setting.help)  # fmt: skip
        return click.option(setting.option, setting.name, is_flag=True, default=False, help=setting.help)  # fmt: skip
    if setting.kind == "globs":
        return click.option(setting.option, setting.name, multiple=True, default=(),
                            metavar=setting.metavar, help=setting.help)  # fmt: skip
    if setting.kind == "kinds":
        from ddsmon.config import _event_kinds

        return click.option(setting.option, setting.name, multiple=True,
                            type=click.Choice(_event_kinds()), help=setting.help)  # fmt: skip
    types: dict[str, Any] = {
        "choice": click.Choice(setting.choices or ()),
        "int": click.IntRange(min=None if setting.minimum is None else int(setting.minimum)),
        "float": click.FloatRange(min=setting.minimum),
        "path": click.Path(path_type=Path, **({"file_okay": False} if setting.name == "state_dir" else {"dir_okay": False})),
    }  # fmt: skip
    if setting.kind in types:
        kw["type"] = types[setting.kind]
    return click.option(setting.option, setting.name, default=setting.default,
                        show_default=setting.default is not None, **kw)  # fmt: skip


def _options(*groups: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every settings key whose flag group is one of ``groups``, plus ``--config``."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        chosen = [s for s in SETTINGS.values() if s.flag in groups]
        f = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                         help=f"TOML settings file (default: {CONFIG_FILENAME} beside the checkpoints); flags win.")(f)  # fmt: skip
        for setting in reversed(chosen):
            f = _option(setting)(f)
        return f

    return decorate


def _given(ctx: click.Context, flags: dict[str, Any]) -> dict[str, Any]:
    """The flags the user gave (on the command line or through an environment variable)."""
    return {k: v for k, v in flags.items() if ctx.get_parameter_source(k) in _EXPLICIT}


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=max(level, logging.DEBUG), format=fmt, handlers=[handler], force=True)
    logging.getLogger("ddsmon").setLevel(max(level, logging.DEBUG))
    for noisy in ("mlflow", "alembic", "urllib3", "watchdog", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow's SQL store logs each OperationalError (a SQLite file another process holds
    # locked) with its traceback and SQL, then raises it: ddsmon says it once, with its
    # first line, as the store being unreachable (the readings spooled and replayed)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # and urllib3 warns of every retry of a request to a server that is down, each time
    # the spool is tried again (ddsmon says it once, with the reason)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    threading.excepthook = _thread_raised
    # MLFLOW_TRACKING_INSECURE_TLS=true: urllib3 warns at every request (its filter says
    # "always"); the user chose it, so it is said once
    warnings.filterwarnings("once", message="Unverified HTTPS request")


def _thread_raised(args: threading.ExceptHookArgs) -> None:
    """A thread that ended with an exception (one a model factory, a loss or a hook's
    library started): one line naming the thread, the exception and where it was raised,
    not Python's traceback between the readings (``-vv`` logs it); nothing else
    changes."""
    if args.exc_type is SystemExit:
        return
    tb = args.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (
        f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        if tb is not None
        else ""
    )
    name = args.thread.name if args.thread is not None else "a thread"
    log.warning(
        "thread %r raised %s: %s%s; ddsmon goes on",
        name,
        args.exc_type.__name__,
        args.exc_value,
        where,
        exc_info=args.exc_value if log.isEnabledFor(logging.DEBUG) else None,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ddsmon")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ddsmon: per-layer Dead-Direction Signatures of every checkpoint, logged to MLflow."""
    _setup_logging(verbose)


def _run_daemon(ctx: click.Context, mode: str, directory: Path, flags: dict[str, Any]) -> Any:
    config_file = flags.pop("config_file", None)
    try:
        from ddsmon.threads import keep_this_thread_single

        # before any parallel region; it imports torch, still under the start-up handler
        # (one line, exit 130): a KeyboardInterrupt raised inside torch's import, in Python
        # code its C++ calls back into, aborts the process through pybind11
        # ("terminate called after throwing an instance of 'pybind11::error_already_set'")
        keep_this_thread_single()
        _take_over_interrupts()
        return _start_and_run(ctx, mode, directory, flags, config_file)
    except KeyboardInterrupt:  # not from the daemon's handler: before it, or a second signal
        click.echo(
            "ddsmon: interrupted; what was recorded before is kept "
            "(a checkpoint being read is read again next time)",
            err=True,
        )
        # Now, without waiting for the threads still at work (a prefetch's torch.load, a
        # layer's decomposition) or running exit hooks that a half-opened store may block
        # in: the daemon's own finally blocks have run, every state file is written
        # atomically, and what is half done is redone by the next run.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(EXIT_INTERRUPTED)


def _start_and_run(
    ctx: click.Context, mode: str, directory: Path, flags: dict[str, Any], config_file: Any
) -> Any:
    try:
        config = resolve_config(directory, _given(ctx, flags), config_file=config_file)
        from ddsmon.daemon import Daemon, run_until_signalled, wait_for_directory

        if mode == "watch":
            try:
                if not wait_for_directory(directory):
                    return None, []
            except KeyboardInterrupt:  # stopped while waiting: nothing was started
                ctx.exit(0)
        daemon = Daemon.from_config(config)
    except DDSError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from exc
    try:
        summary = run_until_signalled(daemon, mode)
        tracking = daemon.tracking
        return summary, (tracking.undelivered_steps() if tracking is not None else [])
    except StateError as exc:  # a state file swapped for a directory, a full disk
        if not daemon.reading_started:  # found at the claim: a setting to fix, like the others
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_SETTINGS)
        click.echo(f"error: {exc}; stopped, nothing recorded was lost", err=True)
        ctx.exit(EXIT_STATE)
    except ConfigError as exc:  # a setting that fails on every checkpoint
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_SETTINGS)


_DIRECTORY = click.Path(exists=True, file_okay=False, path_type=Path)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_options("read", "daemon", "watch")
@click.pass_context
def watch(ctx: click.Context, directory: Path, **flags: Any) -> None:
    """Read every checkpoint in DIRECTORY, then each new one as it completes, until interrupted.

    DIRECTORY may not exist yet: the watcher waits for it (start it, then the trainer)."""
    _run_daemon(ctx, "watch", directory.resolve(), flags)


@main.command()
@click.argument("directory", type=_DIRECTORY)
@_options("read", "daemon", "scan")
@click.pass_context
def scan(ctx: click.Context, directory: Path, **flags: Any) -> None:
    """Read the checkpoints in DIRECTORY now (backfill, CI), then exit."""
    summary, undelivered = _run_daemon(ctx, "scan", directory.resolve(), flags)
    kinds = ctx.params.get("fail_on_event") or ()
    hits = summary.flagged(kinds)
    extra = "".join(
        f", {len(items)} {label}"
        for items, label in (
            (summary.aliases, "aliases of a step read (not logged again)"),
            (summary.unstepped, "without a step (not logged)"),
            (summary.vanished, "deleted before they could be read"),
            (summary.duplicates, "with a step the run already had (not logged)"),
        )
        if items
    )
    if summary.nonfinite:
        steps = summary.nonfinite
        where = f"step {steps[0]}" if len(steps) == 1 else f"steps {min(steps)}-{max(steps)}"
        extra += f", {len(steps)} non-finite in every layer ({where}: the run diverged?)"
    click.echo(
        f"scan: {summary.read} read, {summary.skipped} skipped, {summary.failed} failed, "
        f"{len(summary.events)} events{extra}",
        err=True,
    )
    if undelivered:
        click.echo(
            f"scan: {len(undelivered)} reading(s) not delivered to MLflow (steps "
            f"{', '.join(map(str, undelivered))}); they wait in the spool and are sent by the "
            "next run",
            err=True,
        )
        ctx.exit(EXIT_UNDELIVERED)
    if hits:
        click.echo(
            f"scan: {len(hits)} event(s) of kind {', '.join(sorted(set(kinds)))} flagged", err=True
        )
        ctx.exit(EXIT_EVENT)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@_options("read")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the readings as JSON instead of a table."
)
@click.option("--spectra", is_flag=True, help="With --json, include the full spectra.")
@click.pass_context
def report(
    ctx: click.Context, checkpoint: Path, as_json: bool, spectra: bool, **flags: Any
) -> None:
    """Read one CHECKPOINT and print every layer's readings."""
    global _interrupt_line
    _interrupt_line = b"ddsmon: interrupted\n"  # nothing to finish: exit 130 at once
    checkpoint = checkpoint.resolve()
    config_file = flags.pop("config_file", None)
    try:
        config = resolve_config(
            None, _given(ctx, flags), config_file=config_file, search_dir=checkpoint.parent
        )
        from ddsmon.checkpoints import SIDE_FILES, classify
        from ddsmon.loading import builds_its_model
        from ddsmon.reader import Reader

        ref = classify(checkpoint, named=True)
        if ref is None and SIDE_FILES.match(checkpoint.name):
            raise ConfigError(
                f"{checkpoint} is a file trainers write beside the weights (optimizer, "
                "scheduler, RNG or training state): it holds no model to read"
            )
        if ref is None and checkpoint.is_dir():
            inside = sorted(p.name for p in checkpoint.iterdir() if classify(p) is not None)
            if inside:
                raise ConfigError(
                    f"{checkpoint} is a folder, not a checkpoint; the checkpoint file"
                    f"{'s' if len(inside) > 1 else ''} in it: {', '.join(inside[:5])}"
                    f"{', ...' if len(inside) > 5 else ''}: give one"
                )
        if ref is None:
            folder = classify(checkpoint.parent)
            if folder is not None and folder.kind in ("hf", "dcp"):
                raise ConfigError(
                    f"{checkpoint} is part of the checkpoint folder {folder.path}: give the folder"
                )
            raise ConfigError(
                f"{checkpoint} is not a checkpoint ddsmon recognises (.pt .pth .bin .ckpt "
                ".safetensors files; checkpoint-N/, save_pretrained and "
                "torch.distributed.checkpoint folders)"
            )
        if (
            config.read.model is None
            and not builds_its_model(ref)
            and not config.read.trust_checkpoints
        ):
            why = "".join(f"; {i} was ignored (not allowed)" for i in config.ignored)
            raise ConfigError(
                "no model factory: give --model MODULE:FACTORY (a checkpoint that holds the "
                "pickled model itself, torch.save(model), is read with --trust-checkpoints)" + why
            )
        reader = Reader.from_settings(config.read)
    except DDSError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from exc
    from ddsmon.loading import checkpoint_step

    try:
        loaded = reader.load(ref)
        step = checkpoint_step(ref, loaded)  # the rule scan and watch log it under
        sig = reader.read(loaded.model)
    except CheckpointError as exc:
        click.echo(f"error: {exc.path}: {exc.reason}", err=True)
        ctx.exit(1)
    except DDSError as exc:
        click.echo(f"error: {checkpoint}: {exc}", err=True)
        ctx.exit(1)
    except SystemExit as exc:  # user code called sys.exit: a failure, not report's exit
        click.echo(f"error: {checkpoint}: user code called sys.exit({exc.code!r})", err=True)
        ctx.exit(1)
    except Exception as exc:  # the user's factory, model, probe or loss raised
        log.debug("the reading of %s raised", checkpoint, exc_info=True)
        click.echo(
            f"error: {checkpoint}: {type(exc).__name__}: {exc} (raised by the model factory, "
            "the model's forward, the probe or the loss; -vv shows where)",
            err=True,
        )
        ctx.exit(1)
    if as_json:
        out = {
            "checkpoint": str(checkpoint),
            "step": step,
            "meta": loaded.meta,
            **sig.to_dict(spectra=spectra),
        }
        click.echo(json.dumps(out, indent=2, default=_json_default))
        return
    from ddsmon.sinks.terminal import SignaturesView

    stepped = f"step {step}" if step is not None else "no step (none in its content or name)"
    title = f"{shown(checkpoint.name)}  {stepped}  n={sig.n}  {sig.device}  {sig.seconds:.2f}s"
    view = SignaturesView(sig, title=title)
    _report_console(view.natural_width).print(view)


def _report_console(natural_width: int) -> Any:
    """The console ``report`` prints on: the terminal's width on a terminal, or the
    width ``COLUMNS`` gives; piped or redirected without ``COLUMNS``, the table's own
    width (rich would guess one from whatever terminal stdin or stderr is on, and a log
    file has no width to fit)."""

    from rich.console import Console

    if sys.stdout.isatty() or (os.environ.get("COLUMNS") or "").isdigit():
        return Console()
    return Console(width=natural_width)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def allow(file: Path) -> None:
    """Allow FILE, a ddsmon.toml beside checkpoints, to set keys that run code.

    Without this, a ddsmon.toml found in a watched directory may not set trust_checkpoints,
    on_event, or a model/probe/loss given as MODULE:NAME (whoever can write checkpoints
    there could otherwise run code as you). The allowance is for this file's present
    content: editing the file revokes it.
    """
    from ddsmon.config import allow_file

    try:
        where = allow_file(file)
    except DDSError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"allowed {file.resolve()} (recorded in {where})")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":  # pragma: no cover
    main()
