"""The trainer's log (``CheckpointReading.trainer_log``) in MLflow: every entry at its own
step, each (name, step) once, across checkpoints, restarts, the spool and its replay.
A real SQLite store, read back with MlflowClient."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
from fixtures_models import mlp, mlp_probe
from mlflow.tracking import MlflowClient

from ddsmon import compute_signatures
from ddsmon.records import CheckpointReading
from ddsmon.signature import Signatures
from ddsmon.sinks import RunInfo
from ddsmon.sinks.history import HistoryEntry
from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC
from ddsmon.sinks.mlflow_record import trainer_rows
from ddsmon.sinks.tracking import TRAINER_LOG_KEY, MlflowSink
from ddsmon.state import StateDir

LOGGING, EVAL, EPOCH = 3, 10, 40


@pytest.fixture(scope="module")
def sig() -> Signatures:
    inputs, targets = mlp_probe()
    return compute_signatures(mlp(seed=0), inputs, targets)


def log_history(upto: int) -> list[tuple[int, dict[str, float]]]:
    """A Hugging Face ``log_history`` up to step ``upto`` as the loader gives it: training
    logs every LOGGING steps, an evaluation every EVAL steps (one entry per step, merged);
    grad_norm is NaN at step 6."""
    by_step: dict[int, dict[str, float]] = {}
    for s in range(LOGGING, upto + 1, LOGGING):
        by_step[s] = {
            "loss": 10.0 / s,
            "grad_norm": math.nan if s == 6 else 0.1 * s,
            "learning_rate": 1e-3 * (1 - s / 100),
            "epoch": s / EPOCH,
        }
    for s in range(EVAL, upto + 1, EVAL):
        by_step.setdefault(s, {}).update({"eval_loss": 5.0 / s, "epoch": s / EPOCH})
    return sorted(by_step.items())


def hf_reading(step: int, sig: Signatures, where: Path) -> CheckpointReading:
    """checkpoint-<step>: its trainer_state's whole log, and meta = the log's entries at
    its step plus the state's ``epoch`` and ``best_metric`` (as the loader makes it)."""
    history = log_history(step)
    meta = dict(dict(history).get(step, {}))
    meta.update({"epoch": step / EPOCH + 1e-4, "best_metric": 1.0 / step})
    return CheckpointReading(
        step=step,
        path=where / f"checkpoint-{step}",
        signatures=sig,
        fingerprint=(step + 1, step + 2),
        meta=meta,
        load_seconds=0.01,
        read_seconds=0.2,
        trainer_log=history,
    )


def expected(read: list[int]) -> dict[str, list[tuple[int, float]]]:
    """What the run holds once checkpoints ``read`` were logged: every finite entry of the
    last one's log at its step, and the checkpoints' own scalars the log does not hold at
    their step (the state's epoch, best_metric)."""
    out: dict[str, dict[int, float]] = {}
    for s, numbers in log_history(max(read)):
        for name, value in numbers.items():
            if math.isfinite(value):
                out.setdefault(f"train/{name}", {})[s] = value
    for step in read:
        at_step = dict(log_history(step)).get(step, {})
        out.setdefault("train/best_metric", {})[step] = 1.0 / step
        if "epoch" not in at_step:
            out["train/epoch"][step] = step / EPOCH + 1e-4
    return {k: sorted(v.items()) for k, v in out.items()}


def _sink(uri: str, watched: Path, experiment: str) -> MlflowSink:
    return MlflowSink(
        tracking_uri=uri,
        experiment=experiment,
        run_id=None,
        state=StateDir.for_directory(watched),
        plots=False,
        artifacts=False,
        retry_interval=0.0,
    )


def _down_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _log(sink: MlflowSink, watched: Path, steps: list[int], sig: Signatures) -> None:
    sink.start(RunInfo(watched, "watch", {}))
    for step in steps:
        sink.on_reading(hf_reading(step, sig, watched), [])
    sink.close()


