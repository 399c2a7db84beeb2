"""A verifiable spool, faults injected for real: ``ddsmon scan`` spools every reading while
a real ``mlflow server`` is down; then a spool line is garbled (one into non-JSON, one into
valid JSON with a changed value), the spool is truncated, or it is deleted; then the scan
runs again with the server up. The read-set says those steps were done and MLflow does
not have them: each lost step is warned about by number, its checkpoint read again, and
every step ends in MLflow exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_helpers import cli_args, finish, logged_steps, spawn, write_checkpoints
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer

from ddsmon.sinks.mlflow_keys import DIRECTORY_TAG

pytestmark = pytest.mark.timeout(600)

STEPS = [0, 10, 20, 30]


def _lines(spool: Path) -> list[bytes]:
    return spool.read_bytes().splitlines(keepends=True)


def _step_of(line: bytes) -> int | None:
    return json.loads(line)["record"].get("step")


def _garble(spool: Path) -> set[int]:
    """Step 10's line into bytes that are no JSON; step 20's into valid JSON whose metric
    value changed (only its checksum tells)."""
    out = []
    for line in _lines(spool):
        step = _step_of(line)
        if step == 10:
            line = line[:40] + b"\x00#garbled#" + line[60:]
        elif step == 20:
            data = json.loads(line)
            data["record"]["metrics"][0][1] += 1.0
            line = (json.dumps(data) + "\n").encode()
        out.append(line)
    spool.write_bytes(b"".join(out))
    return {10, 20}


def _truncate(spool: Path) -> set[int]:
    """Cut in the middle of step 10's line: 10 is torn, 20 and 30 are gone."""
    lines = _lines(spool)
    keep = b"".join(line for line in lines if _step_of(line) in (None, 0))
    torn = next(line for line in lines if _step_of(line) == 10)
    with open(spool, "r+b") as fh:
        fh.truncate(len(keep) + len(torn) // 2)
    return {10, 20, 30}


def _delete(spool: Path) -> set[int]:
    spool.unlink()
    return set(STEPS)


@pytest.mark.slow  # 17-36 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_records_lost_from_the_spool_are_read_again_and_logged_once(
    tmp_path: Path, probe: Path
) -> None:
    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    faults = {"garbled": _garble, "truncated": _truncate, "deleted": _delete}
    dirs = {name: tmp_path / name for name in faults}
    for d in dirs.values():
        write_checkpoints(d, STEPS)

    # 1. the server is down: every reading is spooled (the read-set marks them done)
    procs = {name: spawn(cli_args("scan", d, probe, server.uri)) for name, d in dirs.items()}
    for name, proc in procs.items():
        rc, err = finish(proc)
        assert rc in (0, 3), err[-3000:]  # 3: "undelivered", once the CLI says so
        spool = dirs[name] / ".ddsmon" / "spool.jsonl"
        assert [_step_of(line) for line in _lines(spool)] == [None, *STEPS], err[-3000:]

    # 2. the spool is damaged while the server is down
    lost = {name: fault(dirs[name] / ".ddsmon" / "spool.jsonl") for name, fault in faults.items()}

    # 3. the server answers; the scan runs again
    server.start()
    try:
        procs = {name: spawn(cli_args("scan", d, probe, server.uri)) for name, d in dirs.items()}
        results = {name: finish(proc) for name, proc in procs.items()}
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("ddsmon")
        for name, (rc, err) in results.items():
            assert rc == 0, f"{name}: {err[-3000:]}"
            steps = ", ".join(str(s) for s in sorted(lost[name]))
            assert f"lost the records of steps {steps} " in err, f"{name}: {err[-3000:]}"
            assert "their checkpoints are read again" in err
            (run,) = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{DIRECTORY_TAG}` = '{dirs[name].resolve()}'",
            )
            assert logged_steps(server.uri, run.info.run_id) == STEPS, name  # each once
            assert logged_steps(server.uri, run.info.run_id, "train/val_acc") == STEPS, name
            assert not (dirs[name] / ".ddsmon" / "spool.jsonl").exists(), name
    finally:
        server.stop()
