"""Runs created at once by daemons starting together, in the orders a review found to
leave an empty duplicate run (or a run no one could use) behind: three daemons, a store
that fails once mid-claim, a retired run whose deletion failed. One process, the real
:class:`~ddsmon.sinks.mlflow_run.RunLocator` against a real SQLite store; the order is
forced by wrapping the client's calls (the processes themselves:
tests/test_faults_lease.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from ddsmon.errors import ConfigError
from ddsmon.sinks.mlflow_http import Unreachable
from ddsmon.sinks.mlflow_lease import RunClaimed
from ddsmon.sinks.mlflow_run import RunLocator
from ddsmon.sinks.mlflow_writer import MlflowWriter
from ddsmon.state import StateDir

pytestmark = pytest.mark.timeout(180)


class Daemon:
    """A RunLocator of its own state directory, with its client's calls wrappable."""

    def __init__(self, store: str, root: Path, name: str, experiment: str, watched: Path):
        self.locator = RunLocator(
            MlflowWriter(store), experiment=experiment, run_id=None,
            state=StateDir(root / f"state-{name}"),
        )  # fmt: skip
        self.locator.directory = watched
        self.client = self.locator.writer.client
        self.created: list[str] = []
        self.store = store

    def wrap(self, name: str, wrapper: Callable[..., Any]) -> None:
        real = getattr(self.client, name)
        setattr(self.client, name, lambda *a, **k: wrapper(real, *a, **k))

    def creates_ids_starting(self, first_chars: str) -> None:
        """Its new runs get ids starting with one of ``first_chars`` (to fix the order)."""

        def create(real, *a, **k):
            while True:
                run = real(*a, **k)
                if run.info.run_id[0] in first_chars:
                    self.created.append(run.info.run_id)
                    return run
                MlflowClient(self.store).delete_run(run.info.run_id)

        self.wrap("create_run", create)

    def first_search_misses(self) -> None:
        """Its first search ran before the others' runs existed."""
        missed = {"once": False}

        def search(real, *a, **k):
            if not missed["once"]:
                missed["once"] = True
                return []
            return real(*a, **k)

        self.wrap("search_runs", search)


def _setup(store: str, tmp_path: Path, experiment: str) -> tuple[Path, Callable[[str], Daemon]]:
    watched = tmp_path / "ckpts"
    watched.mkdir()
    watched = watched.resolve()
    return watched, lambda name: Daemon(store, tmp_path, name, experiment, watched)


def _active(store: str, experiment: str) -> list[str]:
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return sorted(r.info.run_id for r in client.search_runs([exp.experiment_id]))


def test_three_daemons_end_with_one_run(store, tmp_path):
    """Ids x < d < w. W wins w, its search seeing no other run; X and D create x and d
    and both see all three. X leases x and d; D, refused on x, cannot retire d (X leased
    it); X is then refused on w. X, a loser holding d, deletes it: it is empty and ddsmon's
    (before, X released it and it outlived the race)."""
    watched, daemon = _setup(store, tmp_path, "three")
    w, x, d = daemon("W"), daemon("X"), daemon("D")
    w.creates_ids_starting("ef")
    w.locator.ensure(watched)
    x.creates_ids_starting("01")
    d.creates_ids_starting("4567")
    d.first_search_misses()
    d_candidates: dict[str, Any] = {}
    real_directory_runs = d.locator._directory_runs
    searched = {"once": False}

    def x_search(real, *a, **k):
        if not searched["once"]:
            searched["once"] = True
            return []
        d_candidates["runs"] = real_directory_runs(watched)  # D creates d and searches
        return real(*a, **k)

    x.wrap("search_runs", x_search)
    d.locator._directory_runs = lambda directory=None: d_candidates["runs"]  # type: ignore[method-assign]
    real_lease = x.locator._lease
    refused: list[str] = []

    def x_lease(run_id: str):
        if run_id == w.locator.run_id and not refused:  # X holds x and d: D starts now
            with pytest.raises(RunClaimed):
                d.locator.ensure(watched)
            refused.append("D")
        return real_lease(run_id)

    x.locator._lease = x_lease  # type: ignore[method-assign]
    with pytest.raises(RunClaimed):
        x.locator.ensure(watched)
    assert refused == ["D"]
    assert x.created[0] < d.created[0] < (w.locator.run_id or "")
    assert _active(store, "three") == [w.locator.run_id]
    w.locator.release()


def _a_won_then_d_creates(
    store: str, tmp_path: Path, experiment: str
) -> tuple[Path, Callable[[str], Daemon], Daemon, Daemon]:
    """A holds its run a; D's first search missed it and D creates d, a < d."""
    watched, daemon = _setup(store, tmp_path, experiment)
    a, d = daemon("A"), daemon("D")
    a.creates_ids_starting("0123")
    a.locator.ensure(watched)
    d.creates_ids_starting("cdef")
    d.first_search_misses()
    return watched, daemon, a, d


def test_a_store_failing_mid_claim_does_not_make_the_loser_forget_its_run(store, tmp_path):
    """D created d (a < d) and its first lease call found the store down; the sink tries
    again, and the search now finds [a, d]: D still knows d is its own (kept in its state
    directory), retires and deletes it when refused on a."""
    watched, _, a, d = _a_won_then_d_creates(store, tmp_path, "unreachable")
    down = {"once": False}

    def get_run(real, *args, **k):
        if not down["once"]:
            down["once"] = True
            raise Unreachable("injected: connection reset")
        return real(*args, **k)

    d.wrap("get_run", get_run)
    with pytest.raises(Unreachable):
        d.locator.ensure(watched)
    assert len(_active(store, "unreachable")) == 2
    with pytest.raises(RunClaimed):
        d.locator.ensure(watched)  # tried again
    assert _active(store, "unreachable") == [a.locator.run_id]
    a.locator.release()


def test_a_retired_run_left_by_a_failed_delete_is_deleted_by_the_next_daemon(store, tmp_path):
    """D retired d but could not delete it; once the directory's other run is gone (the
    user deleted it to start afresh), the next daemon deletes d and creates a new run
    (before, it read d as gone for ever: "keep being deleted", no run)."""
    watched, daemon, a, d = _a_won_then_d_creates(store, tmp_path, "retired")

    def delete_run(real, *args, **k):
        raise Unreachable("injected: 503")

    d.wrap("delete_run", delete_run)
    with pytest.raises(RunClaimed):
        d.locator.ensure(watched)
    assert _active(store, "retired") == sorted([a.locator.run_id or "", d.created[0]])
    a.locator.release()
    MlflowClient(store).delete_run(a.locator.run_id or "")
    e = daemon("E")
    try:
        run_id = e.locator.ensure(watched)
    except ConfigError as exc:  # the failure before the fix
        pytest.fail(str(exc))
    assert _active(store, "retired") == [run_id] and run_id != d.created[0]
    e.locator.release()
