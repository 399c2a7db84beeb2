"""Which MLflow run a watched directory's readings go into: found, resumed or created.

:meth:`RunLocator.ensure` resolves the run once (later calls return the same id):

* ``run_id`` given (``--run-id``, e.g. the training run itself): that run, which must
  exist and not be deleted (else :class:`~ddsmon.errors.ConfigError`). ddsmon never
  changes its status (``owned`` is False).
* otherwise one run per watched directory, ddsmon's own (``owned`` is True):

  1. the run id stored in the state directory under ``mlflow_run:<tracking URI,
     redacted>|<experiment>``, unless that run is gone or deleted (warned);
  2. else the newest active run of the experiment tagged
     :data:`~ddsmon.sinks.mlflow_keys.DIRECTORY_ID_TAG` = sha1 of the directory's
     absolute path and :data:`~ddsmon.sinks.mlflow_keys.OWNED_TAG` = ``true`` (a lost
     state directory finds its run again);
  3. else a new run, named ``run_name`` or ``ddsmon <directory name>``, in the
     experiment (created if missing; a deleted experiment is a ConfigError).

  The run found is stored in the state directory and set RUNNING if it is not.

On resolving, :attr:`RunLocator.steps` is fetched: the steps whose checkpoint the run
holds (``dds/checkpoint``), what the exactly-once checks of the sink and the outbox
compare against; the sink adds each step it delivers. A store that does not answer
raises :class:`~ddsmon.sinks.mlflow_http.Unreachable` and leaves the run unresolved, to
be tried again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ddsmon.errors import ConfigError
from ddsmon.redaction import redact_uri, scrub
from ddsmon.sinks.mlflow_http import Unreachable, call
from ddsmon.sinks.mlflow_keys import DIRECTORY_ID_TAG, DIRECTORY_TAG, OWNED_TAG, directory_id
from ddsmon.sinks.mlflow_writer import MlflowWriter
from ddsmon.state import StateDir

__all__ = ("RunLocator",)

log = logging.getLogger(__name__)


class RunLocator:
    """The run of one watched directory (see the module docstring).

    directory: the watched directory once known (the sink sets it on start); before
        that it is guessed from the state directory.
    run_id / owned: the resolved run, and whether ddsmon created it (None / False
        before :meth:`ensure`).
    """

    def __init__(
        self,
        writer: MlflowWriter,
        *,
        experiment: str,
        run_id: str | None,
        state: StateDir,
        run_name: str | None = None,
    ) -> None:
        self.writer = writer
        self.experiment = experiment
        self.given_run_id = run_id
        self.state = state
        self.run_name = run_name
        self.directory: Path | None = None
        self.run_id: str | None = None
        self.owned = False
        self.steps: set[int] | None = None

    # ------------------------------------------------------------------ steps held
    def holds(self, step: int) -> bool:
        """Whether the run is known to hold ``step`` (False while unresolved)."""
        return self.steps is not None and step in self.steps

    def add_step(self, step: int) -> None:
        """``step`` was delivered into the run."""
        if self.steps is not None:
            self.steps.add(step)

    def fetch_steps(self) -> set[int]:
        """The steps the resolved run holds, asked of the store now."""
        assert self.run_id is not None
        return self.writer.checkpoint_steps(self.run_id)

    def refresh_steps(self) -> set[int]:
        """:meth:`fetch_steps`, kept as :attr:`steps`."""
        self.steps = self.fetch_steps()
        return self.steps

    # ------------------------------------------------------------------ the run
    def guess_directory(self) -> Path | None:
        """The watched directory: as set, else as stored in the state directory, else the
        parent of a default ``.ddsmon`` state directory."""
        if self.directory is not None:
            return self.directory
        stored = self.state.get("directory")
        if stored:
            return Path(stored)
        if self.state.root.name == ".ddsmon":
            return self.state.root.parent.resolve()
        return None

    @property
    def state_key(self) -> str:
        """Where the run id is stored in the state directory."""
        uri = self.writer.tracking_uri
        if uri is None:
            import mlflow

            uri = mlflow.get_tracking_uri()
        return f"mlflow_run:{redact_uri(str(uri))}|{self.experiment}"

    def ensure(self, directory: Path | None = None) -> str:
        """The run id, resolved on the first call; raises Unreachable, ConfigError."""
        if self.run_id is not None:
            return self.run_id
        from mlflow.entities import RunStatus, ViewType

        client = self.writer.client
        if self.given_run_id:
            try:
                run = call(client.get_run, self.given_run_id)
            except Unreachable:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"--run-id {self.given_run_id}: no such run at {self.writer.display_uri} "
                    f"({scrub(str(exc))})"
                ) from exc
            if run.info.lifecycle_stage == "deleted":
                raise ConfigError(f"--run-id {self.given_run_id} is a deleted run")
            self.run_id, self.owned = run.info.run_id, False
        else:
            directory = directory or self.guess_directory()
            run = None
            stored = self.state.get(self.state_key)
            if isinstance(stored, dict) and stored.get("run_id"):
                try:
                    run = call(client.get_run, stored["run_id"])
                except Unreachable:
                    raise
                except Exception:
                    log.warning(
                        "stored MLflow run %s is gone; looking for another", stored["run_id"]
                    )
                    run = None
                if run is not None and run.info.lifecycle_stage == "deleted":
                    log.warning(
                        "stored MLflow run %s was deleted; starting a new one", run.info.run_id
                    )
                    run = None
            if run is None:
                if directory is None:
                    raise ConfigError("MLflow sink: the watched directory is not known yet")
                exp_id = self.experiment_id()
                found = call(
                    client.search_runs,
                    [exp_id],
                    filter_string=(
                        f"tags.`{DIRECTORY_ID_TAG}` = '{directory_id(directory)}' "
                        f"and tags.`{OWNED_TAG}` = 'true'"
                    ),
                    run_view_type=ViewType.ACTIVE_ONLY,
                    max_results=1,
                    order_by=["attributes.start_time DESC"],
                )
                if found:
                    run = found[0]
                    log.info("resuming MLflow run %s for %s", run.info.run_id, directory)
                else:
                    run = call(
                        client.create_run,
                        exp_id,
                        run_name=self.run_name or f"ddsmon {directory.name}",
                        tags={
                            OWNED_TAG: "true",
                            DIRECTORY_TAG: str(directory),
                            DIRECTORY_ID_TAG: directory_id(directory),
                            "mlflow.source.name": "ddsmon",
                            "mlflow.source.type": "JOB",
                        },
                    )
                    log.info(
                        "created MLflow run %s in experiment %r at %s",
                        run.info.run_id,
                        self.experiment,
                        self.writer.display_uri,
                    )
            self.run_id, self.owned = run.info.run_id, True
            self.state.set(
                self.state_key,
                {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id},
            )
            if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                call(client.update_run, run.info.run_id, status="RUNNING")
        self.refresh_steps()
        return self.run_id

    def experiment_id(self) -> str:
        """The experiment's id, created if missing; ConfigError when it is deleted."""
        client = self.writer.client
        exp = call(client.get_experiment_by_name, self.experiment)
        if exp is None:
            try:
                return call(client.create_experiment, self.experiment)
            except Unreachable:
                raise
            except Exception:  # created meanwhile by another watcher
                exp = call(client.get_experiment_by_name, self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {self.experiment!r} is deleted at {self.writer.display_uri}; "
                "restore it (mlflow experiments restore) or choose another --experiment"
            )
        return str(exp.experiment_id)
