"""The CLI end to end: real subprocesses, a real checkpoint directory, a real local
MLflow store read back with MlflowClient, and click's CliRunner for the quick paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from ddsmon.cli import main
from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC, metric_key, reading_metric_key

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"


def write_run(
    directory: Path, steps: list[int], *, scale: float = 0.9, nan_at: int | None = None
) -> None:
    """Checkpoints of the fixture MLP, weights shrinking a little per step."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp

    directory.mkdir(parents=True, exist_ok=True)
    model = mlp()
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if step == nan_at:
            state["0.weight"][0, 0] = float("nan")
        tmp = directory / f".step_{step:06d}.pt.tmp"
        torch.save({"model": state, "step": step, "val_acc": step / 1000}, tmp)
        os.replace(tmp, directory / f"step_{step:06d}.pt")


def ddsmon(
    *args: str, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        cwd=REPO,
    )


def run_of(uri: str, experiment: str = "ddsmon"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} missing"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run, got {len(runs)}"
    return client, runs[0]


@pytest.mark.slow  # 15-19 s on 2 cores: in .ci/run's slow suite, out of README command 2
def test_scan_logs_every_step_once_and_reads_back(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20, 30])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    events = tmp_path / "events.jsonl"
    result = ddsmon("scan", str(ckpts), "--model", FACTORY, "--probe", str(probe),
                    "--tracking-uri", uri, "--events-json", str(events))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 read" in result.stderr
    client, run = run_of(uri)
    history = client.get_metric_history(run.info.run_id, reading_metric_key("0", "lambda_min"))
    assert sorted(m.step for m in history) == [0, 10, 20, 30]
    assert run.data.params["probe_size"] == "32"
    assert run.data.params["ddsmon_version"]
    assert "train/val_acc" in run.data.metrics
    # a second scan reads nothing again and logs nothing twice
    again = ddsmon(
        "scan", str(ckpts), "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri
    )
    assert again.returncode == 0, again.stderr
    assert "0 read" in again.stderr
    history = client.get_metric_history(run.info.run_id, reading_metric_key("0", "lambda_min"))
    assert sorted(m.step for m in history) == [0, 10, 20, 30]


