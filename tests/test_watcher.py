"""The directory watcher on a real filesystem with real observers (inotify and polling).

No fixed sleeps for results: every wait polls a condition against a deadline. Pauses
between chunks of a slow writer are part of the scenario (shorter than ``quiet``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ddsmon.checkpoints import CheckpointRef, check_complete, fingerprint
from ddsmon.errors import ConfigError
from ddsmon.watcher import CheckpointWatcher

QUIET = 0.2
POLL = 0.1
DEADLINE = 15.0

MODES = [
    pytest.param(
        None,
        id="inotify",
        marks=pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux-only"),
    ),
    pytest.param(POLL, id="polling"),
]


def torch_bytes(n: int = 48, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"w": torch.randn(n, n, generator=gen), "step": seed}, buf)
    return buf.getvalue()


class Collector:
    """Records hand-overs with what the file looked like at that moment."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ready: list[CheckpointRef] = []
        self.seen: list[tuple[str | None, tuple[int, int]]] = []
        self.vanished: list[Path] = []
        self.rejected: list[tuple[Path, str]] = []

    def on_ready(self, ref: CheckpointRef) -> None:
        state = (check_complete(ref), fingerprint(ref))
        with self.lock:
            self.ready.append(ref)
            self.seen.append(state)

    def on_vanished(self, path: Path) -> None:
        with self.lock:
            self.vanished.append(path)

    def on_rejected(self, path: Path, reason: str) -> None:
        with self.lock:
            self.rejected.append((path, reason))

    def rejections(self) -> Counter[Path]:
        with self.lock:
            return Counter(path for path, _ in self.rejected)

    def counts(self) -> Counter[Path]:
        with self.lock:
            return Counter(r.path for r in self.ready)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def settle(watcher: CheckpointWatcher) -> None:
    """Wait until the watcher has had nothing pending for long enough that any event
    still on its way (a late poll, a late close) would have been seen and handled."""
    window = 2 * QUIET + 2 * (watcher.poll or 0.0) + 0.1
    since = [time.monotonic()]

    def idle_long_enough() -> bool:
        if watcher.pending():
            since[0] = time.monotonic()
        return time.monotonic() - since[0] >= window

    wait_until(idle_long_enough, "the watcher to settle")


@pytest.fixture(params=MODES)
def watch(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[CheckpointWatcher, Collector]]:
    collector = Collector()
    watcher = CheckpointWatcher(
        tmp_path,
        collector.on_ready,
        poll=request.param,
        quiet=QUIET,
        on_vanished=collector.on_vanished,
        on_rejected=collector.on_rejected,
    )
    with watcher:
        yield watcher, collector
    assert not watcher.running


# --------------------------------------------------------------------------- hand-overs


