"""A checkpoint that could not be read, then saved again and read, loses its failure tag.

A file incomplete or corrupt when ddsmon first met it (a save cut short, a copy not
finished), or one whose reading failed (NaN weights the model refuses), got the run tag
``ddsmon.failure.<file>``; once the trainer saved it again and ddsmon read and recorded
it, the tag stayed, and MLflow's UI said the checkpoint had failed next to its readings.
Now the tag is deleted when the file is read, through the spool like any record (the
deletion waits out a store that does not answer), and the state's ``failed`` entry of
the file is dropped. Real ``ddsmon scan`` / ``watch`` processes, a real SQLite store
read back with MlflowClient."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from fault_helpers import (
    REPO,
    SqliteLock,
    cli_args,
    only_run_steps,
    runs_of,
    wait_for,
    watching,
)
from mlflow.tracking import MlflowClient
from test_cli import write_run

from ddsmon.sinks.mlflow_keys import DIRECTORY_TAG, failure_tag_key
from ddsmon.sinks.mlflow_record import (
    DeleteTagsRecord,
    failure_cleared_record,
    record_from_json,
)
from ddsmon.sinks.mlflow_writer import MlflowWriter
from ddsmon.sinks.tracking import FAILURE_TAGS_KEY
from ddsmon.state import StateDir

STRICT = f"{REPO / 'tests' / 'fixtures_models.py'}:strict_mlp"  # raises on NaN weights


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _scan(ckpts: Path, probe: Path, uri: str, cwd: Path) -> subprocess.CompletedProcess:
    args = cli_args("scan", ckpts, probe, uri, "--fisher", "activation")
    args[args.index("--model") + 1] = STRICT
    return subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240
    )  # cwd: MLflow's ./mlruns artifact root lands in the test's folder


def _failure_tags(uri: str) -> dict[str, str]:
    (run,) = runs_of(uri)
    return {k: v for k, v in run.data.tags.items() if k.startswith("ddsmon.failure.")}


def _truncated(source: Path, target: Path) -> None:
    """``target`` holds the first half of ``source``: a save cut short."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def test_delete_tags_record_round_trips_through_its_spool_line() -> None:
    record = failure_cleared_record(Path("/w/checkpoint 7.pt"))
    assert record == DeleteTagsRecord(keys=(failure_tag_key("checkpoint 7.pt"),))
    line = json.loads(json.dumps(record.to_json()))
    assert line["kind"] == "delete_tags"
    assert record_from_json(line) == record


