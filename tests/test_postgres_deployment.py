"""The multi-machine topology of ``docker/compose.yaml``, without Docker.

A real PostgreSQL (started by ``.ci/postgres.sh``, which sets ``DDSMON_TEST_POSTGRES_URI``)
backs a real ``mlflow server`` process on loopback that proxies artifacts into a local
directory (``--serve-artifacts``, as the compose file does into MinIO). ``ddsmon scan``
runs as its own process against ``http://127.0.0.1:PORT``, exactly as a watcher on a GPU
node would, and the results are read back with ``MlflowClient``:

* one run; every per-layer reading's history (``dds/<reading>/<layer>`` for a headline
  reading, ``dds_detail/<reading>/<layer>`` for the others) holds each checkpoint's step exactly
  once, with the value the engine computes in this process;
* params and the per-checkpoint spectra artifacts (npz) are there, and the artifacts
  went through the server into its artifact destination;
* credentials travel only in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``:
  the password appears in no output, param, tag or state file; and against a server
  with authentication (``--app-name basic-auth``) those variables are what lets the
  watcher in, and a wrong password writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ddsmon.sinks.mlflow_keys import reading_metric_key
from tests.fixtures_models import mlp, mlp_probe

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().with_name("fixtures_models.py")
POSTGRES_URI = os.environ.get("DDSMON_TEST_POSTGRES_URI", "")
STEPS = (10, 20, 30)
#: Linear layers of ``mlp()``: their readings are resolved on the fixture probe.
LAYERS = ("0", "2")
READINGS = ("lambda_min", "sigma_min", "log_volume")

#: The PostgreSQL tests: run by .ci/postgres.sh, which starts the database and sets the URI.
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URI,
    reason="DDSMON_TEST_POSTGRES_URI is unset: `bash .ci/postgres.sh` starts a throwaway "
    "PostgreSQL on loopback, sets it and runs these tests",
)


@dataclass
class Server:
    url: str
    artifacts: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(extra)
    return env


@contextlib.contextmanager
def _start_server(root: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``mlflow server`` on loopback over the PostgreSQL store; yields once /health answers."""
    pytest.importorskip("psycopg2", reason="psycopg2 missing: .ci/postgres.sh installs it")
    port = _free_port()
    artifacts = root / "artifacts"
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", POSTGRES_URI,
        "--artifacts-destination", str(artifacts), "--serve-artifacts",
        *args,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env or _server_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield Server(url=url, artifacts=artifacts, log=log)
    finally:
        # The server forks workers: stop the whole process group.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _write_checkpoints(root: Path) -> tuple[Path, Path, dict[int, dict[str, torch.Tensor]]]:
    """Three checkpoints of ``mlp()`` with perturbed weights, and the probe file beside them."""
    ckpts = root / "ckpts"
    ckpts.mkdir()
    probe = root / "probe.pt"
    inputs, targets = mlp_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)
    model = mlp()
    generator = torch.Generator().manual_seed(7)
    states = {}
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"model": state, "step": step}, ckpts / f"step_{step}.pt")
        states[step] = state
    return ckpts, probe, states


def _expected_readings(states: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict[int, float]]:
    """What the engine reads in this process: the reading's metric key
    (:func:`~ddsmon.sinks.mlflow_keys.reading_metric_key`) -> {step: value}."""
    from ddsmon.engine import compute_signatures

    inputs, targets = mlp_probe()
    expected: dict[str, dict[int, float]] = {}
    for step, state in states.items():
        model = mlp()
        model.load_state_dict(state)
        sig = compute_signatures(model, inputs, targets, loss="ce", device="cpu")
        for layer in LAYERS:
            values = sig.layers[layer].to_dict()
            for reading in READINGS:
                value = values.get(reading)
                if value is not None and math.isfinite(value):
                    expected.setdefault(reading_metric_key(layer, reading), {})[step] = float(value)
    return expected


def _scan(ckpts: Path, probe: Path, url: str, experiment: str, env: dict[str, str]):
    cmd = [
        sys.executable, "-m", "ddsmon.cli", "-vv", "scan", str(ckpts),
        "--model", f"{FIXTURES}:mlp", "--probe", str(probe), "--device", "cpu",
        "--tracking-uri", url, "--experiment", experiment,
    ]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        cmd, cwd=ckpts.parent, env=full_env, capture_output=True, text=True, timeout=200,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _client(
    url: str, monkeypatch: pytest.MonkeyPatch, user: str | None = None, password: str | None = None
):
    from mlflow.tracking import MlflowClient

    if user is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password or "")
    return MlflowClient(tracking_uri=url)


