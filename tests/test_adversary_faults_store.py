"""A tracking URI that answers but is wrong, against the real command in a subprocess:
an ``https://`` server whose certificate fails verification, a plain server given as
``https://``, a proxy or sign-in page answering with HTML instead of MLflow's JSON, a
401 page. These are settings to fix, said once at start-up naming the URI and the
cause (exit 2, nothing read); before, they were taken for a server that is down and
the readings spooled for ever. A 502 stays an outage (spooled, exit 3). Once running,
such an answer spools the readings, with its cause, and they are delivered when the
real server answers again."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fault_helpers import REPO, cli_args, only_run_steps, wait_for, watching, write_checkpoints

_SIGN_IN = b"<html><head><title>Sign in - Example SSO</title></head><body>...</body></html>"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@contextmanager
def _answering(
    status: int, body: bytes, *, port: int = 0, tls: tuple[Path, Path] | None = None
) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 (TLS with ``tls`` = (cert, key)) answering every
    request with ``status`` and ``body`` as text/html; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _self_signed(tmp_path: Path, *, san: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key; ``san``: with the address in
    its subjectAltName (else in its CN only, which verification does not accept)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    extra = ["-addext", "subjectAltName=IP:127.0.0.1"] if san else []
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", *extra],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def _scan(
    tmp_path: Path, ckpts: Path, probe: Path, uri: str, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args("scan", ckpts, probe, uri), cwd=tmp_path,
                          env={**_env(), **env}, capture_output=True, text=True,
                          timeout=240)  # fmt: skip


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "unreachable" not in proc.stderr and "spooled" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_an_untrusted_certificate_is_a_settings_error_naming_the_uri(
    tmp_path: Path, probe: Path
) -> None:
    """``--tracking-uri https://...`` whose certificate is self-signed: every call failed
    verification, was classed "unreachable", and the readings waited in the spool for
    ever. Now one line names the URI, the certificate's fault and MLflow's two settings
    for it; nothing is read (nor marked read), so the run with the setting fixed reads
    every checkpoint."""
    tls = _self_signed(tmp_path)
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    with _answering(200, b"{}", tls=tls) as port:
        line = _one_error_line(_scan(tmp_path, ckpts, probe, f"https://127.0.0.1:{port}"))
    assert f"https://127.0.0.1:{port}" in line
    assert "TLS certificate failed verification (self-signed certificate)" in line
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in line and "MLFLOW_TRACKING_INSECURE_TLS" in line
    done = ckpts / ".ddsmon" / "done.jsonl"
    assert not done.exists() or not done.read_text().strip()  # nothing marked read


def test_a_certificate_issued_for_another_name_is_named(tmp_path: Path, probe: Path) -> None:
    """Its CA given (MLFLOW_TRACKING_SERVER_CERT_PATH), a certificate naming the host
    only in its CN fails as issued for another name: the advice is the name, not a CA."""
    cert, key = _self_signed(tmp_path)
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    with _answering(200, b"{}", tls=(cert, key)) as port:
        proc = _scan(tmp_path, ckpts, probe, f"https://127.0.0.1:{port}",
                     MLFLOW_TRACKING_SERVER_CERT_PATH=str(cert))  # fmt: skip
    line = _one_error_line(proc)
    assert "its TLS certificate was issued for another name" in line, line
    assert "subjectAltName" in line and "MLFLOW_TRACKING_SERVER_CERT_PATH" not in line


@pytest.mark.slow
def test_the_settings_the_certificate_error_names_do_reach_a_real_tls_server(
    tmp_path: Path, probe: Path
) -> None:
    """A real ``mlflow server`` serving TLS with a self-signed certificate: refused by
    default, read with MLFLOW_TRACKING_SERVER_CERT_PATH, and with
    MLFLOW_TRACKING_INSECURE_TLS=true, where urllib3's warning (once per request
    before) is said once."""
    import socket
    import sys
    import time
    import urllib.request

    cert, key = _self_signed(tmp_path, san=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"),
         "--uvicorn-opts", f"--ssl-keyfile {key} --ssl-certfile {cert}"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    log.close()
    uri = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2, context=context):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the TLS server did not come up"
                time.sleep(0.3)
        ckpts = tmp_path / "ckpts"
        write_checkpoints(ckpts, [1, 2])
        line = _one_error_line(_scan(tmp_path, ckpts, probe, uri))
        assert "self-signed certificate" in line, line
        trusted = _scan(tmp_path, ckpts, probe, uri, MLFLOW_TRACKING_SERVER_CERT_PATH=str(cert))
        assert trusted.returncode == 0, trusted.stderr[-3000:]
        write_checkpoints(ckpts, [1, 2, 3])
        insecure = _scan(tmp_path, ckpts, probe, uri, MLFLOW_TRACKING_INSECURE_TLS="true")
        assert insecure.returncode == 0, insecure.stderr[-3000:]
        assert insecure.stderr.count("Unverified HTTPS request") == 1, insecure.stderr[-3000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddsmon").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "ddsmon/checkpoint"))
    assert steps == [1, 2, 3]


@pytest.mark.slow  # one scan each: the default suite keeps the 200 page and the certificate
def test_https_to_a_plain_http_server_is_named(tmp_path: Path, probe: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    with _answering(200, b"{}") as port:
        line = _one_error_line(_scan(tmp_path, ckpts, probe, f"https://127.0.0.1:{port}"))
    assert "does not speak TLS" in line and "http://" in line


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (200, "HTTP 200 with an HTML page titled 'Sign in - Example SSO', not MLflow's JSON"),
        pytest.param(404, "HTTP 404 to /api/2.0/mlflow/", marks=pytest.mark.slow),
        pytest.param(401, "HTTP 401 (not signed in)", marks=pytest.mark.slow),
    ],
)
def test_a_page_that_is_not_mlflow_is_a_settings_error(
    tmp_path: Path, probe: Path, status: int, said: str
) -> None:
    """A sign-in proxy answering 200 with its HTML page was "unreachable", spooled for
    ever; its 401 and a 404 page (a URI missing the server's path) were said as a raw
    REST error. Now each is one line saying what answered and what to check."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    with _answering(status, _SIGN_IN) as port:
        line = _one_error_line(_scan(tmp_path, ckpts, probe, f"http://127.0.0.1:{port}"))
    assert f"MLflow at http://127.0.0.1:{port}: it answered {said}" in line, line
    if status == 401:
        assert "MLFLOW_TRACKING_USERNAME" in line
    else:
        assert "not an MLflow server" in line


def test_a_bad_gateway_is_still_an_outage(tmp_path: Path, probe: Path) -> None:
    """502 from a proxy whose MLflow server is restarting: transient, so the readings
    are spooled (exit 3) and sent by the next run, as before."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    page = b"<html><head><title>502 Bad Gateway</title></head></html>"
    with _answering(502, page) as port:
        proc = _scan(tmp_path, ckpts, probe, f"http://127.0.0.1:{port}")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "unreachable" in proc.stderr and "not usable" not in proc.stderr


@pytest.mark.slow
def test_a_proxy_refusing_mid_run_spools_and_the_readings_arrive_later(
    tmp_path: Path, probe: Path
) -> None:
    """``watch`` logs to a real server; its proxy starts answering 401 (an expired
    session) while a checkpoint lands. That reading was dropped (a 401 was a "bad
    request": reported, never retried, the run lacking the step for good). Now it is
    spooled with the cause said, and delivered once the real server answers again."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    server.start()
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    err_path = tmp_path / "watch.err"
    args = cli_args("watch", ckpts, probe, server.uri, "--quiet", "0.2")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=err)  # fmt: skip
    try:
        wait_for(lambda: only_run_steps(server.uri) == [1], 120, "step 1 recorded")
        server.stop()
        page = b"<html><head><title>401 Authorization Required</title></head></html>"
        with _answering(401, page, port=server.port):
            write_checkpoints(ckpts, [1, 2])
            wait_for(lambda: "step 2 spooled" in err_path.read_text(), 120, "step 2 spooled")
        server.start()
        wait_for(lambda: only_run_steps(server.uri) == [1, 2], 120, "the spool replayed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        server.stop()
    text = err_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    said = [line for line in text.splitlines() if "step 2 spooled" in line]
    assert "answers, but not as an MLflow server ddsmon can use" in said[0], text[-3000:]
    assert "HTTP 401 (not signed in)" in said[0], said[0]


@pytest.mark.slow  # two scans
def test_a_new_store_gets_the_failures_of_checkpoints_that_failed_before(
    tmp_path: Path, probe: Path
) -> None:
    """The user deletes ``mlflow.db`` to start over: the checkpoints read before were
    read again into the new run, but one whose reading had failed (NaN weights the model
    refuses) was skipped as "failed in an earlier run", so the new run showed neither
    its reading nor its failure. Now it is read again too, and its failure is in the
    new run (``ddsmon.failure.<file>``)."""
    from mlflow.tracking import MlflowClient
    from test_cli import write_run

    ckpts = tmp_path / "ckpts"
    write_run(ckpts, [0, 10, 20], nan_at=10)
    strict = f"{REPO / 'tests' / 'fixtures_models.py'}:strict_mlp"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("scan", ckpts, probe, uri, "--fisher", "activation")
    args[args.index("--model") + 1] = strict
    first = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=240)  # fmt: skip
    assert first.returncode == 0 and "1 failed" in first.stderr, first.stderr[-3000:]
    (tmp_path / "mlflow.db").unlink()  # start over: the store is gone, the state is not
    again = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=240)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "failed in an earlier run" not in again.stderr, again.stderr[-3000:]
    assert "and the 1 that failed" in again.stderr, again.stderr[-3000:]
    assert "2 read, 0 skipped, 1 failed" in again.stderr, again.stderr[-3000:]
    uri_again = f"sqlite:///{tmp_path}/./mlflow.db"  # MLflow caches an engine per URI
    (run,) = MlflowClient(uri_again).search_runs(
        [MlflowClient(uri_again).get_experiment_by_name("ddsmon").experiment_id]
    )
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("ddsmon.failure.")}
    assert any("NaN in weight" in v for v in tags.values()), run.data.tags