def test_deleting_a_tag_the_run_does_not_hold_is_no_error(store: str) -> None:
    """A deletion delivered twice (a crash between delivery and acknowledgement), or of a
    tag never set: MLflow raises RESOURCE_DOES_NOT_EXIST, which is not an error here;
    any other refusal still is."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("tags") or client.get_experiment(
        client.create_experiment("tags")
    )
    run_id = client.create_run(exp.experiment_id, tags={"a": "1", "b": "2"}).info.run_id
    writer = MlflowWriter(store, client=client)
    writer.delete_tags(run_id, ["a", "never.set"])
    writer.delete_tags(run_id, ["a"])  # again
    assert {k: v for k, v in client.get_run(run_id).data.tags.items() if len(k) == 1} == {"b": "2"}
    client.delete_run(run_id)
    with pytest.raises(MlflowException):
        writer.delete_tags(run_id, ["b"])  # a deleted run is refused, not skipped


@pytest.mark.slow  # two scans, 20-40 s on 2 cores
def test_a_checkpoint_read_after_it_failed_loses_its_failure_tag(
    tmp_path: Path, probe: Path
) -> None:
    ckpts, healthy = tmp_path / "ckpts", tmp_path / "healthy"
    write_run(ckpts, [0, 10, 30], nan_at=30)  # 30: NaN weights, the strict model raises
    write_run(healthy, [0, 10, 20, 30, 40])
    _truncated(healthy / "step_000020.pt", ckpts / "step_000020.pt")
    _truncated(healthy / "step_000040.pt", ckpts / "step_000040.pt")  # stays corrupt
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = _scan(ckpts, probe, uri, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 read, 0 skipped, 3 failed" in first.stderr, first.stderr[-3000:]
    names = ("step_000020.pt", "step_000030.pt", "step_000040.pt")
    assert sorted(_failure_tags(uri)) == sorted(failure_tag_key(n) for n in names)
    state = StateDir.for_directory(ckpts)
    nan_path = str(ckpts.resolve() / "step_000030.pt")
    assert nan_path in state.get("failed"), state.get("failed")  # its reading failed
    (run,) = runs_of(uri)
    MlflowClient(uri).set_tag(run.info.run_id, "team.note", "kept")  # a user's own tag

    for name in ("step_000020.pt", "step_000030.pt"):  # the trainer saved them again
        os.replace(healthy / name, ckpts / name)
    second = _scan(ckpts, probe, uri, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 read, 2 skipped, 1 failed" in second.stderr, second.stderr[-3000:]

    assert only_run_steps(uri) == [0, 10, 20, 30]
    assert list(_failure_tags(uri)) == [failure_tag_key("step_000040.pt")]
    (run,) = runs_of(uri)
    assert run.data.tags["team.note"] == "kept"
    assert run.data.tags[DIRECTORY_TAG] == str(ckpts.resolve())
    assert "mlflow.note.content" in run.data.tags
    assert nan_path not in state.get("failed"), state.get("failed")
    assert state.get(FAILURE_TAGS_KEY) == [str(ckpts.resolve() / "step_000040.pt")]


@pytest.mark.slow  # a watch through a store locked for a while
def test_the_deletion_waits_in_the_spool_while_the_store_is_locked(
    tmp_path: Path, probe: Path
) -> None:
    """The file is saved again while another process holds ``mlflow.db`` locked: its
    reading and its tag's deletion are spooled, in that order behind nothing, and both
    reach the run once the lock is gone."""
    ckpts, healthy = tmp_path / "ckpts", tmp_path / "healthy"
    write_run(ckpts, [10])
    write_run(healthy, [10, 20])
    _truncated(healthy / "step_000020.pt", ckpts / "step_000020.pt")
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    key = failure_tag_key("step_000020.pt")
    err_path = tmp_path / "watch.err"
    spool = ckpts / ".ddsmon" / "spool.jsonl"

    def spooled() -> list[str]:
        if not spool.exists():
            return []
        return [json.loads(line)["record"]["kind"] for line in spool.read_text().splitlines()]

    with watching(ckpts, probe, uri, stderr_to=err_path, cwd=tmp_path) as proc:
        wait_for(lambda: only_run_steps(uri) == [10] and key in _failure_tags(uri), 120,
                 "step 10 and the failure of step 20")  # fmt: skip
        with SqliteLock(db) as lock:
            os.replace(healthy / "step_000020.pt", ckpts / "step_000020.pt")
            wait_for(lambda: spooled() == ["delete_tags", "reading"], 180, "both spooled")
            lock.release()
        wait_for(lambda: only_run_steps(uri) == [10, 20], 120, "step 20 replayed")
        wait_for(lambda: not spool.exists() or not spooled(), 60, "the spool emptied")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    text = err_path.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "rejected" not in text, text[-3000:]
    assert _failure_tags(uri) == {}


@pytest.mark.slow  # two scans, 20-40 s on 2 cores
def test_a_copy_of_a_step_read_loses_its_failure_tag_too(tmp_path: Path, probe: Path) -> None:
    """``last.pt`` (Lightning's ``save_last``, a script's ``latest``) caught half-written,
    then completed: it holds step 10's weights and step, a step the run holds, so it logs
    no reading; its failure tag went on standing beside step 10's readings."""
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10])
    _truncated(ckpts / "step_000010.pt", ckpts / "last.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _scan(ckpts, probe, uri, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert list(_failure_tags(uri)) == [failure_tag_key("last.pt")]

    (ckpts / "last.pt").write_bytes((ckpts / "step_000010.pt").read_bytes())
    second = _scan(ckpts, probe, uri, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 failed" in second.stderr, second.stderr[-3000:]
    assert only_run_steps(uri) == [0, 10]
    assert _failure_tags(uri) == {}
    assert StateDir.for_directory(ckpts).get(FAILURE_TAGS_KEY) == []