def _train_rows(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every ``train/*`` history of the run, each row as stored (duplicates kept)."""
    client = MlflowClient(uri)
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("train/")]
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def _assert_holds(uri: str, run_id: str, read: list[int]) -> None:
    got = _train_rows(uri, run_id)
    want = expected(read)
    assert sorted(got) == sorted(want)
    for key, rows in got.items():
        steps = [s for s, _ in rows]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
        assert steps == [s for s, _ in want[key]], key
        for (_, value), (_, wanted) in zip(rows, want[key], strict=True):
            assert value == pytest.approx(wanted, rel=1e-12), key
    checkpoints = MlflowClient(uri).get_metric_history(run_id, CHECKPOINT_METRIC)
    assert sorted(m.step for m in checkpoints) == sorted(read)


def _spooled_train(state: StateDir) -> dict[int, dict[str, list[int]]]:
    """Spooled reading step -> train key -> the steps of its rows."""
    out: dict[int, dict[str, list[int]]] = {}
    for rec in state.spool_pending():
        if rec["kind"] == "reading":
            rows = out.setdefault(rec["step"], {})
            for key, _value, step, _ts in rec["metrics"]:
                if key.startswith("train/"):
                    rows.setdefault(key, []).append(step)
    return out


# ---------------------------------------------------------------------- the rows of a record
def test_trainer_rows_each_entry_at_its_step_the_log_winning_at_the_checkpoints_step(sig):
    reading = hf_reading(20, sig, Path("/w"))
    rows = trainer_rows(reading, reading.meta)
    keys = [(k, s) for k, _, s in rows]
    assert len(keys) == len(set(keys))
    assert [s for k, _, s in rows] == sorted(s for _, _, s in rows)  # step order
    by = {(k, s): v for k, v, s in rows}
    assert by[("train/loss", 3)] == 10.0 / 3
    assert ("train/grad_norm", 6) not in by  # NaN: not a metric
    assert by[("train/eval_loss", 10)] == 0.5
    assert by[("train/epoch", 20)] == 0.5  # the log's value, not meta's (0.5001)
    assert by[("train/best_metric", 20)] == 0.05  # meta only

    # keys logged up to a step: the log's entries up to it left out
    marks = {"train/loss": 12, "train/epoch": 20, "train/eval_loss": 20}
    rows = trainer_rows(reading, reading.meta, marks)
    steps = {k: [s for kk, _, s in rows if kk == k] for k, _, _ in rows}
    assert steps["train/loss"] == [15, 18]
    assert "train/eval_loss" not in steps and "train/epoch" not in steps
    assert steps["train/grad_norm"] == [3, 9, 12, 15, 18]

    # a checkpoint read after a later one: its log is in the run, its own scalars not
    early = hf_reading(5, sig, Path("/w"))
    rows = trainer_rows(early, early.meta, {"train/loss": 20, "train/epoch": 20})
    assert {(k, s) for k, _, s in rows} == {
        ("train/grad_norm", 3),
        ("train/learning_rate", 3),
        ("train/epoch", 5),
        ("train/best_metric", 5),
    }

    # names sanitised to one key: one row; non-finite meta left out
    odd = CheckpointReading(
        step=4,
        path=Path("/w/c"),
        signatures=sig,
        meta={"a/b": 1.0, "a:b": 2.0, "bad": math.inf},
        trainer_log=[(4, {"a_b": 3.0})],
    )
    assert trainer_rows(odd, HistoryEntry.of(odd).train) == [("train/a_b", 3.0, 4)]


# ---------------------------------------------------------------------- in the run
def test_each_entry_once_at_its_step_across_checkpoints_and_restarts(store, sig, tmp_path):
    watched = tmp_path / "out"
    watched.mkdir()
    first = _sink(store, watched, "trainer-log")
    _log(first, watched, [5, 15, 20], sig)  # checkpoint-10 rotated away unread
    run_id = first.run_id
    assert run_id is not None
    _assert_holds(store, run_id, [5, 15, 20])
    assert StateDir.for_directory(watched).get(TRAINER_LOG_KEY)["steps"]["train/loss"] == 18

    # a restart: the history before 20 is not logged again
    second = _sink(store, watched, "trainer-log")
    _log(second, watched, [25, 30], sig)
    assert second.run_id == run_id
    _assert_holds(store, run_id, [5, 15, 20, 25, 30])

    # kill -9 after a record was sent, before its marks were kept: the run says
    state = StateDir.for_directory(watched)
    state.set(TRAINER_LOG_KEY, {"run_id": run_id, "steps": {"train/loss": 3}})
    third = _sink(store, watched, "trainer-log")
    _log(third, watched, [35], sig)
    state.delete(TRAINER_LOG_KEY)
    fourth = _sink(store, watched, "trainer-log")
    _log(fourth, watched, [40], sig)
    _assert_holds(store, run_id, [5, 15, 20, 25, 30, 35, 40])


def test_spooled_records_hold_only_new_rows_and_replay_once(store, sig, tmp_path):
    watched = tmp_path / "out"
    watched.mkdir()
    down = _sink(_down_uri(), watched, "trainer-log-spool")
    _log(down, watched, [5, 15], sig)
    state = StateDir.for_directory(watched)
    spooled = _spooled_train(state)
    assert spooled[5]["train/loss"] == [3]
    assert spooled[15]["train/loss"] == [6, 9, 12, 15]  # not 3 again
    assert spooled[15]["train/eval_loss"] == [10]
    pending = state.spool_pending()

    # restart while the server is still down: the spool says what is queued
    again = _sink(_down_uri(), watched, "trainer-log-spool")
    _log(again, watched, [20], sig)
    assert _spooled_train(state)[20]["train/loss"] == [18]

    up = _sink(store, watched, "trainer-log-spool")
    up.start(RunInfo(watched, "watch", {}))  # replays the spool
    up.on_reading(hf_reading(15, sig, watched), [])  # already in the run: not again
    up.on_reading(hf_reading(25, sig, watched), [])
    up.close()
    run_id = up.run_id
    assert run_id is not None
    _assert_holds(store, run_id, [5, 15, 20, 25])

    # kill -9 between a replay and its acknowledgement: replayed again, dropped
    state.spool_append(next(r for r in pending if r.get("step") == 15))
    last = _sink(store, watched, "trainer-log-spool")
    _log(last, watched, [30], sig)
    assert state.spool_pending() == []
    _assert_holds(store, run_id, [5, 15, 20, 25, 30])


def test_restart_while_down_keeps_what_the_run_holds_out_of_the_spool(store, sig, tmp_path):
    watched = tmp_path / "out"
    watched.mkdir()
    _log(_sink(store, watched, "trainer-log-down"), watched, [5, 15], sig)
    down = _sink(_down_uri(), watched, "trainer-log-down")
    _log(down, watched, [20], sig)
    state = StateDir.for_directory(watched)
    spooled = _spooled_train(state)
    assert spooled[20]["train/loss"] == [18]  # the state directory's marks
    assert spooled[20]["train/eval_loss"] == [20]
    up = _sink(store, watched, "trainer-log-down")
    _log(up, watched, [25], sig)
    assert up.run_id is not None
    _assert_holds(store, up.run_id, [5, 15, 20, 25])


def test_a_long_log_cut_off_part_way_is_sent_again_whole_once(store, sig, tmp_path, monkeypatch):
    """A first checkpoint after 1500 steps logged every step: more rows than one
    log_batch takes; the store goes down after the first batch, the record is spooled
    whole and replayed before the next checkpoint's, and every row lands once."""
    watched = tmp_path / "out"
    watched.mkdir()
    history = [(s, {"loss": 1.0 / s, "learning_rate": s * 1e-6}) for s in range(1, 1501)]
    reading = CheckpointReading(
        step=1500,
        path=watched / "checkpoint-1500",
        signatures=sig,
        meta={"loss": 1.0 / 1500, "learning_rate": 1500e-6, "epoch": 3.0},
        trainer_log=history,
    )
    sink = _sink(store, watched, "trainer-log-long")
    sink.start(RunInfo(watched, "watch", {}))
    real = sink.client.log_batch
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(len(kwargs.get("metrics", [])))
        if len(calls) == 2:
            raise ConnectionError("connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(sink.client, "log_batch", flaky)
    sink.on_reading(reading, [])
    assert len(calls) == 2 and calls[0] == 1000
    assert [r.get("step") for r in sink.state.spool_pending()] == [1500]
    later = CheckpointReading(
        step=1600,
        path=watched / "checkpoint-1600",
        signatures=sig,
        meta={"epoch": 3.2},
        trainer_log=history + [(s, {"loss": 1.0 / s}) for s in range(1501, 1601)],
    )
    sink.on_reading(later, [])  # the spool replayed first, then only the 100 new rows
    assert sink.state.spool_pending() == []
    sink.close()
    assert max(calls) <= 1000
    run_id = sink.run_id
    assert run_id is not None
    rows = _train_rows(store, run_id)
    assert [s for s, _ in rows["train/loss"]] == list(range(1, 1601))
    assert [s for s, _ in rows["train/learning_rate"]] == list(range(1, 1501))
    assert rows["train/epoch"] == [(1500, 3.0), (1600, 3.2)]