def test_chunked_slow_write_is_handed_over_once_complete(watch, tmp_path: Path) -> None:
    watcher, got = watch
    data = torch_bytes()
    path = tmp_path / "step_00100.pt"
    chunks = [data[i : i + len(data) // 5 + 1] for i in range(0, len(data), len(data) // 5 + 1)]
    assert len(chunks) >= 5
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            time.sleep(QUIET * 0.4)  # the writer pauses, but for less than the quiet period
    wait_until(lambda: got.counts()[path] >= 1, "the checkpoint")
    settle(watcher)
    assert got.counts() == {path: 1}
    assert got.ready[0].kind == "torch"
    assert got.seen == [(None, fingerprint(got.ready[0]))]  # complete when handed over
    assert got.vanished == []
    assert got.rejected == []  # paused mid-write is not "rejected"


@pytest.mark.parametrize("poll", MODES)
def test_complete_but_still_changing_file_waits_for_quiet(tmp_path: Path, poll) -> None:
    """Every version is format-complete, so only the quiet period keeps the watcher
    from handing over a file the writer is still rewriting in place (no close yet)."""
    got = Collector()
    quiet = 0.5
    versions = [torch_bytes(seed=s) for s in range(5)]
    assert len({len(v) for v in versions}) == 1
    path = tmp_path / "step_50.pt"
    with CheckpointWatcher(tmp_path, got.on_ready, poll=poll, quiet=quiet) as watcher:
        with open(path, "wb") as f:
            for version in versions:
                f.seek(0)
                f.write(version)
                f.flush()
                os.utime(f.fileno())  # a new mtime even on a coarse-clock filesystem
                time.sleep(quiet * 0.25)
            final = fingerprint(CheckpointRef(path, "torch"))
            wait_until(lambda: got.counts()[path] >= 1, "the settled file")
        settle(watcher)
    assert got.counts() == {path: 1}
    assert got.seen == [(None, final)]


def test_atomic_rename_is_handed_over_once_under_the_final_name(watch, tmp_path: Path) -> None:
    watcher, got = watch
    tmp = tmp_path / "epoch=1-step=200.ckpt.tmp"
    tmp.write_bytes(torch_bytes())
    final = tmp_path / "epoch=1-step=200.ckpt"
    os.rename(tmp, final)
    wait_until(lambda: got.counts()[final] >= 1, "the renamed checkpoint")
    settle(watcher)
    assert got.counts() == {final: 1}
    assert got.ready[0] == CheckpointRef(final, "lightning")


def test_truncated_file_waits_until_rewritten_complete(watch, tmp_path: Path, caplog) -> None:
    watcher, got = watch
    caplog.set_level(logging.DEBUG, logger="ddsmon.watcher")
    data = torch_bytes(seed=1)
    path = tmp_path / "step_300.pt"
    path.write_bytes(data[: len(data) // 2])
    wait_until(lambda: watcher.pending() > 0, "the truncated file to be noticed")
    settle(watcher)
    assert got.ready == []
    assert any(
        "step_300.pt" in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records
    ), "the reason a file is not handed over is logged at debug level"
    assert got.rejections() == {path: 1}
    path.write_bytes(data)
    wait_until(lambda: got.counts()[path] >= 1, "the rewritten checkpoint")
    settle(watcher)
    assert got.counts() == {path: 1}
    assert got.seen[0][0] is None


def test_truncated_safetensors_then_fixed(watch, tmp_path: Path) -> None:
    watcher, got = watch
    src = tmp_path / ".src" / "x.safetensors"  # inside a dot-directory: never handed over
    src.parent.mkdir()
    save_file({"w": torch.randn(16, 16)}, str(src))
    data = src.read_bytes()
    path = tmp_path / "model_step_5.safetensors"
    path.write_bytes(data[:-7])
    wait_until(lambda: watcher.pending() > 0, "the truncated file to be noticed")
    settle(watcher)
    assert got.ready == []
    path.write_bytes(data)
    wait_until(lambda: got.counts()[path] >= 1, "the fixed safetensors file")
    settle(watcher)
    assert got.counts() == {path: 1}


def test_rewritten_checkpoint_is_handed_over_again(watch, tmp_path: Path) -> None:
    watcher, got = watch
    path = tmp_path / "step_7.pt"
    path.write_bytes(torch_bytes(seed=2))
    wait_until(lambda: got.counts()[path] == 1, "the first version")
    settle(watcher)
    path.write_bytes(torch_bytes(n=40, seed=3))
    wait_until(lambda: got.counts()[path] == 2, "the second version")
    settle(watcher)
    assert got.counts() == {path: 2}
    assert got.seen[0][1] != got.seen[1][1]


def test_deleted_before_ready_is_dropped_silently(watch, tmp_path: Path, caplog) -> None:
    watcher, got = watch
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "step_400.pt"
    path.write_bytes(torch_bytes()[:500])  # incomplete: it stays pending until quiet
    wait_until(lambda: watcher.pending() > 0, "the partial file to be noticed")
    path.unlink()
    wait_until(lambda: path in got.vanished, "the vanished report")
    settle(watcher)
    assert got.ready == []
    assert got.vanished == [path]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_hf_folder_is_handed_over_when_trainer_state_lands(watch, tmp_path: Path) -> None:
    watcher, got = watch
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    save_file({"w": torch.randn(8, 8)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    (folder / "optimizer.pt").write_bytes(torch_bytes())
    wait_until(lambda: watcher.pending() > 0, "the folder to be noticed")
    settle(watcher)
    assert got.ready == []  # no trainer_state.json yet
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    wait_until(lambda: got.counts()[folder] >= 1, "the HF folder")
    settle(watcher)
    assert got.counts() == {folder: 1}  # and none of the files inside on their own
    assert got.ready[0] == CheckpointRef(folder, "hf")
    assert got.seen[0][0] is None


def test_hf_folder_renamed_into_place_and_rotated_away(watch, tmp_path: Path) -> None:
    watcher, got = watch
    staging = tmp_path / "tmp-checkpoint-10"
    staging.mkdir()
    save_file({"w": torch.randn(4, 4)}, str(staging / "model.safetensors"))
    (staging / "trainer_state.json").write_text("{}")
    folder = tmp_path / "checkpoint-10"
    os.rename(staging, folder)
    wait_until(lambda: got.counts()[folder] >= 1, "the renamed HF folder")
    for name in os.listdir(folder):  # the Trainer deleting an old checkpoint
        os.unlink(folder / name)
    folder.rmdir()
    settle(watcher)
    assert got.counts() == {folder: 1}
    assert got.vanished == []  # already handed over: nothing to report


def test_dcp_folder_is_handed_over_when_metadata_lands(watch, tmp_path: Path) -> None:
    watcher, got = watch
    folder = tmp_path / "step_600"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(os.urandom(4096))
    wait_until(lambda: watcher.pending() == 0, "nothing pending")
    (folder / ".metadata").write_bytes(b"\x80\x04metadata")
    wait_until(lambda: got.counts()[folder] >= 1, "the DCP folder")
    settle(watcher)
    assert got.counts() == {folder: 1}
    assert got.ready[0].kind == "dcp"


def test_burst_of_twenty_each_handed_over_exactly_once(watch, tmp_path: Path) -> None:
    watcher, got = watch
    expected = set()
    for i in range(20):
        path = tmp_path / f"step_{i:05d}.pt"
        torch.save({"w": torch.randn(32, 32), "step": i}, path)
        expected.add(path)
    # noise that must never be handed over
    (tmp_path / ".ddsmon").mkdir()
    (tmp_path / ".ddsmon" / "step_99999.pt").write_bytes(torch_bytes())
    (tmp_path / "step_88888.pt.tmp").write_bytes(torch_bytes())
    (tmp_path / "notes.txt").write_text("hello")
    wait_until(lambda: set(got.counts()) >= expected, "all twenty checkpoints")
    settle(watcher)
    assert got.counts() == dict.fromkeys(expected, 1)
    assert all(reason is None for reason, _ in got.seen)


def test_subfolder_one_level_down_is_watched(watch, tmp_path: Path) -> None:
    watcher, got = watch
    (tmp_path / "run1" / "deeper").mkdir(parents=True)
    shallow = tmp_path / "run1" / "step_1.pt"
    shallow.write_bytes(torch_bytes())
    (tmp_path / "run1" / "deeper" / "step_2.pt").write_bytes(torch_bytes())
    wait_until(lambda: got.counts()[shallow] >= 1, "the checkpoint in a subfolder")
    settle(watcher)
    assert got.counts() == {shallow: 1}


@pytest.mark.skipif(sys.platform != "linux", reason="close-after-write is inotify's")
def test_close_write_and_rename_are_the_fast_path(tmp_path: Path) -> None:
    got = Collector()
    quiet = 30.0  # far longer than the test may take: only the fast path can hand over
    with CheckpointWatcher(tmp_path, got.on_ready, quiet=quiet) as watcher:
        start = time.monotonic()
        closed = tmp_path / "step_1.pt"
        closed.write_bytes(torch_bytes())
        tmp = tmp_path / "step_2.pt.partial"
        tmp.write_bytes(torch_bytes(seed=5))
        renamed = tmp_path / "step_2.pt"
        os.rename(tmp, renamed)
        wait_until(lambda: set(got.counts()) == {closed, renamed}, "both checkpoints", 10.0)
        assert time.monotonic() - start < quiet
        # a closed but incomplete file waits for the quiet period instead
        partial = tmp_path / "step_3.pt"
        partial.write_bytes(torch_bytes()[:300])
        wait_until(lambda: watcher.pending() == 1, "the partial file pending")
        assert partial not in got.counts()


# --------------------------------------------------------------------------- lifecycle


def test_lifecycle_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing"):
        CheckpointWatcher(tmp_path / "missing", lambda ref: None).start()
    with pytest.raises(ConfigError, match="poll"):
        CheckpointWatcher(tmp_path, lambda ref: None, poll=0)
    with pytest.raises(ConfigError, match="quiet"):
        CheckpointWatcher(tmp_path, lambda ref: None, quiet=-1)
    watcher = CheckpointWatcher(tmp_path, lambda ref: None, poll=POLL)
    watcher.stop()  # before start: harmless
    watcher = CheckpointWatcher(tmp_path, lambda ref: None)
    watcher.start()
    watcher.start()  # idempotent while running
    assert watcher.running
    watcher.stop()
    watcher.stop()
    assert not watcher.running
    with pytest.raises(RuntimeError, match="restarted"):
        watcher.start()
    threads = {t.name for t in threading.enumerate()}
    assert "ddsmon-watcher" not in threads


def test_failing_callback_does_not_stop_the_watcher(tmp_path: Path, caplog) -> None:
    got = Collector()

    def on_ready(ref: CheckpointRef) -> None:
        got.on_ready(ref)
        if ref.path.name == "step_1.pt":
            raise RuntimeError("consumer bug")

    with CheckpointWatcher(tmp_path, on_ready, poll=POLL, quiet=QUIET):
        (tmp_path / "step_1.pt").write_bytes(torch_bytes())
        wait_until(lambda: got.counts()[tmp_path / "step_1.pt"] == 1, "the first checkpoint")
        (tmp_path / "step_2.pt").write_bytes(torch_bytes(seed=9))
        wait_until(lambda: got.counts()[tmp_path / "step_2.pt"] == 1, "the second checkpoint")
    assert any("consumer bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_relative_directory_gives_paths_as_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    got = Collector()
    with CheckpointWatcher(Path("ckpts"), got.on_ready, poll=POLL, quiet=QUIET):
        (tmp_path / "ckpts" / "step_1.pt").write_bytes(torch_bytes())
        wait_until(lambda: len(got.ready) == 1, "the checkpoint")
    assert got.ready[0].path == Path("ckpts") / "step_1.pt"


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"poll": float("inf")}, "--poll"),
        ({"poll": float("-inf")}, "--poll"),
        ({"poll": float("nan")}, "--poll"),
        ({"poll": 0}, "--poll"),
        ({"poll": -1.0}, "--poll"),
        ({"poll": 1e12}, "--poll"),
        ({"poll": "fast"}, "--poll"),
        ({"poll": True}, "--poll"),
        ({"quiet": float("inf")}, "--quiet"),
        ({"quiet": float("nan")}, "--quiet"),
        ({"quiet": -0.5}, "--quiet"),
        ({"quiet": 1e300}, "--quiet"),
        ({"quiet": None}, "--quiet"),
    ],
)
def test_non_finite_or_non_positive_poll_and_quiet_are_config_errors(
    tmp_path: Path, kwargs: dict, option: str
) -> None:
    with pytest.raises(ConfigError) as info:
        CheckpointWatcher(tmp_path, lambda ref: None, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{option}: ") and "finite number of seconds" in message
    assert repr(next(iter(kwargs.values()))) in message or "fast" in message


def test_finite_poll_and_zero_quiet_are_accepted(tmp_path: Path) -> None:
    got = Collector()
    with CheckpointWatcher(tmp_path, got.on_ready, poll=1, quiet=0) as watcher:
        assert watcher.poll == 1.0 and watcher.quiet == 0.0
        (tmp_path / "step_1.pt").write_bytes(torch_bytes())
        wait_until(lambda: len(got.ready) == 1, "the checkpoint")


# --------------------------------------------------------------------------- rejections


def lying_safetensors() -> bytes:
    """A safetensors header that promises 4000 bytes of data; 16 follow."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + os.urandom(16)


def test_settled_bad_files_are_rejected_once_with_path_and_reason(watch, tmp_path: Path) -> None:
    """Zero-byte, truncated, random-byte and lying-header files written live are each
    reported once, with the reason; a new bad version again; a fixed one handed over."""
    watcher, got = watch
    good = torch_bytes(seed=4)
    files = {
        tmp_path / "step_1.pt": (b"", "empty file"),
        tmp_path / "step_2.pt": (good[: len(good) // 3], "zip"),
        tmp_path / "step_3.pt": (os.urandom(3000), "not a torch file"),
        tmp_path / "step_4.safetensors": (lying_safetensors(), "expected 4"),
    }
    for path, (data, _) in files.items():
        path.write_bytes(data)
    wait_until(lambda: set(got.rejections()) == set(files), "every bad file reported")
    settle(watcher)
    assert got.rejections() == dict.fromkeys(files, 1)  # once each, not per poll or event
    for path, reason in got.rejected:
        assert files[path][1] in reason, (path, reason)
    assert got.ready == []
    truncated = tmp_path / "step_2.pt"
    truncated.write_bytes(good[: len(good) // 2])  # changed, still bad: reported again
    wait_until(lambda: got.rejections()[truncated] == 2, "the new bad version")
    fixed = tmp_path / "step_3.pt"
    fixed.write_bytes(good)
    wait_until(lambda: got.counts()[fixed] == 1, "the fixed file")
    settle(watcher)
    assert got.rejections() == {**dict.fromkeys(files, 1), truncated: 2}
    assert got.counts() == {fixed: 1}
    assert got.vanished == []


def test_files_still_being_written_are_not_rejected(watch, tmp_path: Path) -> None:
    """A writer that pauses (shorter than quiet) and one that closes after every chunk
    (inotify close-write on an incomplete file) are waited for, never rejected."""
    watcher, got = watch
    data = torch_bytes(seed=6)
    step = len(data) // 6 + 1
    paused = tmp_path / "step_10.pt"
    reopened = tmp_path / "step_11.pt"
    with open(paused, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            with open(reopened, "ab") as g:  # opened, written, closed per chunk
                g.write(data[i : i + step])
            time.sleep(QUIET * 0.4)
    wait_until(lambda: set(got.counts()) == {paused, reopened}, "both checkpoints")
    settle(watcher)
    assert got.counts() == {paused: 1, reopened: 1}
    assert got.rejected == []


def test_folders_are_rejected_only_once_their_last_file_is_there(watch, tmp_path: Path) -> None:
    watcher, got = watch
    waiting = tmp_path / "checkpoint-1"  # no trainer_state.json yet: still being written
    waiting.mkdir()
    (waiting / "model.safetensors").write_bytes(lying_safetensors())
    dcp = tmp_path / "step_2"  # dcp shards without .metadata: still being written
    dcp.mkdir()
    (dcp / "__0_0.distcp").write_bytes(os.urandom(512))
    broken = tmp_path / "checkpoint-3"  # trainer_state.json there, weights truncated
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(lying_safetensors())
    (broken / "trainer_state.json").write_text("{}")
    wait_until(lambda: broken in got.rejections(), "the finished but broken folder")
    settle(watcher)
    assert got.rejections() == {broken: 1}
    assert "model.safetensors" in got.rejected[0][1]
    assert got.ready == []


@pytest.mark.parametrize("poll", MODES)
def test_default_report_is_one_warning_line_with_the_name_escaped(
    tmp_path: Path, poll, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="ddsmon.watcher")
    evil = tmp_path / "step_9\nERROR ddsmon: forged.pt"
    with CheckpointWatcher(tmp_path, lambda ref: None, poll=poll, quiet=QUIET) as watcher:
        evil.write_bytes(b"")
        wait_until(lambda: any(r.levelno == logging.WARNING for r in caplog.records), "the warning")
        settle(watcher)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert "\n" not in line
    assert "step_9\\nERROR ddsmon: forged.pt" in line and "empty file" in line
    assert str(tmp_path) in line


def test_failing_on_rejected_does_not_stop_the_watcher(tmp_path: Path, caplog) -> None:
    got = Collector()

    def on_rejected(path: Path, reason: str) -> None:
        raise RuntimeError("sink bug")

    with CheckpointWatcher(tmp_path, got.on_ready, poll=POLL, quiet=QUIET, on_rejected=on_rejected):
        (tmp_path / "step_1.pt").write_bytes(b"")
        wait_until(lambda: any(r.exc_info for r in caplog.records), "the logged failure")
        (tmp_path / "step_2.pt").write_bytes(torch_bytes())
        wait_until(lambda: len(got.ready) == 1, "the next checkpoint")


def test_a_subfolder_s_files_written_before_its_watch_are_handed_over(tmp_path: Path) -> None:
    """A folder's creation event with its file already inside and no event of the file's
    own (written before the observer's watch on the folder was in place, a race a loaded
    CI machine lost): the watcher looks inside the new folder itself."""
    from watchdog.events import DirCreatedEvent

    (tmp_path / "run1").mkdir()
    inside = tmp_path / "run1" / "step_1.pt"
    inside.write_bytes(torch_bytes())  # before the watch: no event will name it
    got = Collector()
    with CheckpointWatcher(tmp_path, got.on_ready, quiet=QUIET) as watcher:
        watcher._on_event(DirCreatedEvent(str(tmp_path / "run1")))
        wait_until(lambda: got.counts().get(inside, 0) >= 1, "the file inside the new folder")
        settle(watcher)
    assert got.counts() == {inside: 1}


@pytest.mark.parametrize("poll", MODES)
def test_excluded_checkpoints_are_neither_handed_over_nor_rejected(
    tmp_path: Path, poll: float | None
) -> None:
    got = Collector()
    watcher = CheckpointWatcher(tmp_path, got.on_ready, poll=poll, quiet=QUIET,
                                on_rejected=got.on_rejected, exclude=("ema_*", "old/*"))  # fmt: skip
    with watcher:
        kept = tmp_path / "model_step10.pt"
        (tmp_path / "ema_step10.pt").write_bytes(torch_bytes())
        (tmp_path / "ema_step20.pt").write_bytes(b"not finished")  # would be rejected
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "step_5.pt").write_bytes(torch_bytes())
        kept.write_bytes(torch_bytes())
        wait_until(lambda: got.counts()[kept] >= 1, "the checkpoint not excluded")
        settle(watcher)
    assert got.counts() == {kept: 1}
    assert got.rejected == []


@pytest.mark.parametrize("poll", MODES)
def test_a_directory_given_as_a_symbolic_link_is_watched(tmp_path: Path, poll) -> None:
    """``ckpts -> /scratch/run1``: watchdog's inotify does not follow a link, so under
    native events nothing written there was ever seen; the watch is on the link's target,
    the paths handed over are below the link as given."""
    real = tmp_path / "scratch" / "run1"
    real.mkdir(parents=True)
    link = tmp_path / "ckpts"
    link.symlink_to(real)
    got = Collector()
    with CheckpointWatcher(link, got.on_ready, poll=poll, quiet=QUIET) as watcher:
        path = link / "step_1.pt"
        path.write_bytes(torch_bytes())
        wait_until(lambda: got.counts()[path] >= 1, "the checkpoint written through the link")
        settle(watcher)
    assert got.counts() == {path: 1}
