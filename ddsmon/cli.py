"""Command line: ``ddsmon watch DIR``, ``ddsmon scan DIR``, ``ddsmon report CKPT``.

The CLI only parses: flags and config files become one :class:`ddsmon.config.Config`,
handed to :class:`ddsmon.daemon.Daemon` (watch, scan) or to the engine (report).
Exit status: 0 done; 1 ``scan --fail-on-event`` saw such an event; 2 bad settings
(missing factory, probe or directory, a second daemon on the directory), before
anything is read.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ddsmon import __version__
from ddsmon.config import (
    CONFIG_FILENAME,
    DEFAULT_TRACKING_URI,
    Config,
    load_config_file,
)
from ddsmon.errors import CheckpointError, ConfigError, DDSError

__all__ = ("main",)

log = logging.getLogger("ddsmon")

EVENT_KINDS = ("rank_change", "collapse", "revival", "transition", "nonfinite")


def _engine_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model", "model", metavar="MODULE:FACTORY",
                     help="Zero-argument callable returning the nn.Module: 'pkg.mod:make' or 'path/to/file.py:make'."),
        click.option("--probe", "probe", metavar="FILE|MODULE:FUNCTION",
                     help="Torch file holding {'inputs', 'targets'}, or a function returning (inputs, targets)."),
        click.option("--loss", default="ce", show_default=True, metavar="ce|mse|MODULE:FUNCTION",
                     help="Per-sample loss: 'ce', 'mse' or a callable (outputs, targets) -> (n,)."),
        click.option("--layers", metavar="NAMES|REGEX",
                     help="Comma-separated module names, or a regex; default: every leaf module with a floating output of width >= 2."),
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:K."),
        click.option("--fisher", type=click.Choice(["both", "activation", "parameter"]), default="both",
                     show_default=True, help="Which Fisher-Gram families to read."),
        click.option("--forward-dtype", type=click.Choice(["float64", "float32"]), default="float64",
                     show_default=True, help="dtype of the probe pass (float32 only for models too large for float64)."),
        click.option("--max-probe-rows", type=click.IntRange(min=1), default=None,
                     help="Refuse layers with more probe rows (samples x positions) than this."),
        click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                     help="torch intra-op CPU threads (default: torch's, one per core); fewer when training shares the machine."),
        click.option("--trust-checkpoints", is_flag=True, default=False,
                     help="Allow full unpickling of checkpoints. UNSAFE for files from others: a pickle can run code."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                     help=f"TOML settings file (default: {CONFIG_FILENAME} in the directory); flags win."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _daemon_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=DEFAULT_TRACKING_URI,
                     show_default=True, help="MLflow tracking URI (env MLFLOW_TRACKING_URI); credentials from MLFLOW_TRACKING_USERNAME/PASSWORD."),
        click.option("--experiment", default="ddsmon", show_default=True, help="MLflow experiment name."),
        click.option("--run-id", default=None, help="Log into this existing MLflow run (e.g. the training run); its status is left alone."),
        click.option("--run-name", default=None, help="Name of the run ddsmon creates."),
        click.option("--events-json", type=click.Path(dir_okay=False, path_type=Path),
                     help="Append one JSON object per event to this file."),
        click.option("--on-event", metavar="COMMAND",
                     help="Shell command run per event, with DDSMON_EVENT_* environment variables."),
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Restart state, claim lock and spool (default DIR/.ddsmon)."),
        click.option("--no-plots", "plots", flag_value=False, default=True, help="Do not render PNG plots into MLflow."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _build_config(ctx: click.Context, directory: Path | None, **flags: Any) -> Config:
    """Defaults < DIR/ddsmon.toml < --config FILE < flags given on the command line."""
    config_file = flags.pop("config_file", None)
    values: dict[str, Any] = {}
    if directory is not None and (directory / CONFIG_FILENAME).is_file():
        values.update(load_config_file(directory / CONFIG_FILENAME))
    if config_file is not None:
        values.update(load_config_file(config_file))
    for name, value in flags.items():
        source = ctx.get_parameter_source(name)
        explicit = source in (
            click.core.ParameterSource.COMMANDLINE,
            click.core.ParameterSource.ENVIRONMENT,
        )
        if explicit or name not in values:
            values[name] = value
    if "fail_on_event" in values:
        values["fail_on_event"] = tuple(values["fail_on_event"])
    return Config(directory=directory, **values)


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ddsmon")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ddsmon: per-layer Dead-Direction Signatures of every checkpoint, logged to MLflow."""
    _setup_logging(verbose)


def _run_daemon(ctx: click.Context, mode: str, directory: Path, flags: dict[str, Any]) -> Any:
    from ddsmon.daemon import Daemon

    try:
        config = _build_config(ctx, directory, **flags)
        if config.model is None and not _has_hf_folders(directory):
            raise ConfigError(
                "no model factory: give --model MODULE:FACTORY (or model = ... in ddsmon.toml)"
            )
        sinks, tracking = _make_sinks(config)
        daemon = Daemon(config, sinks, tracking=tracking)
    except ConfigError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from exc
    except DDSError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from exc

    interrupts = {"count": 0}

    def on_signal(signum: int, frame: Any) -> None:
        interrupts["count"] += 1
        if interrupts["count"] > 1:
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the current checkpoint, then stopping", signum)
        daemon.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return daemon.scan() if mode == "scan" else daemon.watch()
    except ConfigError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from exc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _has_hf_folders(directory: Path) -> bool:
    return any(p.is_dir() and p.name.startswith("checkpoint-") for p in directory.iterdir())


