"""Which MLflow run a watched directory's readings go into: found, resumed or created,
and leased so that no second daemon writes it.

:meth:`RunLocator.ensure` resolves the run once (later calls return the same id):

* ``run_id`` given (``--run-id``, e.g. the training run itself): that run, which must
  exist and not be deleted (else :class:`~ddsmon.errors.ConfigError`). ddsmon never
  changes its status (``owned`` is False).
* otherwise one run per watched directory, ddsmon's own (``owned`` is True):

  1. the run id stored in the state directory under ``mlflow_run:<tracking URI,
     redacted>|<experiment>``, unless that run is gone or deleted (warned);
  2. else the active runs of the experiment tagged
     :data:`~ddsmon.sinks.mlflow_keys.DIRECTORY_ID_TAG` = sha1 of the directory's
     absolute path and :data:`~ddsmon.sinks.mlflow_keys.OWNED_TAG` = ``true`` (a lost
     state directory finds its run again);
  3. else a new run, named ``run_name`` or ``ddsmon <directory name>``, in the
     experiment (created if missing; a deleted experiment is a ConfigError), and the
     search of 2. again.

  The run found is stored in the state directory and set RUNNING if it is not.

Exactly once per run: the lease (:mod:`ddsmon.sinks.mlflow_lease`)
    Every candidate run is leased, in run-id order, before anything is written; a
    candidate leased by a live daemon refuses this one
    (:class:`~ddsmon.sinks.mlflow_lease.RunClaimed`, naming its host, pid and state
    directory). Two daemons starting at once on a directory with no run may both create
    one; the later creation's search sees the earlier run, so their candidates always
    share a run and only one of them gets every lease. The winner keeps one run (the
    newest holding checkpoints, else the oldest) and deletes the other, empty ones. A
    loser deletes the empty ddsmon runs it holds (a live holder of a run of the
    directory refused it), and the run it created (kept in the state directory until
    the claim ends, so a retry after an outage still knows it) when refused before
    reaching it: retired first, so a winner reaching it next reads it as deleted rather
    than refused. A retired run that outlived its deletion is deleted by whoever meets
    it. :meth:`RunLocator.verify`
    (before every write) checks the lease is still ours.

The experiment
    Tagged ``mlflow.experimentKind`` = ``custom_model_development`` (created so, or set on
    an experiment ddsmon uses whose kind is unset or only inferred), so that MLflow's UI
    opens it in its model-training view rather than the GenAI one.

On resolving, :attr:`RunLocator.steps` is fetched: the steps whose checkpoint the run
holds (the histories of the checkpoint marker, ``ddsmon/checkpoint``, and of its older
name ``dds/checkpoint``), what the exactly-once checks of the sink and the outbox
compare against; the sink adds each step it delivers. A store that does not answer
raises :class:`~ddsmon.sinks.mlflow_http.Unreachable` and leaves the run unresolved, to
be tried again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ddsmon.errors import ConfigError
from ddsmon.redaction import redact_uri, scrub
from ddsmon.shown import shown
from ddsmon.sinks.mlflow_http import Unreachable, call
from ddsmon.sinks.mlflow_keys import DIRECTORY_ID_TAG, DIRECTORY_TAG, OWNED_TAG, directory_id
from ddsmon.sinks.mlflow_lease import LeaseLost, RunClaimed, RunGone, RunLease
from ddsmon.sinks.mlflow_writer import MlflowWriter
from ddsmon.state import DEFAULT_STATE_NAME, StateDir

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run

__all__ = ("EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "RunLocator")

log = logging.getLogger(__name__)

#: MLflow's experiment tag choosing the UI's view of an experiment, and ddsmon's kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Kinds that are no choice of a user's: unset, or only inferred by the UI.
_UNSET_KINDS = frozenset(
    {
        None,
        "",
        "empty",
        "no_inferred_type",
        "genai_development_inferred",
        "custom_model_development_inferred",
    }
)
_MAX_CANDIDATES = 50


class RunLocator:
    """The run of one watched directory (see the module docstring).

    directory: the watched directory once known (the sink sets it on start); before
        that it is guessed from the state directory.
    run_id / owned: the resolved run, and whether ddsmon created it (None / False
        before :meth:`ensure`).
    lease: the resolved run's :class:`~ddsmon.sinks.mlflow_lease.RunLease` (None before).
    lease_timeout: seconds without a heartbeat after which a lease is taken over (None:
        :func:`~ddsmon.sinks.mlflow_lease.default_lease_timeout`).
    """

    def __init__(
        self,
        writer: MlflowWriter,
        *,
        experiment: str,
        run_id: str | None,
        state: StateDir,
        run_name: str | None = None,
        lease_timeout: float | None = None,
    ) -> None:
        self.writer = writer
        self.lease_timeout = lease_timeout
        self.lease: RunLease | None = None
        self._leases: dict[str, RunLease] = {}
        self._lost: LeaseLost | None = None
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
        if self.state.root.name == DEFAULT_STATE_NAME:
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
        """The run id, resolved and leased on the first call; raises Unreachable,
        ConfigError (:class:`~ddsmon.sinks.mlflow_lease.RunClaimed` when another daemon
        writes the run, :class:`~ddsmon.sinks.mlflow_lease.LeaseLost` once ours was taken)."""
        if self.lost is not None:
            raise self.lost
        if self.run_id is not None:
            if self.lease is None:  # released by close(), used again: lease it again
                lease = self._lease(self.run_id)
                lease.acquire()
                self.lease = lease
            return self.run_id
        from mlflow.entities import RunStatus

        for _ in range(3):  # again when every candidate was deleted under us
            if self.given_run_id:
                candidates, created = [self._given_run()], None
            else:
                candidates, created = self._directory_runs(directory)
            run = self._claim(candidates, created)
            if run is not None:
                break
        else:
            raise ConfigError(f"MLflow runs of {self.guess_directory()} keep being deleted")
        client = self.writer.client
        self.run_id = run.info.run_id
        self.owned = not self.given_run_id
        if self.owned:
            self.state.set(
                self.state_key,
                {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id},
            )
            if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                call(client.update_run, run.info.run_id, status="RUNNING")
        else:
            exp = call(client.get_experiment, run.info.experiment_id)
            self._ensure_kind(exp)
        self.refresh_steps()
        return self.run_id

    # ------------------------------------------------------------------ the lease
    @property
    def lost(self) -> LeaseLost | None:
        """Our lease, once taken over (for good): nothing more is written."""
        if self.lease is not None and self.lease.lost is not None:
            self._lost = self.lease.lost
        return self._lost

    def verify(self) -> None:
        """Before a write: the lease is still ours (one ``get_run``), else
        :class:`~ddsmon.sinks.mlflow_lease.LeaseLost`; Unreachable when the store does not
        answer. Call after :meth:`ensure`."""
        if self.lost is not None:
            raise self.lost
        if self.lease is None and self.run_id is not None:
            self.ensure()  # released, used again: leased again
        if self.lease is not None:
            self.lease.verify()

    def release(self, *, tell_store: bool = True) -> None:
        """Stop the heartbeats; the lease held is released (the next daemon takes it at
        once) unless ``tell_store`` is False (the store is known down: it is taken over
        once stale). The run stays resolved; using it again leases it again."""
        for lease in self._leases.values():
            lease.stop(release=tell_store and lease is self.lease)
        self._leases.clear()
        self.lease = None

    def _lease(self, run_id: str) -> RunLease:
        lease = self._leases.get(run_id)
        if lease is None:
            where = self.directory or self.guess_directory()
            label = f"MLflow run {run_id}" + (f" of {shown(where)}" if where else "")
            lease = RunLease(
                self.writer, self.state, run_id, timeout=self.lease_timeout, label=label
            )
            self._leases[run_id] = lease
        return lease

    def _claim(self, candidates: list[Run], created: str | None) -> Run | None:
        """Lease every candidate, in run-id order (two daemons that found the same run
        meet on its lease; see :meth:`_directory_runs`), keep one and delete the other,
        empty ones. None when every candidate was deleted meanwhile."""
        held: list[Run] = []
        try:
            for run in sorted(candidates, key=lambda r: r.info.run_id):
                try:
                    self._lease(run.info.run_id).acquire()
                except RunGone as gone:
                    self._leases.pop(run.info.run_id, None)
                    if gone.retired:  # its retirer could not delete it: anyone may
                        self._delete(run.info.run_id, "retired by a daemon that lost a race")
                    continue
                held.append(run)
        except RunClaimed:
            self._forget_created()
            if created is not None and created not in {run.info.run_id for run in held}:
                self._drop_unleased(created)
            for run in held:  # refused by a live holder of a run of this directory
                lease = self._leases.pop(run.info.run_id)
                if self._empty_own(run) and self._delete(run.info.run_id, "empty, in a lost race"):
                    lease.stop(release=False)  # ours and empty: a winner reads it as gone
                else:
                    lease.stop(release=True)
            raise
        self._forget_created()
        if not held:
            return None
        keep = self._canonical(held)
        for run in held:
            if run is keep:
                continue
            lease = self._leases.pop(run.info.run_id)
            if self._empty_own(run):
                self.writer.delete_run(run.info.run_id)
                log.info(
                    "deleted MLflow run %s, an empty duplicate of run %s (a race of "
                    "two daemons starting at once)",
                    run.info.run_id,
                    keep.info.run_id,
                )
                lease.stop(release=False)
            else:
                log.warning(
                    "MLflow runs %s and %s both belong to %s; logging into %s",
                    run.info.run_id,
                    keep.info.run_id,
                    shown(self.directory or self.guess_directory()),
                    keep.info.run_id,
                )
                lease.stop(release=True)
        self.lease = self._leases[keep.info.run_id]
        return keep

    def _drop_unleased(self, created: str) -> None:
        """Delete the run this daemon created in a race, when it was refused on a run
        sorted before it: retired first (:meth:`RunLease.retire`), so that a winner
        reaching it next reads it as gone rather than as leased (a lease there would
        refuse the winner, and both would give up). A run someone leased first is left
        to the daemon holding both."""
        lease = self._lease(created)
        del self._leases[created]
        try:
            retired = lease.retire()
        except Exception as exc:
            log.debug("could not retire run %s: %s", created, scrub(str(exc)))
            return
        if retired:
            self._delete(created, "created in a race and lost")

    def _empty_own(self, run: Run) -> bool:
        """Whether ``run`` is ddsmon's own and holds no checkpoint."""
        if run.data.tags.get(OWNED_TAG) != "true":
            return False
        return not self.writer.checkpoint_steps(run.info.run_id)

    def _delete(self, run_id: str, why: str) -> bool:
        """Delete ``run_id`` (logged with ``why``); False, logged, when the store refused."""
        try:
            self.writer.delete_run(run_id)
        except Exception as exc:
            log.debug("could not delete run %s: %s", run_id, scrub(str(exc)))
            return False
        log.info("deleted MLflow run %s, %s", run_id, why)
        return True

    # ------------------------------------------------------------------ created here
    @property
    def _created_key(self) -> str:
        return f"{self.state_key}|created"

    def _remember_created(self, run_id: str) -> None:
        """The run this daemon created, kept until the claim ends: a claim interrupted by
        a store that stopped answering, tried again, still knows which run was its own."""
        self.state.set(self._created_key, run_id)

    def _created(self, candidates: list[Run]) -> str | None:
        stored = self.state.get(self._created_key)
        ids = {r.info.run_id for r in candidates}
        return stored if isinstance(stored, str) and stored in ids else None

    def _forget_created(self) -> None:
        if self.state.get(self._created_key) is not None:
            self.state.delete(self._created_key)

    def _canonical(self, runs: list[Run]) -> Run:
        """Of several runs of one directory: the newest holding checkpoints, else the
        oldest (every daemon decides alike)."""
        if len(runs) == 1:
            return runs[0]
        with_steps = [r for r in runs if self.writer.checkpoint_steps(r.info.run_id)]
        if with_steps:
            return max(with_steps, key=lambda r: (r.info.start_time or 0, r.info.run_id))
        return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    # ------------------------------------------------------------------ candidates
    def _given_run(self) -> Run:
        client = self.writer.client
        assert self.given_run_id is not None
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
        return run

    def _directory_runs(self, directory: Path | None) -> tuple[list[Run], str | None]:
        """The runs that may be the directory's, and the id of one created here (or None).

        The stored run when it is usable; else every active ddsmon run of the experiment
        tagged with the directory; else a new one, followed by that search again. Of two
        daemons creating a run at once, the later creation is followed by a search that
        sees the earlier one, so their candidate lists always share a run."""
        from mlflow.entities import ViewType

        client = self.writer.client
        directory = directory or self.guess_directory()
        stored = self.state.get(self.state_key)
        if isinstance(stored, dict) and stored.get("run_id"):
            try:
                run = call(client.get_run, stored["run_id"])
            except Unreachable:
                raise
            except Exception:
                log.warning("stored MLflow run %s is gone; looking for another", stored["run_id"])
                run = None
            if run is not None and run.info.lifecycle_stage == "deleted":
                log.warning("stored MLflow run %s was deleted; starting a new one", run.info.run_id)
                run = None
            if run is not None:
                return [run], None
        if directory is None:
            raise ConfigError("MLflow sink: the watched directory is not known yet")
        exp_id = self.experiment_id()

        def search() -> list[Run]:
            return list(
                call(
                    client.search_runs,
                    [exp_id],
                    filter_string=(
                        f"tags.`{DIRECTORY_ID_TAG}` = '{directory_id(directory)}' "
                        f"and tags.`{OWNED_TAG}` = 'true'"
                    ),
                    run_view_type=ViewType.ACTIVE_ONLY,
                    max_results=_MAX_CANDIDATES,
                    order_by=["attributes.start_time ASC"],
                )
            )

        found = search()
        if found:
            log.info(
                "resuming MLflow run %s for %s",
                ", ".join(r.info.run_id for r in found),
                directory,
            )
            return found, self._created(found)
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
        self._remember_created(run.info.run_id)
        log.info(
            "created MLflow run %s in experiment %r at %s",
            run.info.run_id,
            self.experiment,
            self.writer.display_uri,
        )
        found = search()
        if run.info.run_id not in {r.info.run_id for r in found}:
            found.append(run)
        return found, run.info.run_id

    # ------------------------------------------------------------------ the experiment
    def experiment_id(self) -> str:
        """The experiment's id, created if missing (tagged :data:`EXPERIMENT_KIND_TAG`);
        ConfigError when it is deleted."""
        client = self.writer.client
        exp = call(client.get_experiment_by_name, self.experiment)
        if exp is None:
            try:
                return str(
                    call(
                        client.create_experiment,
                        self.experiment,
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                    )
                )
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
        self._ensure_kind(exp)
        return str(exp.experiment_id)

    def _ensure_kind(self, exp: Experiment) -> None:
        """Tag the experiment :data:`EXPERIMENT_KIND` unless it says a kind of its own."""
        current = (exp.tags or {}).get(EXPERIMENT_KIND_TAG)
        if current not in _UNSET_KINDS:
            return
        call(
            self.writer.client.set_experiment_tag,
            exp.experiment_id,
            EXPERIMENT_KIND_TAG,
            EXPERIMENT_KIND,
        )