def test_a_deleted_experiment_at_start_up_is_said_once(tmp_path: Path, probe: Path) -> None:
    """Started on a store whose experiment was deleted: the cause was said twice, as a
    warning ("could not read recorded steps from MLflow: ...") and then as the error."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("ddsmon", str(tmp_path / "art")))
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    proc = _scan(tmp_path, ckpts, probe, uri)
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "is deleted" in line]
    assert len(said) == 1 and said[0].startswith("error:"), proc.stderr
    assert "mlflow experiments restore" in said[0]


@pytest.mark.slow
def test_an_experiment_deleted_while_watching_is_named_with_what_to_do(
    tmp_path: Path, probe: Path
) -> None:
    """The experiment is deleted in the UI while ``watch`` logs into one of its runs:
    the daemon stopped saying only that the run was deleted. Now it names the experiment
    and what to do (exit 2)."""
    from mlflow.tracking import MlflowClient

    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri, "--quiet", "0.2")
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: only_run_steps(uri) == [1], 120, "step 1 recorded")
        client = MlflowClient(uri)
        client.delete_experiment(client.get_experiment_by_name("ddsmon").experiment_id)
        write_checkpoints(ckpts, [1, 2])
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert said and "was deleted with its experiment 'ddsmon'" in said[0], err[-3000:]
    assert "mlflow experiments restore" in said[0]


@pytest.mark.slow
def test_a_server_restarted_on_an_empty_store_is_said_and_the_next_start_recovers(
    tmp_path: Path, probe: Path
) -> None:
    """The tracking server restarts on an empty backend (a container without its
    volume) while ``watch`` logs to it: every later checkpoint failed with "readings not
    recorded in MLflow: RESOURCE_DOES_NOT_EXIST: Run ... not found", for ever. Now the
    daemon says the run is not in the store any more and stops (exit 2); started again,
    it logs into a new run and reads every checkpoint into it."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    server.start()
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    args = cli_args("watch", ckpts, probe, server.uri, "--quiet", "0.2")
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: only_run_steps(server.uri) == [1], 120, "step 1 recorded")
        server.stop()
        server.db.unlink()
        server.start()
        write_checkpoints(ckpts, [1, 2])
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        said = [line for line in err.splitlines() if line.startswith("error:")]
        assert said and f"is not in the store at {server.uri} any more" in said[0], err[-3000:]
        again = _scan(tmp_path, ckpts, probe, server.uri)
        assert again.returncode == 0, again.stderr[-3000:]
        assert only_run_steps(server.uri) == [1, 2]
    finally:
        proc.kill()
        server.stop()