def _only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created on the server"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, (
        f"expected one run in {experiment!r}, found {[r.info.run_id for r in runs]}"
    )
    return runs[0]


def _all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_all_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _start_server(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


@pytest.mark.postgres
@pytest.mark.timeout(240)
@needs_postgres
def test_scan_into_postgres_backed_server(server: Server, tmp_path: Path, monkeypatch) -> None:
    ckpts, probe, states = _write_checkpoints(tmp_path)
    experiment = f"pg-{secrets.token_hex(4)}"
    password = f"pw-{secrets.token_hex(12)}"
    # The server has no authentication and ignores the credentials; ddsmon must still
    # carry them without printing or recording them.
    result = _scan(
        ckpts, probe, server.url, experiment,
        {"MLFLOW_TRACKING_USERNAME": "ddsmon-ci", "MLFLOW_TRACKING_PASSWORD": password},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ddsmon scan exited {result.returncode}:\n{output[-6000:]}"
    assert password not in output, "the tracking password appeared in ddsmon's output"

    client = _client(server.url, monkeypatch)
    run = _only_run(client, experiment)
    run_id = run.info.run_id

    expected = _expected_readings(states)
    assert expected, (
        "the engine resolved none of the checked readings: the test would check nothing"
    )
    for key, by_step in expected.items():
        history = client.get_metric_history(run_id, key)
        steps = sorted(m.step for m in history)
        assert steps == sorted(by_step), (
            f"{key}: steps {steps} in MLflow, expected each of {sorted(by_step)} once"
        )
        for m in history:
            assert m.value == pytest.approx(by_step[m.step], rel=1e-6, abs=1e-12), (key, m.step)

    params = run.data.params
    assert params, "no params logged"
    from ddsmon import __version__

    assert __version__ in params.values(), f"ddsmon version not among the params {params}"
    for name, value in {**params, **run.data.tags}.items():
        assert password not in value, f"the tracking password is in param/tag {name!r}"
        assert password not in name

    artifacts = _all_artifacts(client, run_id)
    npz = [a for a in artifacts if a.endswith(".npz")]
    assert len(npz) >= len(STEPS), (
        f"expected spectra npz for each of {STEPS}, artifacts: {artifacts}"
    )
    # Proxied: the files are in the server's artifact destination, not beside ddsmon.
    on_server = {p.name for p in server.artifacts.rglob("*.npz")}
    assert {Path(a).name for a in npz} <= on_server, f"npz not in {server.artifacts}: {on_server}"

    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert password.encode() not in path.read_bytes(), f"the tracking password is in {path}"


@dataclass
class AuthServer:
    server: Server
    admin_password: str

    def add_user(self) -> tuple[str, str]:
        """A new non-admin MLflow user (name, password), created through the admin API."""
        import requests

        user, password = f"watcher-{secrets.token_hex(4)}", f"pw-{secrets.token_hex(12)}"
        created = requests.post(
            f"{self.server.url}/api/2.0/mlflow/users/create",
            json={"username": user, "password": password},
            auth=("admin", self.admin_password), timeout=30,
        )  # fmt: skip
        assert created.ok, f"creating user {user}: {created.status_code} {created.text[:500]}"
        return user, password


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """``mlflow server --app-name basic-auth``: its user store in the same PostgreSQL
    database (its own Alembic version table), the admin created on first start."""
    pytest.importorskip("flask_wtf", reason="mlflow[auth] missing: .ci/postgres.sh installs it")
    root = tmp_path_factory.mktemp("mlflow-auth-server")
    admin_password = f"admin-{secrets.token_hex(12)}"
    auth_ini = root / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {POSTGRES_URI}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = _server_env(
        MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
    )
    with _start_server(root, "--app-name", "basic-auth", env=env) as srv:
        import requests

        # The admin persists in the user store: a reused database may hold another one.
        probe = requests.get(
            f"{srv.url}/api/2.0/mlflow/users/get", params={"username": "admin"},
            auth=("admin", admin_password), timeout=30,
        )  # fmt: skip
        if probe.status_code == 401:
            pytest.skip("this database's MLflow admin has another password (a reused database)")
        yield AuthServer(server=srv, admin_password=admin_password)


@pytest.mark.postgres
@pytest.mark.timeout(240)
@needs_postgres
def test_authenticated_server_admits_the_environment_credentials(
    auth_server: AuthServer, tmp_path: Path, monkeypatch
) -> None:
    url = auth_server.server.url
    user, password = auth_server.add_user()
    ckpts, probe, _ = _write_checkpoints(tmp_path)
    experiment = f"pg-auth-{secrets.token_hex(4)}"
    result = _scan(
        ckpts, probe, url, experiment,
        {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ddsmon scan exited {result.returncode}:\n{output[-6000:]}"
    assert password not in output, "the tracking password appeared in ddsmon's output"

    admin = _client(url, monkeypatch, "admin", auth_server.admin_password)
    run = _only_run(admin, experiment)
    for layer in LAYERS:
        history = admin.get_metric_history(run.info.run_id, reading_metric_key(layer, "lambda_min"))
        assert sorted(m.step for m in history) == list(STEPS)
    assert [a for a in _all_artifacts(admin, run.info.run_id) if a.endswith(".npz")]
    for name, value in {**run.data.params, **run.data.tags}.items():
        assert password not in value, f"the tracking password is in param/tag {name!r}"
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert password.encode() not in path.read_bytes(), f"the tracking password is in {path}"


@pytest.mark.postgres
@pytest.mark.timeout(240)
@needs_postgres
def test_refused_credentials_fail_loudly_and_lose_nothing(
    auth_server: AuthServer, tmp_path: Path, monkeypatch
) -> None:
    """A watcher started with a wrong password, then restarted with the right one: the
    server refuses the first (401), which must not be shown, must write nothing, must not
    exit 0, and must not mark the checkpoints as read; the second logs every step once."""
    url = auth_server.server.url
    user, password = auth_server.add_user()
    ckpts, probe, _ = _write_checkpoints(tmp_path)
    experiment = f"pg-refused-{secrets.token_hex(4)}"
    admin = _client(url, monkeypatch, "admin", auth_server.admin_password)

    wrong = f"wrong-{secrets.token_hex(12)}"
    denied = _scan(
        ckpts, probe, url, experiment,
        {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": wrong},
    )  # fmt: skip
    denied_output = denied.stdout + denied.stderr
    assert wrong not in denied_output, "the rejected password appeared in ddsmon's output"
    assert admin.get_experiment_by_name(experiment) is None, "a refused login wrote to MLflow"

    result = _scan(
        ckpts, probe, url, experiment,
        {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ddsmon scan exited {result.returncode}:\n{output[-6000:]}"
    run = _only_run(admin, experiment)
    for layer in LAYERS:
        key = reading_metric_key(layer, "lambda_min")
        history = admin.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(STEPS), (
            f"{key} after a refused scan and the fixed one: steps "
            f"{sorted(m.step for m in history)}, expected {list(STEPS)}\n"
            f"refused scan:\n{denied_output[-2500:]}\nfixed scan:\n{output[-1500:]}"
        )
    assert denied.returncode != 0, (
        f"a scan whose every request the server refused (401) exited 0:\n{denied_output[-4000:]}"
    )


# --- docker/: no Docker engine here, so check what can be checked without one ---------------

DOCKER = REPO / "docker"
_MOUNT = re.compile(r"^(?P<src>.+?):(?P<dst>/[^:]*)(?::(?P<mode>ro|rw))?$")


def _compose(name: str = "compose.yaml") -> dict:
    import yaml

    return yaml.safe_load((DOCKER / name).read_text())


def _option(cmd: list[str], flag: str) -> str:
    assert flag in cmd, f"{flag} missing from {cmd}"
    return cmd[cmd.index(flag) + 1]


def _mounts(service: dict) -> dict[str, tuple[str, str | None]]:
    out = {}
    for spec in service.get("volumes", []):
        m = _MOUNT.match(spec)
        assert m, f"volume {spec!r} is not SOURCE:/TARGET[:ro|rw]"
        out[m["dst"]] = (m["src"], m["mode"])
    return out


def _parses_with_ddsmon_cli(args: list[str], ckpts: Path) -> None:
    """Parse (not run) a `ddsmon ...` argument list with the real click commands."""
    from ddsmon.cli import main

    args = [str(ckpts) if a == "/ckpts" else a for a in args]
    with main.make_context("ddsmon", list(args)) as ctx:
        sub = main.get_command(ctx, args[0])
        assert sub is not None, f"ddsmon has no command {args[0]!r}"
        with sub.make_context(args[0], args[1:], parent=ctx):
            pass


def test_compose_topology_is_consistent(tmp_path: Path) -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow"} <= services.keys()
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: no image and no build"
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep} healthy: no healthcheck"
                )
            if how["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot job"
        for src, _ in _mounts(svc).values():
            if not src.startswith((".", "/", "$")):
                assert src in named_volumes, f"{name}: volume {src!r} is not declared"

    # The server: PostgreSQL backend, S3 artifacts proxied, secrets only in the environment.
    server = services["mlflow"]
    cmd = [str(a) for a in server["command"]]
    backend = _option(cmd, "--backend-store-uri")
    assert backend.startswith("postgresql+psycopg2://"), backend
    assert "@postgres:" in backend and ":" not in backend.split("://")[1].split("@")[0], (
        "no password in the backend URI (PGPASSWORD carries it)"
    )
    assert _option(cmd, "--artifacts-destination").startswith("s3://")
    assert "--serve-artifacts" in cmd
    env = server["environment"]
    for key in (
        "PGPASSWORD",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert key in env, f"mlflow service: {key} not set"
    bucket = _option(cmd, "--artifacts-destination").removeprefix("s3://")
    assert services["minio-init"]["environment"]["MLFLOW_BUCKET"] == bucket
    assert "mc mb" in services["minio-init"]["command"][0]
    if "--app-name" in cmd:
        assert _option(cmd, "--app-name") == "basic-auth"
        ini = DOCKER / "mlflow" / "basic_auth.ini"
        assert (
            "password"
            not in ini.read_text()
            .lower()
            .split("[mlflow]")[1]
            .replace("admin_password", "")
            .split("#")[0]
        )
        assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in env and "MLFLOW_AUTH_ADMIN_PASSWORD" in env

    # The server's flags exist in the MLflow ddsmon is tested with (parsed, not run; in a
    # child process, as importing mlflow.cli pulls in the whole server).
    check = (
        "import sys\nfrom mlflow.cli import cli\nargs = sys.argv[1:]\n"
        "with cli.make_context('mlflow', ['server', *args]) as ctx:\n"
        "    cli.get_command(ctx, 'server').make_context('server', args, parent=ctx).close()\n"
    )
    parsed = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", check, *cmd],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert parsed.returncode == 0, f"`mlflow server {' '.join(cmd)}`:\n{parsed.stderr[-3000:]}"

    # One watcher per directory: distinct checkpoint dirs, state and experiments.
    watchers = {n: s for n, s in services.items() if n.startswith("watcher")}
    assert len(watchers) >= 2
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    seen: dict[str, set[str]] = {"ckpts": set(), "state": set(), "experiment": set()}
    for name, svc in watchers.items():
        cmd = [str(a) for a in svc["command"]]
        assert cmd[:2] == ["watch", "/ckpts"], f"{name}: {cmd}"
        assert _option(cmd, "--tracking-uri") == "http://mlflow:5000"
        assert float(_option(cmd, "--poll")) > 0, "bind mounts may not deliver inotify: poll"
        assert svc["depends_on"]["mlflow"]["condition"] == "service_healthy"
        mounts = _mounts(svc)
        assert mounts["/ckpts"][1] == "ro", f"{name}: mount the checkpoints read-only"
        assert _option(cmd, "--state-dir") in mounts, f"{name}: state dir not on a volume"
        seen["ckpts"].add(mounts["/ckpts"][0])
        seen["state"].add(mounts[_option(cmd, "--state-dir")][0])
        seen["experiment"].add(_option(cmd, "--experiment"))
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(svc["environment"])
        assert not any("password" in a.lower() or "@" in a for a in cmd), f"{name}: secret in {cmd}"
        _parses_with_ddsmon_cli(cmd, ckpts)
    for what, values in seen.items():
        assert len(values) == len(watchers), f"watchers share a {what}: {values}"

    gpu = _compose("compose.gpu.yaml")["services"]
    for name, svc in gpu.items():
        assert name in watchers, f"compose.gpu.yaml names {name}, not a watcher"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_dockerfile_is_non_root_cuda_torch_with_ddsmon_entrypoint(tmp_path: Path) -> None:
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    tag = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda[\d.]+-cudnn\d+-runtime", base[1])
    assert tag, f"base image {base[1]} is not a CUDA runtime image of pytorch/pytorch"
    assert (int(tag[1]), int(tag[2])) >= (2, 10), "ddsmon requires torch >= 2.10"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the container must not run as root"
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry and json.loads(entry[1]) == ["ddsmon"]
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd, "no default CMD"
    default = json.loads(cmd[1])
    assert default[:2] == ["watch", "/ckpts"]
    (tmp_path / "ckpts").mkdir()
    _parses_with_ddsmon_cli(default, tmp_path / "ckpts")
    # What the build copies exists; the ignore file keeps the rest out of the context.
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"] and "!ddsmon/" in ignore

    server = (DOCKER / "mlflow" / "Dockerfile").read_text()
    assert re.search(r"^ARG MLFLOW_VERSION=\d+\.\d+\.\d+$", server, re.M), "pin the server's mlflow"
    for package in ("psycopg2-binary", "boto3", "mlflow[auth]"):
        assert package in server, f"the server image lacks {package}"
    assert re.findall(r"^USER (\S+)$", server, re.M)[-1] != "root"
