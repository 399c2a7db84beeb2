"""Which daemon may write an MLflow run: a lease kept in the run itself.

The state directory's flock (:meth:`ddsmon.state.StateDir.claim`) stops a second daemon
on the same *state directory*. Two daemons with different state directories (another
``--state-dir``, another machine) reach the same *run* (the directory's tag, one
``--run-id``); the lease makes the run exclusive, using only what every MLflow store
guarantees: **a param's value cannot change**.

Epochs
    Param ``ddsmon.lease.<k>`` (``k`` = 1, 2, ...) = JSON ``{nonce, host, pid, state_dir,
    started, t}``. Logging it is an atomic compare-and-set in the store (the params table's
    key is (run, key)): of two daemons logging epoch ``k`` at once, one value lands and
    the other is refused ("Changing param values is not allowed"); logging the same value
    again is accepted, so a retry after a timeout is safe. The holder of the run is the
    holder of its newest epoch.
Heartbeat
    Tag ``ddsmon.lease.<k>.heartbeat`` = JSON ``{t, n}`` (the holder's clock, a counter),
    refreshed every ``timeout / 6`` seconds by a background thread; ``released`` after a
    clean close. Only the holder of epoch ``k`` writes epoch ``k``'s tag.
Taking the lease (:meth:`RunLease.acquire`), newest epoch ``k``:
    * none, released, or the lease of the previous daemon of *this* state directory (its
      nonce is kept there; the state directory's claim says that daemon is gone): log
      epoch ``k + 1`` now;
    * heartbeat fresh (younger than ``timeout`` by this machine's clock):
      :class:`RunClaimed`, naming the holder's host, pid and state directory;
    * heartbeat older than ``timeout``: watched ``timeout / 3`` seconds; unchanged (the
      holder is dead) it is taken over (epoch ``k + 1``); changed (alive, its clock is
      behind): :class:`RunClaimed`.
    A lost compare-and-set (another daemon logged ``k + 1`` first) is read again, and
    refused. An epoch 1 marked ``retired`` (:meth:`RunLease.retire`: a race's loser
    deleting the run it created) reads as a deleted run.
Holding it
    :meth:`RunLease.verify`, before every write: one ``get_run``; a newer epoch than ours
    raises :class:`LeaseLost`, for good: this holder writes nothing more.
Clocks
    No write relies on a clock: a takeover by a machine whose clock runs ahead only makes
    the old holder find, at its next write, that it lost the lease, and stop. What stays
    open is the time between a holder's check and its write: a holder paused for longer
    than ``timeout`` right there (SIGSTOP, swap) may write one record after its lease was
    taken over; the new holder still skips steps the run holds, so it is at most that
    record twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ddsmon.errors import ConfigError
from ddsmon.redaction import scrub
from ddsmon.shown import shown
from ddsmon.sinks.mlflow_http import Unreachable, call
from ddsmon.state import StateDir

if TYPE_CHECKING:
    from mlflow.entities import Run

    from ddsmon.sinks.mlflow_writer import MlflowWriter

__all__ = (
    "DEFAULT_LEASE_TIMEOUT",
    "LEASE_PREFIX",
    "LEASE_TIMEOUT_ENV",
    "LeaseLost",
    "RunClaimed",
    "RunGone",
    "RunLease",
    "RunLeaseError",
    "default_lease_timeout",
    "lease_holder",
)

log = logging.getLogger(__name__)

#: Prefix of the lease params (``ddsmon.lease.<epoch>``) and heartbeat tags.
LEASE_PREFIX = "ddsmon.lease."
#: Seconds after which a lease whose heartbeat stopped may be taken over.
DEFAULT_LEASE_TIMEOUT = 60.0
#: Environment variable overriding :data:`DEFAULT_LEASE_TIMEOUT`.
LEASE_TIMEOUT_ENV = "DDSMON_LEASE_TIMEOUT"
_RELEASED = "released"
_ROUNDS = 4  # acquisition rounds (a lost compare-and-set, a heartbeat that moved)


def default_lease_timeout() -> float:
    """:data:`LEASE_TIMEOUT_ENV` when set to a positive number, else 60 seconds."""
    raw = os.environ.get(LEASE_TIMEOUT_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_LEASE_TIMEOUT
    return value if value > 0 else DEFAULT_LEASE_TIMEOUT


def _param(epoch: int) -> str:
    return f"{LEASE_PREFIX}{epoch}"


def _heartbeat_tag(epoch: int) -> str:
    return f"{LEASE_PREFIX}{epoch}.heartbeat"


def _newest(params: Mapping[str, str]) -> int:
    """The newest lease epoch among a run's params (0: none)."""
    newest = 0
    for key in params:
        if key.startswith(LEASE_PREFIX):
            tail = key[len(LEASE_PREFIX) :]
            if tail.isdigit():
                newest = max(newest, int(tail))
    return newest


