"""Faults of the state directory, injected for real: a directory (or a FIFO, a dangling
link) in place of each state file, a real full filesystem (a 256 KiB tmpfs, mounted
here when the sandbox lets root mount; else skipped), a real file-size limit
(RLIMIT_FSIZE in a child process: EFBIG, runs everywhere), and a writer killed between
writing a temporary file and renaming it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddsmon.errors import ConfigError, DDSError
from ddsmon.state import (
    STATE_FILES,
    STATE_FOLDERS,
    StateDir,
    StateError,
    append_jsonl_lines,
    read_jsonl,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))


def _assert_names_the_culprit(exc: StateError, path: Path, what: str) -> None:
    message = str(exc)
    assert str(path) in message, message
    assert what in message, message
    assert "--state-dir" in message, message
    assert "\n" not in message
    assert exc.path == path
    assert isinstance(exc, ConfigError) and isinstance(exc, DDSError)


# ---------------------------------------------------------------------- wrong kind of file
@pytest.mark.parametrize("name", STATE_FILES)
def test_directory_in_place_of_a_state_file_is_named_at_claim(tmp_path: Path, name: str) -> None:
    root = tmp_path / ".ddsmon"
    (root / name).mkdir(parents=True)
    state = StateDir(root)
    with pytest.raises(StateError) as info:
        state.claim()
    _assert_names_the_culprit(info.value, root / name, "is a directory, expected a file")
    assert "remove it" in str(info.value)
    assert not state.claimed
    (root / name).rmdir()  # the fix the message asks for
    with state:
        assert state.claimed


@pytest.mark.parametrize("name", STATE_FOLDERS)
def test_file_in_place_of_a_state_folder_is_named_at_claim(tmp_path: Path, name: str) -> None:
    root = tmp_path / ".ddsmon"
    root.mkdir()
    (root / name).write_text("x")
    with pytest.raises(StateError) as info:
        StateDir(root).claim()
    _assert_names_the_culprit(info.value, root / name, "is a file, expected a directory")


def test_fifo_and_dangling_link_in_place_of_state_files(tmp_path: Path) -> None:
    root = tmp_path / ".ddsmon"
    root.mkdir()
    os.mkfifo(root / "done.jsonl")
    with pytest.raises(StateError) as info:
        StateDir(root).claim()
    _assert_names_the_culprit(info.value, root / "done.jsonl", "named pipe (FIFO)")
    # reading it does not block on the FIFO either
    with pytest.raises(StateError, match="FIFO"):
        StateDir(root).done_steps()
    os.unlink(root / "done.jsonl")
    os.symlink(tmp_path / "nowhere", root / "spool.jsonl")
    with pytest.raises(StateError) as info:
        StateDir(root).claim()
    _assert_names_the_culprit(info.value, root / "spool.jsonl", "dangling symbolic link")


def test_state_file_replaced_by_a_directory_while_running(tmp_path: Path) -> None:
    """Claimed and in use, then each file is swapped for a directory: every call that
    touches it raises a StateError naming it, never a raw OSError."""
    root = tmp_path / ".ddsmon"
    state = StateDir(root)
    with state:
        state.mark_done("a.pt", (1, 1), 1)
        state.set("detector", {"v": 1})
        state.spool_append({"i": 0})
        for name in ("done.jsonl", "state.json", "spool.jsonl"):
            (root / name).unlink()
            (root / name).mkdir()
        fresh = StateDir(root)  # no cached read-set
        for call in (
            lambda: fresh.is_done("a.pt", (1, 1)),
            lambda: state.mark_done("b.pt", (2, 2), 2),
            lambda: state.get("detector"),
            lambda: state.set("detector", {"v": 2}),
            lambda: state.spool_append({"i": 1}),
            lambda: state.spool_pending(),
            lambda: state.spool_ack(1),
        ):
            with pytest.raises(StateError, match="is a directory, expected a file"):
                call()
        # the module helpers the MLflow sink uses directly
        (root / "history.jsonl").mkdir()
        with pytest.raises(StateError, match=r"history\.jsonl is a directory"):
            append_jsonl_lines(root / "history.jsonl", ["{}"])
        with pytest.raises(StateError, match=r"history\.jsonl is a directory"):
            list(read_jsonl(root / "history.jsonl"))
        assert _temporaries(root) == []


def test_newline_in_the_state_path_cannot_forge_a_line(tmp_path: Path) -> None:
    root = tmp_path / "run\nERROR forged" / ".ddsmon"
    (root / "lock").mkdir(parents=True)
    with pytest.raises(StateError) as info:
        StateDir(root).claim()
    message = str(info.value)
    assert "\n" not in message
    assert "run\\nERROR forged" in message


def test_cli_names_the_state_file_not_mlflow(tmp_path: Path, probe: Path) -> None:
    """End to end: ``ddsmon scan`` with a directory in place of spool.jsonl exits 2 with
    the state file named, before anything is read or blamed on MLflow."""
    ckpts = tmp_path / "ckpts"
    (ckpts / ".ddsmon" / "spool.jsonl").mkdir(parents=True)
    factory = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"
    result = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--model", factory,
         "--probe", str(probe), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=240, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    if "ImportError" in result.stderr:  # the CLI side itself broken: another test's business
        pytest.skip(f"ddsmon.cli does not import: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 2, result.stderr
    err = " ".join(result.stderr.split())  # click wraps long lines
    assert "spool.jsonl is a directory, expected a file" in err, result.stderr
    assert "refused" not in err and "Traceback" not in result.stderr


# ---------------------------------------------------------------------- full disk (tmpfs)
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, unmounted afterwards (filled by :func:`_fill` to make it
    full; its size only bounds what a test can free: a scan of six checkpoints keeps
    about 64 KiB of state, with the copy an atomic write makes)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here; test_file_size_limit_* covers the failed-write path")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); EFBIG test covers it")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(directory: Path) -> list[Path]:
    """Fill the filesystem with 4 KiB files until ENOSPC; returns them."""
    fillers: list[Path] = []
    for i in range(10_000):
        path = directory / f"filler{i}"
        try:
            with open(path, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            path.unlink(missing_ok=True)
            return fillers
        fillers.append(path)
    raise AssertionError("the small filesystem never filled up")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _assert_enospc(exc: StateError, path: Path) -> None:
    assert exc.errno == errno.ENOSPC
    message = str(exc)
    assert f"no space left on device writing {path}" in message, message
    assert "--state-dir" in message


def test_full_disk_every_write_fails_cleanly_and_resumes(small_fs: Path) -> None:
    root = small_fs / ".ddsmon"
    state = StateDir(root)
    state.claim()
    try:
        state.mark_done("a.pt", (1, 1), 1)
        state.set("detector", {"history": [1, 2, 3]})
        for i in range(3):
            state.spool_append({"i": i})
        before = _snapshot(root)
        fillers = _fill(small_fs)
        big = "x" * 12000  # three pages: a part of it lands before ENOSPC
        os.unlink(fillers.pop())  # one page free: writes start, then run out
        calls = [
            ("done.jsonl", lambda: state.mark_done(f"{big}.pt", (2, 2), 2)),
            ("state.json", lambda: state.set("detector", {"history": big})),
            ("spool.jsonl", lambda: state.spool_append({"i": 3, "pad": big})),
        ]
        for name, call in calls:
            with pytest.raises(StateError) as info:
                call()
            _assert_enospc(info.value, root / name)
        # a rewrite (spool_ack) on a completely full disk
        _fill(small_fs)
        with pytest.raises(StateError) as info:
            state.spool_ack(1)
        _assert_enospc(info.value, root / "spool.jsonl")
        # nothing half-written, no temporary file left, the old state intact
        assert _temporaries(root) == []
        assert _snapshot(root) == before
        assert not state.is_done(f"{big}.pt", (2, 2))
        assert StateDir(root).done_steps() == {1}
        assert StateDir(root).get("detector") == {"history": [1, 2, 3]}
        assert [r["i"] for r in state.spool_pending()] == [0, 1, 2]
        # space again: everything works and nothing was lost or doubled
        for path in small_fs.glob("filler*"):
            path.unlink()
        state.mark_done("b.pt", (2, 2), 2)
        state.set("detector", {"history": [4]})
        state.spool_ack(1)
        fresh = StateDir(root)
        assert fresh.done_steps() == {1, 2}
        assert fresh.get("detector") == {"history": [4]}
        assert [r["i"] for r in fresh.spool_pending()] == [1, 2]
        assert _temporaries(root) == []
    finally:
        state.release()


def test_full_disk_at_claim_is_a_clear_error_and_no_claim(small_fs: Path) -> None:
    root = small_fs / ".ddsmon"
    root.mkdir()
    fillers = _fill(small_fs)
    state = StateDir(root)
    with pytest.raises(StateError) as info:
        state.claim()
    _assert_enospc(info.value, root / "lock")
    assert not state.claimed
    for path in fillers:
        path.unlink()
    other = StateDir(root)  # the failed claim left no lock behind
    with other:
        assert other.holder()["pid"] == os.getpid()


# ---------------------------------------------------------------------- file-size limit
def test_file_size_limit_is_a_clear_error_and_writes_are_undone(tmp_path: Path) -> None:
    """RLIMIT_FSIZE in a child (works without root): EFBIG part-way through each write."""
    root = tmp_path / ".ddsmon"
    seed = StateDir(root)
    seed.mark_done("a.pt", (1, 1), 1)
    seed.set("k", "v")
    seed.spool_append({"i": 0})
    before = _snapshot(root)
    limit = max(len(b) for b in before.values()) + 2000
    child = _run_python(
        f"""
        import json, resource, signal
        from ddsmon.state import StateDir, StateError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        s = StateDir({str(root)!r})
        big = "x" * 5000
        out = []
        for call in (lambda: s.mark_done(big, (2, 2), 2), lambda: s.set("k", big),
                     lambda: s.spool_append({{"pad": big}})):
            try:
                call()
                out.append(None)
            except StateError as exc:
                out.append([str(exc), exc.errno])
        print(json.dumps(out))
        """
    )
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    for (message, number), name in zip(results, ["done.jsonl", "state.json", "spool.jsonl"]):
        assert number == errno.EFBIG
        assert f"file too large (the file size limit) writing {root / name}" in message
    assert _snapshot(root) == before  # cut back / temp removed: nothing changed
    assert _temporaries(root) == []


# ---------------------------------------------------------------------- orphan temporaries
def test_claim_removes_a_temporary_left_by_a_killed_writer(tmp_path: Path) -> None:
    root = tmp_path / ".ddsmon"
    StateDir(root).set("run", "abc")
    child = _run_python(
        f"""
        import os
        from ddsmon.state import StateDir
        os.replace = lambda *a, **k: os._exit(9)  # die between the write and the rename
        StateDir({str(root)!r}).set("run", "new")
        """
    )
    assert child.returncode == 9, child.stderr
    orphans = _temporaries(root)
    assert len(orphans) == 1 and orphans[0].startswith(".state.json.")
    # other temporaries: a live writer's (kept), a legacy name of a dead pid (removed),
    # another host's recent one (kept) and old one (removed)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    live = root / f".spool.jsonl.{os.getppid()}.1.tmp"
    legacy = root / f".spool.jsonl.{dead_pid}.7.tmp"
    foreign_new = root / f".state.json.{dead_pid}.7.0badc0de.tmp"
    foreign_old = root / f".state.json.{dead_pid}.8.0badc0de.tmp"
    for path in (live, legacy, foreign_new, foreign_old):
        path.write_text("partial")
    old = time.time() - 7200
    os.utime(foreign_old, (old, old))
    with StateDir(root) as state:
        left = set(_temporaries(root))
        assert left == {live.name, foreign_new.name}, left
        assert state.get("run") == "abc"  # the old value, whole
