"""Folders and files the daemon may not read (a shared cluster: another user's run
folder in the tree): named and skipped, never a traceback. As root, the process runs
without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (setpriv), so file modes apply to it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from fault_helpers import FACTORY, REPO, as_unprivileged, only_run_steps, write_checkpoints


@contextmanager
def chmodded(mode: int, *paths: Path) -> Iterator[None]:
    """Each of ``paths`` at ``mode`` in the block, then back to the mode it had (the
    test's clean-up, and pytest's of tmp_path, must search and remove them)."""
    before = [path.stat().st_mode & 0o7777 for path in paths]
    try:
        for path in paths:
            path.chmod(mode)
        yield
    finally:
        for path, old in zip(paths, before, strict=True):
            with suppress(FileNotFoundError):  # moved away by the test: its own to restore
                path.chmod(old)


def _scan(ckpts: Path, probe: Path, uri: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*as_unprivileged(), sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts),
         "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri, "--no-plots",
         "--state-dir", str(state)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_an_unreadable_subfolder_and_file_are_named_and_the_rest_is_read(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    write_checkpoints(ckpts / "theirs", [3])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with chmodded(0, ckpts / "theirs", ckpts / "step_000002.pt"):
        out = _scan(ckpts, probe, uri, tmp_path / "state")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"cannot list {ckpts / 'theirs'}" in out.stderr, out.stderr
    assert "step_000002.pt" in out.stderr and "permission denied" in out.stderr, out.stderr
    assert "1 read" in out.stderr and "1 failed" in out.stderr, out.stderr
    assert only_run_steps(uri) == [1]


def test_a_folder_that_cannot_be_listed_is_said_again_after_it_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Said once while it stays unlistable, and again if it fails again after it was
    listed (here ELOOP, a link to itself, which fails for root too) (review)."""
    import logging

    from ddsmon.checkpoints import _listdir

    loop = tmp_path / "run"
    loop.symlink_to(loop)
    with caplog.at_level(logging.WARNING, logger="ddsmon.checkpoints"):
        assert _listdir(loop) == [] and _listdir(loop) == []
        assert sum("cannot list" in r.getMessage() for r in caplog.records) == 1
        loop.unlink()
        loop.mkdir()
        assert _listdir(loop) == []  # listed: empty
        loop.rmdir()
        loop.symlink_to(loop)
        assert _listdir(loop) == []
        assert sum("cannot list" in r.getMessage() for r in caplog.records) == 2


def test_a_subfolder_listed_but_not_searchable_is_named_and_the_rest_is_read(
    tmp_path: Path, probe: Path
) -> None:
    """``r--`` (0o444): listing works, every entry's lstat fails with EACCES. The scan
    ended on that PermissionError with a traceback; now the folder is named once and the
    checkpoints beside it are read."""
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1, 2])
    write_checkpoints(ckpts / "theirs", [3])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with chmodded(0o444, ckpts / "theirs"):
        out = _scan(ckpts, probe, uri, tmp_path / "state")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    said = f"cannot read the entries of {ckpts / 'theirs'}"
    assert out.stderr.count(said) == 1, out.stderr
    assert "not searched" in out.stderr, out.stderr
    assert only_run_steps(uri) == [1, 2]