@pytest.mark.slow
def test_a_server_wiped_while_readings_are_spooled_gets_every_step_at_the_next_start(
    tmp_path: Path, probe: Path
) -> None:
    """The server goes down while ``watch`` logs to it (step 3 spooled) and comes back on
    an empty store. Before, the idle daemon said the run was gone and kept running until
    the next checkpoint; started again, it replayed the spool into a new run and took
    that run for its own history: steps 1 and 2 never reached it, and nothing said so.
    Now the daemon stops by itself (exit 2), and the next start reads into the new run
    every step it lacks: each step exactly once."""
    from mlflow_server import MlflowServer

    def land(step: int) -> None:  # only this step's file, the others left untouched
        made = tmp_path / f"made-{step}"
        write_checkpoints(made, list(range(1, step + 1)))
        os.replace(made / f"step_{step:06d}.pt", ckpts / f"step_{step:06d}.pt")

    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    server.start()
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    log = tmp_path / "watch.log"
    try:
        with watching(ckpts, probe, server.uri, stderr_to=log, cwd=tmp_path) as proc:
            wait_for(lambda: only_run_steps(server.uri) == [1, 2], 120, "steps 1, 2 recorded")
            server.stop()
            land(3)
            wait_for(lambda: "spooled" in log.read_text(), 120, "step 3 spooled")
            server.db.unlink()
            server.start()
            rc = proc.wait(timeout=120)  # no checkpoint comes: the daemon stops by itself
        err = log.read_text()
        assert rc == 2, err[-3000:]
        said = [line for line in err.splitlines() if line.startswith("error:")]
        assert said and f"is not in the store at {server.uri} any more" in said[0], err[-3000:]
        land(4)
        again = _scan(tmp_path, ckpts, probe, server.uri)
        assert again.returncode == 0, again.stderr[-3000:]
        assert only_run_steps(server.uri) == [1, 2, 3, 4], again.stderr[-3000:]
        assert "reading them again into this run" in again.stderr, again.stderr[-3000:]
    finally:
        server.stop()