def _make_sinks(config: Config) -> tuple[list[Any], Any]:
    from ddsmon.sinks.alerts import CommandHookSink, EventsJsonSink
    from ddsmon.sinks.terminal import TerminalSink
    from ddsmon.sinks.tracking import MlflowSink
    from ddsmon.state import StateDir

    tracking = MlflowSink(
        tracking_uri=config.tracking_uri,
        experiment=config.experiment,
        run_id=config.run_id,
        state=StateDir(config.resolved_state_dir),
        run_name=config.run_name,
        plots=config.plots,
    )
    import rich

    sinks: list[Any] = [tracking, TerminalSink(console=rich.get_console())]
    if config.events_json is not None:
        try:
            config.events_json.parent.mkdir(parents=True, exist_ok=True)
            with open(config.events_json, "a"):
                pass
        except OSError as exc:
            raise ConfigError(f"--events-json {config.events_json}: cannot write ({exc})") from exc
        sinks.append(EventsJsonSink(config.events_json))
    if config.on_event:
        sinks.append(CommandHookSink(config.on_event))
    return sinks, tracking


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_engine_options
@_daemon_options
@click.option(
    "--poll",
    type=click.FloatRange(min=0.05),
    default=None,
    metavar="SECONDS",
    help="Use a polling observer (NFS, bind mounts, where inotify is silent).",
)
@click.option(
    "--quiet",
    type=click.FloatRange(min=0.0),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="A file must stay unchanged this long before it is read, when no close-write event is seen.",
)
@click.pass_context
def watch(ctx: click.Context, directory: Path, **flags: Any) -> None:
    """Read every checkpoint in DIRECTORY, then each new one as it completes, until interrupted."""  # fmt: skip
    _run_daemon(ctx, "watch", directory.resolve(), flags)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_engine_options
@_daemon_options
@click.option(
    "--fail-on-event",
    multiple=True,
    type=click.Choice(EVENT_KINDS),
    help="Exit with status 1 when an event of this kind was flagged (repeatable).",
)
@click.pass_context
def scan(ctx: click.Context, directory: Path, **flags: Any) -> None:
    """Read the checkpoints in DIRECTORY now (backfill, CI), then exit."""
    summary = _run_daemon(ctx, "scan", directory.resolve(), flags)
    kinds = ctx.params.get("fail_on_event") or ()
    hits = summary.flagged(kinds)
    click.echo(
        f"scan: {summary.read} read, {summary.skipped} skipped, {summary.failed} failed, "
        f"{len(summary.events)} events",
        err=True,
    )
    if hits:
        click.echo(
            f"scan: {len(hits)} event(s) of kind {', '.join(sorted(set(kinds)))} flagged", err=True
        )
        ctx.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@_engine_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print the readings as JSON instead of a table."
)
@click.option("--spectra", is_flag=True, help="With --json, include the full spectra.")
@click.pass_context
def report(
    ctx: click.Context, checkpoint: Path, as_json: bool, spectra: bool, **flags: Any
) -> None:
    """Read one CHECKPOINT and print every layer's readings."""
    from ddsmon.checkpoints import classify
    from ddsmon.daemon import limit_threads
    from ddsmon.engine import compute_signatures
    from ddsmon.loading import load_checkpoint, load_probe, resolve_factory
    from ddsmon.probe import probe_batch_size

    checkpoint = checkpoint.resolve()
    try:
        config = _build_config(ctx, checkpoint.parent, **flags)
        limit_threads(config.threads)
        ref = classify(checkpoint)
        if ref is None:
            raise ConfigError(
                f"{checkpoint} is not a checkpoint ddsmon recognises (.pt .pth .bin .ckpt .safetensors, checkpoint-N/)"
            )
        if config.model is None and ref.kind != "hf":
            raise ConfigError("no model factory: give --model MODULE:FACTORY")
        if config.probe is None:
            raise ConfigError("no probe: give --probe FILE or --probe MODULE:FUNCTION")
        factory = resolve_factory(config.model) if config.model else None
        inputs, targets = load_probe(config.probe, trust=config.trust_checkpoints)
        probe_batch_size(inputs, targets)
    except DDSError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from exc
    try:
        loaded = load_checkpoint(ref, factory, trust=config.trust_checkpoints)
        sig = compute_signatures(
            loaded.model, inputs, targets, loss=_loss_arg(config.loss),
            layers=_layers(loaded.model, config.layers), device=config.device,
            fisher=config.fisher, forward_dtype=_dtype(config.forward_dtype),
            max_probe_rows=config.max_probe_rows,
        )  # fmt: skip
    except CheckpointError as exc:
        click.echo(f"error: {exc.path}: {exc.reason}", err=True)
        ctx.exit(1)
    except DDSError as exc:
        click.echo(f"error: {checkpoint}: {exc}", err=True)
        ctx.exit(1)
    if as_json:
        out = {
            "checkpoint": str(checkpoint),
            "step": loaded.step,
            "meta": loaded.meta,
            **sig.to_dict(spectra=spectra),
        }
        click.echo(json.dumps(out, indent=2, default=_json_default))
        return
    from rich.console import Console

    from ddsmon.sinks.terminal import render_signatures_table

    title = f"{checkpoint.name}  step {loaded.step}  n={sig.n}  {sig.device}  {sig.seconds:.2f}s"
    Console().print(render_signatures_table(sig, title=title))


def _layers(model: Any, spec: str | None) -> Any:
    from ddsmon.daemon import _layers_arg

    return _layers_arg(model, spec)


def _dtype(name: str) -> Any:
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name]


def _loss_arg(spec: str) -> Any:
    from ddsmon.daemon import resolve_loss

    return resolve_loss(spec)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":  # pragma: no cover
    main()