def test_a_checkpoint_directory_listed_but_not_searchable_is_a_clear_error(
    tmp_path: Path, probe: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    with chmodded(0o444, ckpts):
        out = _scan(ckpts, probe, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "state")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"{ckpts}: permission denied looking for ddsmon.toml in it" in out.stderr
    assert "cannot be searched" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("mode", "said"),
    [(0o444, "cannot read the entries of"), (0, "cannot list")],
    ids=["r--", "---"],
)
def test_watch_reads_beside_an_unreadable_subfolder_and_reads_it_once_it_can(
    tmp_path: Path, probe: Path, mode: int, said: str
) -> None:
    """Unreadable when the watch begins: named, the rest read live; made readable, what
    it holds is read (before, a folder unreadable at the start was never read again)."""
    import signal
    import time

    from fault_helpers import cli_args

    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    write_checkpoints(ckpts / "theirs", [3])
    (ckpts / "theirs").chmod(mode)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri, "--quiet", "0.2", "--state-dir",
                    str(tmp_path / "state"))  # fmt: skip
    err_path, out_path = tmp_path / "watch.err", tmp_path / "watch.out"
    with open(err_path, "w") as err, open(out_path, "w") as out:
        proc = subprocess.Popen([*as_unprivileged(), *args], cwd=REPO, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip

    def wait_for_step(step: int) -> None:  # the plain view's line per checkpoint read
        deadline = time.monotonic() + 120
        while f"step {step} " not in out_path.read_text():
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, f"step {step} not read:\n{err_path.read_text()}"
            time.sleep(0.2)

    try:
        wait_for_step(1)
        write_checkpoints(ckpts, [2])
        wait_for_step(2)
        (ckpts / "theirs").chmod(0o755)  # searchable again: what it holds is read
        wait_for_step(3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        (ckpts / "theirs").chmod(0o755)
    text = err_path.read_text()
    assert "Traceback" not in text, text
    assert f"{said} {ckpts / 'theirs'}" in text, text
    assert only_run_steps(uri) == [1, 2, 3], text


def _unprivileged_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*as_unprivileged(), sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_discover_names_a_watched_directory_that_cannot_be_searched(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    write_checkpoints(ckpts, [1])
    code = (
        "import sys; from ddsmon.checkpoints import discover; from ddsmon.errors import "
        "ConfigError\ntry:\n    discover(sys.argv[1])\nexcept ConfigError as e:\n    print(e)"
    )
    with chmodded(0o444, ckpts):
        out = _unprivileged_python(code, str(ckpts))
    assert out.returncode == 0, out.stderr
    assert f"{ckpts}: permission denied reading the checkpoint directory's entries" in out.stdout


def test_links_into_a_folder_that_cannot_be_searched_are_no_traceback(
    tmp_path: Path, probe: Path
) -> None:
    """A link to a checkpoint file and one to a folder, both inside an r-- folder out of
    the tree: Python's is_dir raised PermissionError through discover (review). The file
    is a checkpoint that cannot be read (that checkpoint's failure), the folder nothing."""
    ckpts, locked = tmp_path / "ckpts", tmp_path / "locked"
    write_checkpoints(ckpts, [1])
    write_checkpoints(locked / "sub", [3])
    write_checkpoints(locked, [2])
    (ckpts / "step_000002.pt").symlink_to(locked / "step_000002.pt")
    (ckpts / "elsewhere").symlink_to(locked / "sub")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with chmodded(0o444, locked):
        out = _scan(ckpts, probe, uri, tmp_path / "state")
    assert "Traceback" not in out.stderr, out.stderr
    assert "1 read" in out.stderr and "1 failed" in out.stderr, out.stderr
    assert only_run_steps(uri) == [1]


def test_a_checkpoint_folder_that_cannot_be_searched_says_so(tmp_path: Path) -> None:
    """An r-- Hugging Face folder: its reason is the permission, not a missing file."""
    folder = tmp_path / "ckpts" / "checkpoint-5"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    code = (
        "import sys; from pathlib import Path; from ddsmon.checkpoints import CheckpointRef, "
        "check_complete; print(check_complete(CheckpointRef(Path(sys.argv[1]), 'hf')))"
    )
    with chmodded(0o444, folder):
        out = _unprivileged_python(code, str(folder))
    assert out.returncode == 0, out.stderr
    assert "permission denied: the folder can be listed but not searched" in out.stdout, out


def test_a_folder_moved_in_unreadable_is_read_once_it_can_be(tmp_path: Path, probe: Path) -> None:
    """Another user's run folder moved into the watched directory while it cannot be
    searched (r--): read once its mode lets it be, and nothing before (the polling
    observer passed too, when tried)."""
    import signal
    import time

    from fault_helpers import cli_args

    ckpts, outside = tmp_path / "ckpts", tmp_path / "outside"
    write_checkpoints(ckpts, [1])
    write_checkpoints(outside / "theirs", [3])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args("watch", ckpts, probe, uri, "--quiet", "0.2", "--state-dir",
                    str(tmp_path / "state"))  # fmt: skip
    err_path, out_path = tmp_path / "watch.err", tmp_path / "watch.out"
    with open(err_path, "w") as err, open(out_path, "w") as out:
        proc = subprocess.Popen([*as_unprivileged(), *args], cwd=REPO, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip

    def wait_for(text: str, path: Path) -> None:
        deadline = time.monotonic() + 120
        while text not in path.read_text():
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, f"{text!r} not seen:\n{err_path.read_text()}"
            time.sleep(0.2)

    try:
        with chmodded(0o444, outside / "theirs"):
            wait_for("step 1 ", out_path)
            (outside / "theirs").rename(ckpts / "theirs")
            write_checkpoints(ckpts, [2])
            wait_for("step 2 ", out_path)
            time.sleep(1.0)  # the folder's events are in
            assert "step 3 " not in out_path.read_text()
            (ckpts / "theirs").chmod(0o755)  # searchable: what it holds is read
            wait_for("step 3 ", out_path)
            (ckpts / "theirs").rename(outside / "theirs")  # for chmodded to restore
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = err_path.read_text()
    assert "Traceback" not in text, text
    assert only_run_steps(uri) == [1, 2, 3], text


def test_a_folder_unlistable_then_unsearchable_is_said_both_times(tmp_path: Path) -> None:
    """``---`` then ``r--``: each refusal said once (before, only the first was: the
    folder was keyed as said until listed again, whatever the reason)."""
    folder = tmp_path / "theirs"
    write_checkpoints(folder, [1])
    code = (
        "import logging, os, sys; from pathlib import Path\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s', stream=sys.stdout)\n"
        "from ddsmon.checkpoints import _listdir\n"
        "d = Path(sys.argv[1])\n"
        "for mode in (0, 0, 0o444, 0o444):\n"
        "    os.chmod(d, mode); assert _listdir(d) == []\n"
        "os.chmod(d, 0o755); print(_listdir(d))"
    )
    with chmodded(0o755, folder):
        out = _unprivileged_python(code, str(folder))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(f"cannot list {folder}") == 1, out.stdout
    assert out.stdout.count(f"cannot read the entries of {folder}") == 1, out.stdout
    assert out.stdout.rstrip().endswith("['step_000001.pt']"), out.stdout
