"""A real ``mlflow server`` for tests: 127.0.0.1 on a free port, a SQLite store, proxied
artifacts, in its own process group so that stopping it stops its workers too.

Stable interface (several test files use it): ``MlflowServer(root)``, ``.uri``, ``.db``,
``.start()`` (waits for ``/health``), ``.stop()``, ``.answers()``, ``.log_tail()``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ("START_DEADLINE_S", "MlflowServer")

START_DEADLINE_S = 120.0


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:<port> with a SQLite store and proxied artifacts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "server.db"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.db}",
                "--artifacts-destination", str(self.root / "artifacts"),
            ],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
            start_new_session=True,  # its own process group: stop() reaches the workers
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mlflow server exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"mlflow server not healthy in {START_DEADLINE_S}s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        pgid = os.getpgid(proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=20)
        # the worker may outlive its parent for a moment; make sure the group is gone
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pgid, signal.SIGKILL)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self) -> str:
        path = self.root / f"server-{self.starts}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""