def test_nonfinite_layer_is_an_event_and_fail_on_event_exits_1(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20], nan_at=20)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    events = tmp_path / "events.jsonl"
    result = ddsmon("scan", str(ckpts), "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri,
                    "--events-json", str(events), "--fail-on-event", "nonfinite")  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    nonfinite = [e for e in lines if e["kind"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["step"] == 20 and nonfinite[0]["layer"] == "0"
    client, run = run_of(uri)
    assert [
        m.step
        for m in client.get_metric_history(
            run.info.run_id, metric_key("dds", "events", "nonfinite")
        )
    ] == [20]


def test_bad_checkpoints_are_reported_and_the_scan_goes_on(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10])
    good = (ckpts / "step_000010.pt").read_bytes()
    (ckpts / "step_000005.pt").write_bytes(good[: len(good) // 2])  # truncated
    (ckpts / "step_000006.pt").write_bytes(b"")  # zero bytes
    torch.save({"model": {"nope.weight": torch.zeros(2)}}, ckpts / "step_000007.pt")  # wrong keys
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = ddsmon(
        "scan", str(ckpts), "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "2 read" in result.stderr and "3 failed" in result.stderr
    assert "step_000005.pt" in out and "step_000006.pt" in out
    assert "step_000007.pt" in out and "nope.weight" in out
    client, run = run_of(uri)
    assert sorted(
        m.step
        for m in client.get_metric_history(run.info.run_id, reading_metric_key("0", "lambda_min"))
    ) == [0, 10]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--probe", "PROBE"], "no model factory"),
        (["--model", FACTORY], "no probe"),
        (["--model", "no_such_module_xyz:make", "--probe", "PROBE"], "no_such_module_xyz"),
        (["--model", FACTORY, "--probe", "missing.pt"], "missing.pt"),
        (["--model", FACTORY, "--probe", "PROBE", "--loss", "hinge"], "hinge"),
    ],
)
def test_bad_settings_exit_2_before_anything(
    tmp_path: Path, probe: Path, args: list[str], message: str
) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0])
    args = [str(probe) if a == "PROBE" else a for a in args]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["scan", str(ckpts), *args, "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (ckpts / ".ddsmon" / "done.jsonl").exists()


def test_missing_directory_exits_2(tmp_path: Path, probe: Path) -> None:
    result = CliRunner().invoke(
        main, ["scan", str(tmp_path / "nowhere"), "--model", FACTORY, "--probe", str(probe)]
    )
    assert result.exit_code == 2
    assert "nowhere" in result.output


def test_probe_above_max_probe_rows_fails_each_checkpoint_by_name(
    tmp_path: Path, probe: Path
) -> None:
    """The cap refuses a reading before its backward pass; the file and layer are named
    and nothing is recorded for it, so raising the cap and rescanning reads it."""
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["scan", str(ckpts), "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri]
    capped = CliRunner().invoke(main, [*args, "--no-plots", "--max-probe-rows", "16"])
    assert capped.exit_code == 0, capped.output
    for step in (0, 10):
        assert (
            f"FAILED {ckpts / f'step_{step:06d}.pt'}: layer '0' has N=32 rows "
            "(32 samples x 1 position), above max_probe_rows=16" in capped.output
        )
    assert "0 read, 0 skipped, 2 failed" in capped.output
    again = CliRunner().invoke(main, [*args, "--no-plots", "--max-probe-rows", "32"])
    assert again.exit_code == 0 and "2 read, 0 skipped, 0 failed" in again.output, again.output


def test_threads_flag_is_applied_and_recorded_in_the_run(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    threads = torch.get_num_threads() + 1  # not the default, whatever the machine
    result = ddsmon(
        "scan", str(ckpts), "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri,
        "--no-plots", "--threads", str(threads),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, run = run_of(uri)
    assert run.data.params["torch_threads"] == str(threads)


def test_report_json_and_table(tmp_path: Path, probe: Path) -> None:
    write_run(tmp_path / "ckpts", [7])
    ckpt = tmp_path / "ckpts" / "step_000007.pt"
    result = CliRunner().invoke(
        main, ["report", str(ckpt), "--model", FACTORY, "--probe", str(probe), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["step"] == 7 and data["n"] == 32
    assert set(data["layers"]) == {"0", "1", "2"}
    assert data["layers"]["0"]["g_rank"] + data["layers"]["0"]["g_dead"] == 16
    table = CliRunner().invoke(
        main, ["report", str(ckpt), "--model", FACTORY, "--probe", str(probe)]
    )
    assert table.exit_code == 0, table.output
    assert "lambda" in table.output.lower() or "λ" in table.output


def test_report_of_a_corrupt_file_names_it(tmp_path: Path, probe: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    result = CliRunner().invoke(
        main, ["report", str(bad), "--model", FACTORY, "--probe", str(probe)]
    )
    assert result.exit_code == 1
    assert "bad.pt" in result.output


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(uri: str, key: str = CHECKPOINT_METRIC) -> list[int]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ddsmon")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id])
    if not runs:
        return []
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key))


@pytest.mark.parametrize("poll", [None, "0.2"], ids=["inotify", "polling"])
def test_watch_reads_existing_then_new_checkpoints_and_stops_on_sigterm(
    tmp_path: Path, probe: Path, poll: str | None
) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "ddsmon.cli", "watch", str(ckpts), "--model", FACTORY,
            "--probe", str(probe), "--tracking-uri", uri, "--quiet", "0.3", "--no-plots"]  # fmt: skip
    if poll:
        args += ["--poll", poll]
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait(lambda: _steps(uri) == [0, 10], 120, "the existing checkpoints")
        # a new checkpoint written in chunks, in place (torch.save writes in place)
        write_run(tmp_path / "more", [20, 30])
        data = (tmp_path / "more" / "step_000020.pt").read_bytes()
        with open(ckpts / "step_000020.pt", "wb") as fh:
            for i in range(0, len(data), 512):
                fh.write(data[i : i + 512])
                fh.flush()
                time.sleep(0.01)
        os.replace(tmp_path / "more" / "step_000030.pt", ckpts / "step_000030.pt")  # atomic rename
        _wait(lambda: _steps(uri) == [0, 10, 20, 30], 120, "the new checkpoints")
        # a second daemon on the same directory is refused
        second = ddsmon(
            "scan", str(ckpts), "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri
        )
        assert second.returncode == 2
        assert "pid" in second.stderr and str(proc.pid) in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    _client, run = run_of(uri)
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["scan", "--help"], ["watch", "--help"]]
)
def test_help_and_version_do_not_import_torch(args: list[str]) -> None:
    """The package face is lazy: answering --help or --version pays for no torch import."""
    code = (
        "import sys\n"
        "from ddsmon.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "heavy = sorted(m for m in ('torch', 'mlflow', 'numpy') if m in sys.modules)\n"
        "print('heavy:', heavy, file=sys.stderr)\n"
        "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


class LiveWatch:
    """A real ``ddsmon watch DIR ARGS`` subprocess (quiet 0.3 s, no plots) whose stderr
    lines are collected as they come (``lines``); ``stop()`` sends SIGINT, waits, and
    returns the whole stderr."""

    def __init__(self, directory: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "ddsmon.cli", "watch", str(directory),
               "--quiet", "0.3", "--no-plots", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        stream = self.proc.stderr
        self._reader = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._reader.start()

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return "".join(self.lines)


def test_watch_started_before_the_directory_exists_waits_for_it(
    tmp_path: Path, probe: Path
) -> None:
    """Start the watcher, then train: the directory does not exist yet. The watcher says
    what it waits for, then reads every checkpoint written once the trainer created it."""
    ckpts = tmp_path / "not_yet"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store exists before this test polls it
    watcher = LiveWatch(ckpts, "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri)
    lines = watcher.lines
    try:
        _wait(lambda: any("to be created" in line for line in lines), 120, "the waiting line")
        assert watcher.proc.poll() is None
        assert not ckpts.exists(), "nothing is created in the watcher's wait"
        write_run(ckpts, [0, 10])
        _wait(lambda: _steps(uri) == [0, 10], 120, "the checkpoints of the new directory")
        write_run(tmp_path / "more", [20])
        os.replace(tmp_path / "more" / "step_000020.pt", ckpts / "step_000020.pt")
        _wait(lambda: _steps(uri) == [0, 10, 20], 120, "a checkpoint written later")
    finally:
        err = watcher.stop()
    assert watcher.proc.returncode == 0, err
    assert f"waiting for {ckpts} to be created" in err


def test_watch_without_a_model_waits_for_a_hugging_face_folder(tmp_path: Path, probe: Path) -> None:
    """No --model and no checkpoint-N/ folder yet: the watcher says it waits for one
    (scan still exits 2: there is nothing to build the model from)."""
    ckpts = tmp_path / "out"
    ckpts.mkdir()
    args = [sys.executable, "-m", "ddsmon.cli", "watch", str(ckpts), "--probe", str(probe),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-plots"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait(lambda: (ckpts / ".ddsmon" / "lock").exists(), 60, "the watcher to claim")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "waiting for a Hugging Face folder" in err


def test_watch_reports_each_bad_file_written_live_once(tmp_path: Path, probe: Path) -> None:
    """Zero-byte, random-byte and truncated files written under a running watcher are each
    reported once, at the default log level, with their path and reason."""
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    watcher = LiveWatch(ckpts, "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri)
    lines = watcher.lines
    bad = {"step_000010.pt": b"", "step_000020.pt": os.urandom(4096)}
    good = (ckpts / "step_000000.pt").read_bytes()
    bad["step_000030.pt"] = good[: len(good) // 2]
    try:
        _wait(lambda: _steps(uri) == [0], 120, "the first checkpoint")
        for name, data in bad.items():
            (ckpts / name).write_bytes(data)
        _wait(lambda: all(any(n in line for line in lines) for n in bad), 60, "the reports")
        time.sleep(2.0)  # a second report would come within a few quiet periods
    finally:
        err = watcher.stop()
    assert watcher.proc.returncode == 0, err
    for name in bad:
        reports = [line for line in lines if name in line and "cannot read" in line]
        assert len(reports) == 1, (name, err)
        assert "WARNING" in reports[0] and "incomplete" in reports[0]


@pytest.mark.parametrize("given", [None, "PASSIVE"])
def test_the_command_leaves_the_openmp_wait_policy_as_the_user_has_it(
    tmp_path: Path, probe: Path, given: str | None
) -> None:
    """OMP_WAIT_POLICY is the user's (PASSIVE as a default cost idle readings 4.5x:
    ddsmon/threads.py); the run's params say which one a reading ran under, read back
    from a real store, and the thread policy is the automatic one."""
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    result = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--model", FACTORY,
         "--probe", str(probe), "--tracking-uri", uri, "--no-plots"],
        capture_output=True, text=True, timeout=240,
        env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, run = run_of(uri)
    assert run.data.params["omp_wait_policy"] == (given or "unset (OpenMP's default)")
    assert run.data.params["threads_policy"].startswith("auto")


_SLOW_MODELS = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from fixtures_models import mlp

MARK = Path({mark!r})
if os.environ.get("SLOW_IMPORT"):
    MARK.write_text("importing")
    time.sleep(120)


def slow_forward():
    model = mlp()

    class Stalled(type(model)):
        def forward(self, x):
            MARK.write_text("reading")
            time.sleep(float(os.environ.get("SLOW_FORWARD", "0")))
            return super().forward(x)

    model.__class__ = Stalled
    return model
"""


def _default_sigint() -> None:
    """SIGINT's default disposition in the child: a test run started as a background job
    of a non-interactive shell inherits SIGINT ignored, and the interpreter then installs
    no KeyboardInterrupt handler, so a Ctrl-C before the daemon took over its signals
    would not reach the command as a terminal's does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("mode", ["scan", "watch"])
def test_interrupted_while_starting_up_exits_130_and_says_so(
    tmp_path: Path, probe: Path, mode: str
) -> None:
    """Ctrl-C before the daemon took over its signals (here: while the model module is
    imported) ends with 130 and one line, not click's "Aborted!" or a traceback."""
    ckpts, mark = tmp_path / "ckpts", tmp_path / "mark"
    write_run(ckpts, [1, 2])
    models = tmp_path / "slow_models.py"
    models.write_text(_SLOW_MODELS.format(tests=str(REPO / "tests"), mark=str(mark)))
    args = [sys.executable, "-m", "ddsmon.cli", mode, str(ckpts), "--model",
            f"{models}:slow_forward", "--probe", str(probe), "--no-plots",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                            "SLOW_IMPORT": "1"},
                            preexec_fn=_default_sigint)  # fmt: skip
    try:
        _wait(mark.exists, 60, "the model module to be imported")
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Aborted!" not in err and "Traceback" not in err, err


def test_a_second_signal_abandons_the_checkpoint_and_the_next_run_reads_it(
    tmp_path: Path, probe: Path
) -> None:
    """The first SIGINT finishes the checkpoint being read, a second abandons it: exit
    130, one line; the abandoned checkpoint is not recorded as read, so the next scan
    reads it, and logs each step once."""
    ckpts, mark = tmp_path / "ckpts", tmp_path / "mark"
    write_run(ckpts, [1, 2])
    models = tmp_path / "slow_models.py"
    models.write_text(_SLOW_MODELS.format(tests=str(REPO / "tests"), mark=str(mark)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["scan", str(ckpts), "--model", f"{models}:slow_forward", "--probe", str(probe),
            "--no-plots", "--tracking-uri", uri]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "ddsmon.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "SLOW_FORWARD": "120"})  # fmt: skip
    try:
        _wait(lambda: mark.exists() and mark.read_text() == "reading", 120, "the first reading")
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None  # the first signal waits for the checkpoint
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Aborted!" not in err, err
    assert _steps(uri) == []
    again = ddsmon(*args)
    assert again.returncode == 0, again.stderr
    assert "2 read" in again.stderr, again.stderr
    assert _steps(uri) == [1, 2]


def test_a_layers_regex_that_does_not_compile_exits_2_before_anything(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = ddsmon("scan", str(ckpts), "--model", FACTORY, "--probe", str(probe),
                  "--layers", "blocks.(0|1", "--tracking-uri", uri)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--layers" in proc.stderr and "valid regex" in proc.stderr, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_deepspeed_layout_is_read_at_its_steps_and_its_optimizer_files_left_alone(
    tmp_path: Path, probe: Path
) -> None:
    """``global_step<N>/mp_rank_00_model_states.pt`` (the module under ``module``, the
    step as ``global_steps``, as DeepSpeed's save_checkpoint writes them) beside ZeRO
    optimizer partitions and a ``latest`` file: each step read once, nothing failed."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp

    ckpts = tmp_path / "ckpts"
    model = mlp()
    for step in (100, 200):
        folder = ckpts / f"global_step{step}"
        folder.mkdir(parents=True)
        state = {"module": model.state_dict(), "global_steps": step, "global_samples": 8 * step,
                 "dp_world_size": 1, "mp_world_size": 1}  # fmt: skip
        torch.save(state, folder / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"step": step}}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # fmt: skip
    (ckpts / "latest").write_text("global_step200")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = ddsmon("scan", str(ckpts), "--model", FACTORY, "--probe", str(probe),
                  "--tracking-uri", uri, "--no-plots")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scan: 2 read, 0 skipped, 0 failed" in proc.stderr, proc.stderr
    assert _steps(uri) == [100, 200]


def test_report_of_a_trainer_side_file_says_it_holds_no_model(tmp_path: Path, probe: Path) -> None:
    side = tmp_path / "checkpoint_3" / "optimizer.bin"
    side.parent.mkdir()
    torch.save({"state": {}}, side)
    proc = ddsmon("report", str(side), "--model", FACTORY, "--probe", str(probe))
    assert proc.returncode == 2, proc.stderr
    assert "optimizer.bin" in proc.stderr and "holds no model" in proc.stderr, proc.stderr


def test_report_of_a_folder_holding_a_checkpoint_names_the_file_to_give(
    tmp_path: Path, probe: Path
) -> None:
    folder = tmp_path / "global_step100"
    folder.mkdir()
    torch.save({"module": {}, "global_steps": 100}, folder / "mp_rank_00_model_states.pt")
    torch.save({}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = ddsmon("report", str(folder), "--model", FACTORY, "--probe", str(probe))
    assert proc.returncode == 2, proc.stderr
    assert "is a folder, not a checkpoint" in proc.stderr, proc.stderr
    assert "mp_rank_00_model_states.pt" in proc.stderr and "optim_states" not in proc.stderr


@pytest.mark.parametrize(
    ("inputs", "targets", "said"),
    [
        (torch.randn(32, 5), torch.randint(0, 4, (32,)), "RuntimeError: mat1 and mat2 shapes"),
        (
            None,
            torch.full((32,), 99),
            "loss 'ce': the targets hold 99 at (0,), but the logits have 4 classes",
        ),
    ],
    ids=["forward_raises", "loss_raises"],
)
def test_report_of_a_reading_that_raises_says_it_in_one_line(
    tmp_path: Path, probe: Path, inputs, targets, said: str
) -> None:
    """The model's forward or the loss raising is one line naming the checkpoint and the
    error, exit 1, as scan says it; before, report printed Python's whole traceback."""
    write_run(tmp_path / "ckpts", [7])
    good = torch.load(probe)
    bad = tmp_path / "bad_probe.pt"
    torch.save({"inputs": good["inputs"] if inputs is None else inputs, "targets": targets}, bad)
    ckpt = tmp_path / "ckpts" / "step_000007.pt"
    result = ddsmon("report", str(ckpt), "--model", FACTORY, "--probe", str(bad), timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(ckpt) in lines[0] and said in lines[0], result.stderr
    assert result.stdout == ""
    verbose = ddsmon("-vv", "report", str(ckpt), "--model", FACTORY, "--probe", str(bad))
    assert verbose.returncode == 1
    # -vv shows where an unexpected exception came from; ddsmon's own errors (the targets
    # outside the logits' classes, a ProbeError since --loss lm) need no traceback
    assert ("Traceback" in verbose.stderr) == said.startswith("RuntimeError"), verbose.stderr