def _json(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def lease_holder(run: Run) -> dict[str, Any]:
    """Who holds ``run``'s newest lease epoch: the param's fields plus ``epoch`` and
    ``heartbeat`` (the tag's fields, or ``{"released": True}``); empty when none."""
    params = run.data.params
    epoch = _newest(params)
    if not epoch:
        return {}
    holder = _json(params.get(_param(epoch)))
    raw = run.data.tags.get(_heartbeat_tag(epoch))
    beat: dict[str, Any] = {"released": True} if raw == _RELEASED else _json(raw)
    return {**holder, "epoch": epoch, "heartbeat": beat}


def _last_seen(holder: Mapping[str, Any]) -> float | None:
    times = [holder.get("t"), holder.get("heartbeat", {}).get("t")]
    seen = [float(t) for t in times if isinstance(t, (int, float))]
    return max(seen) if seen else None


def _mark(holder: Mapping[str, Any]) -> str:
    """What changes when a holder is alive: its epoch, nonce and heartbeat."""
    return json.dumps(
        [holder.get("epoch"), holder.get("nonce"), holder.get("heartbeat")], sort_keys=True
    )


def _who(holder: Mapping[str, Any]) -> str:
    if not holder.get("pid") and not holder.get("host"):
        return "another ddsmon (its lease names no process)"
    return (
        f"ddsmon pid {shown(holder.get('pid', '?'))} on host {shown(holder.get('host', '?'))}, "
        f"state dir {shown(holder.get('state_dir', '?'))} (since {shown(holder.get('started', '?'))})"
    )


class RunLeaseError(ConfigError):
    """The run is another daemon's to write (:class:`RunClaimed`, :class:`LeaseLost`).
    ``holder``: what its lease says (:func:`lease_holder`); ``run_id``: the run."""

    def __init__(self, message: str, *, run_id: str, holder: Mapping[str, Any]) -> None:
        self.run_id = run_id
        self.holder = dict(holder)
        super().__init__(message)


class RunClaimed(RunLeaseError):
    """Another live daemon holds the run's lease: this one must not write it."""


class LeaseLost(RunLeaseError):
    """This daemon's lease was taken over: it must stop writing the run."""


class RunGone(Exception):
    """The run was deleted (by a daemon that lost a race and removed its own empty run),
    or ``retired`` (:meth:`RunLease.retire`): marked for deletion, maybe not deleted."""

    def __init__(self, run_id: str, *, retired: bool = False) -> None:
        self.run_id = run_id
        self.retired = retired
        super().__init__(run_id)


class RunLease:
    """The lease of one run for this daemon (see the module docstring).

    ``label``: how the run is named in messages (its id and directory). ``clock`` is the
    wall clock the heartbeats carry; ``sleep`` what the observation of a stale lease
    waits with.
    """

    def __init__(
        self,
        writer: MlflowWriter,
        state: StateDir,
        run_id: str,
        *,
        timeout: float | None = None,
        label: str | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.writer = writer
        self.state = state
        self.run_id = run_id
        self.timeout = float(timeout if timeout is not None else default_lease_timeout())
        self.interval = self.timeout / 6
        self.label = label or f"MLflow run {run_id}"
        self.nonce = uuid.uuid4().hex
        self.epoch: int | None = None
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._lost: LeaseLost | None = None
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: requests made by :meth:`verify` (for the per-checkpoint cost)
        self.verifications = 0

    @property
    def state_key(self) -> str:
        return f"mlflow_lease:{self.run_id}"

    @property
    def held(self) -> bool:
        return self.epoch is not None and self._lost is None

    @property
    def lost(self) -> LeaseLost | None:
        return self._lost

    def _info(self) -> str:
        return json.dumps(
            {
                "nonce": self.nonce,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "state_dir": str(self.state.root)[-200:],
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "t": round(self._clock(), 3),
            },
            sort_keys=True,
        )

    def _get(self) -> Run:
        """The run; :class:`RunGone` when it is deleted or the store does not hold it
        any more (deleted for good, or the server restarted on an empty or other store)."""
        try:
            run = call(self.writer.client.get_run, self.run_id)
        except Unreachable:
            raise
        except Exception as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                raise RunGone(self.run_id) from exc
            raise
        if run.info.lifecycle_stage == "deleted":
            raise RunGone(self.run_id)
        return run

    # ------------------------------------------------------------------ taking it
    def acquire(self) -> None:
        """Take the lease (or confirm it is ours); :class:`RunClaimed` when a live daemon
        holds it, :class:`Unreachable` when the store does not answer (call again),
        :class:`RunGone` when the run was deleted. Starts the heartbeat."""
        if self._lost is not None:
            raise self._lost
        if self.held:
            return
        previous = self.state.get(self.state_key)
        ours_before = previous.get("nonce") if isinstance(previous, dict) else None
        holder: dict[str, Any] = {}
        for _ in range(_ROUNDS):
            run = self._get()
            holder = lease_holder(run)
            if holder.get("retired"):
                raise RunGone(self.run_id, retired=True)  # its creator lost a race
            epoch = int(holder.get("epoch", 0))
            if epoch and holder.get("nonce") == self.nonce:
                self._won(epoch)  # our compare-and-set landed, its answer did not
                return
            if epoch and not self._free(holder, ours_before):
                if not self._stale(holder):
                    break
                self._sleep(self.timeout / 3)
                if _mark(lease_holder(self._get())) != _mark(holder):
                    continue  # the holder is alive (or another took it): look again
                log.warning(
                    "%s: the lease of %s has had no heartbeat for over %.0fs; taken over",
                    self.label,
                    _who(holder),
                    self.timeout,
                )
            elif epoch and ours_before == holder.get("nonce"):
                log.info(
                    "%s: lease epoch %d was this state directory's previous daemon's; taken over",
                    self.label,
                    epoch,
                )
            # remembered before the compare-and-set: a crash right after it is recognised
            self.state.set(self.state_key, {"nonce": self.nonce, "epoch": epoch + 1})
            try:
                call(self.writer.client.log_param, self.run_id, _param(epoch + 1), self._info())
            except Unreachable:
                raise
            except Exception as exc:  # refused: someone logged epoch + 1 first (read again)
                log.debug("%s: lease epoch %d: %s", self.label, epoch + 1, scrub(str(exc)))
            mine = _json(self._get().data.params.get(_param(epoch + 1)))
            if mine.get("nonce") == self.nonce:
                self._won(epoch + 1)
                return
        raise RunClaimed(self._claimed_message(holder), run_id=self.run_id, holder=holder)

    def retire(self) -> bool:
        """Claim a never-leased run for deletion: epoch 1 logged with ``retired``, by the
        same compare-and-set as a lease, so that every daemon's :meth:`acquire` reads the
        run as gone (:class:`RunGone`) from then on. True when it landed: the run is this
        daemon's to delete. False when someone leased the run first (theirs to keep or
        delete). For a daemon that created a run in a race and was refused on a run
        sorted before it (:meth:`ddsmon.sinks.mlflow_run.RunLocator._claim`)."""
        if _newest(self._get().data.params):
            return False
        info = {**json.loads(self._info()), "retired": True}
        try:
            call(self.writer.client.log_param, self.run_id, _param(1), json.dumps(info))
        except Unreachable:
            raise
        except Exception as exc:  # refused: someone leased it first
            log.debug("%s: retiring: %s", self.label, scrub(str(exc)))
        return _json(self._get().data.params.get(_param(1))).get("nonce") == self.nonce

    def _free(self, holder: Mapping[str, Any], ours_before: str | None) -> bool:
        """Whether the newest epoch may be taken over at once: released, or the lease
        of this state directory's previous daemon."""
        if holder.get("heartbeat", {}).get("released"):
            return True
        return ours_before is not None and holder.get("nonce") == ours_before

    def _stale(self, holder: Mapping[str, Any]) -> bool:
        seen = _last_seen(holder)
        return seen is None or self._clock() - seen > self.timeout

    def _claimed_message(self, holder: Mapping[str, Any]) -> str:
        seen = _last_seen(holder)
        age = "" if seen is None else f"; last heartbeat {max(0.0, self._clock() - seen):.0f}s ago"
        return (
            f"{self.label} is already written by {_who(holder)}{age}. Stop that daemon "
            f"first; a lease whose heartbeat stopped is taken over after {self.timeout:.0f}s"
        )

    def _won(self, epoch: int) -> None:
        self.epoch = epoch
        self.state.set(self.state_key, {"nonce": self.nonce, "epoch": epoch})
        log.info(
            "%s: lease epoch %d taken (every %.0fs a heartbeat)", self.label, epoch, self.interval
        )
        try:
            self._beat()
        except Unreachable as exc:
            log.debug("%s: first heartbeat failed: %s", self.label, exc)
        self._start_heartbeat()

    # ------------------------------------------------------------------ holding it
    def check(self, run: Run) -> None:
        """Raise :class:`LeaseLost` unless ``run`` (just fetched) says we hold the lease."""
        if self._lost is not None:
            raise self._lost
        holder = lease_holder(run)
        if self.epoch is not None and holder.get("epoch") == self.epoch:
            if holder.get("nonce") == self.nonce:
                return
        with self._lock:
            if self._lost is None:
                self._lost = LeaseLost(
                    f"{self.label}: this daemon's lease (epoch {self.epoch}) was taken over by "
                    f"{_who(holder)}; it stops writing the run",
                    run_id=self.run_id,
                    holder=holder,
                )
                log.error("%s", self._lost)
                self._stop.set()
        raise self._lost

    def verify(self) -> None:
        """Before a write: one ``get_run``; :class:`LeaseLost` when the lease is not ours
        any more (for good), :class:`Unreachable` when the store does not answer."""
        if self._lost is not None:
            raise self._lost
        self.verifications += 1
        try:
            run = self._get()
        except RunGone:
            run = None
        if run is None:
            why = self._deleted()
            with self._lock:
                if self._lost is None:
                    self._lost = LeaseLost(why, run_id=self.run_id, holder={})
            raise self._lost
        self.check(run)

    def _deleted(self) -> str:
        """What to say of the run found deleted: with its experiment or alone, and what
        the next start does then."""
        client = self.writer.client
        try:
            run = call(client.get_run, self.run_id)
            exp = call(client.get_experiment, run.info.experiment_id)
        except Unreachable:
            exp = None
        except Exception:  # not in the store at all
            return (
                f"{self.label} is not in the store at {self.writer.display_uri} any more "
                "(deleted for good, or the server restarted on an empty or another store); "
                "this daemon stops writing it (started again, ddsmon logs into a new run "
                "and reads every checkpoint into it)"
            )
        if exp is not None and exp.lifecycle_stage == "deleted":
            return (
                f"{self.label} was deleted with its experiment {exp.name!r}; this daemon stops "
                "writing it (restore the experiment, mlflow experiments restore, or give "
                "another --experiment, and start ddsmon again)"
            )
        return (
            f"{self.label} was deleted; this daemon stops writing it (started again, "
            "ddsmon logs into a new run and reads every checkpoint into it)"
        )

    def _beat(self) -> None:
        self._beats += 1
        value = json.dumps({"t": round(self._clock(), 3), "n": self._beats})
        assert self.epoch is not None
        call(self.writer.client.set_tag, self.run_id, _heartbeat_tag(self.epoch), value)

    def beat(self) -> None:
        """Verify, then refresh the heartbeat (the background thread's step)."""
        self.verify()
        self._beat()

    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeats, name=f"ddsmon-lease-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except LeaseLost:
                return
            except Unreachable as exc:
                log.debug("%s: heartbeat: store unreachable: %s", self.label, exc)
            except Exception as exc:  # never let the thread die noisily
                log.debug("%s: heartbeat failed: %s", self.label, scrub(str(exc)))

    def stop(self, *, release: bool) -> None:
        """Stop the heartbeat; ``release``: mark the lease released (best effort) so the
        next daemon takes it at once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        if release and self.held:
            assert self.epoch is not None
            try:
                call(self.writer.client.set_tag, self.run_id, _heartbeat_tag(self.epoch), _RELEASED)
            except Exception as exc:
                log.info(
                    "%s: lease not released (%s); it is taken over %.0fs after its last heartbeat",
                    self.label,
                    scrub(str(exc)),
                    self.timeout,
                )
                return
            self.state.delete(self.state_key)
        self.epoch = None if release else self.epoch
