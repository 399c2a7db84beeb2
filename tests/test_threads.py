"""The thread policy (ddsmon.threads): the free-core rule, what it measures (real busy
processes, this process's own threads and CPU share), an explicit count winning, the
per-reading count undone afterwards.
No timings are asserted."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ddsmon.config import ReadSettings
from ddsmon.errors import ConfigError
from ddsmon.reader import Reader
from ddsmon.threads import (
    Load,
    OwnShare,
    ThreadPolicy,
    auto_threads,
    measure_load,
    usable_cores,
)

REPO = Path(__file__).resolve().parents[1]
LINUX_PROC = Path("/proc/loadavg").exists()


# ------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    ("cores", "busy", "default", "expected"),
    [
        (2, 0.0, 2, 2),  # idle: torch's default
        (2, 0.49, 2, 2),  # less than half a core busy: still free
        (2, 0.5, 2, 2),  # exactly half: free (floor(1.5 + .5) = 2)
        (2, 0.51, 2, 1),
        (2, 2.0, 2, 1),  # one trainer on both cores
        (2, 4.0, 2, 1),  # two trainers: never below 1
        (16, 3.2, 16, 13),  # floor(12.8 + .5)
        (16, 0.0, 8, 8),  # never above torch's default (OMP_NUM_THREADS=8)
        (16, 15.7, 16, 1),
        (1, 0.0, 1, 1),
    ],
)
def test_auto_threads_is_the_free_cores_rounded_and_clamped(
    cores: int, busy: float, default: int, expected: int
) -> None:
    assert auto_threads(cores, busy, default) == expected


@given(
    st.integers(1, 256),
    st.floats(0, 512, allow_nan=False),
    st.floats(0, 512, allow_nan=False),
    st.integers(1, 256),
)
def test_auto_threads_is_bounded_and_falls_as_load_rises(
    cores: int, busy: float, more: float, default: int
) -> None:
    k = auto_threads(cores, busy, default)
    assert 1 <= k <= default
    assert auto_threads(cores, busy + more, default) <= k
    # the plain definition: the count of whole cores left, a half counting as whole
    free = sum(1 for core in range(cores) if core + 0.5 <= cores - busy)
    assert k == max(1, min(default, free))


def test_busy_is_the_larger_of_the_average_less_own_share_and_the_runnable_now() -> None:
    load = Load(cores=4, load_average=3.0, own_share=1.25, runnable=3, own_runnable=1)
    assert load.busy_average == pytest.approx(1.75)
    assert load.busy_now == 2 and load.busy == 2
    calm_now = Load(cores=4, load_average=3.0, own_share=0.5, runnable=1, own_runnable=1)
    assert calm_now.busy == pytest.approx(2.5)  # work that comes and goes: the average
    nothing = Load(cores=4, load_average=None, own_share=0.0, runnable=None, own_runnable=1)
    assert nothing.busy == 0.0
    mine = Load(cores=4, load_average=0.5, own_share=2.0, runnable=2, own_runnable=3)
    assert mine.busy == 0.0  # only ddsmon's own work: nothing else is busy


def test_own_share_follows_the_kernels_load_average_formula() -> None:
    """Constant CPU rate r for t seconds from S = 0: S = r (1 - exp(-t / 60)), however
    the interval is split (the kernel updates every 5 s; the closed form is the same)."""
    now, cpu = [0.0], [0.0]
    share = OwnShare(clock=lambda: now[0], cpu_seconds=lambda: cpu[0])
    for _ in range(12):  # 60 s in 5 s steps at 2 CPU-seconds per second
        now[0] += 5.0
        cpu[0] += 10.0
        share.update()
    assert share.share == pytest.approx(2.0 * (1 - math.exp(-1.0)), rel=1e-12)
    now[0] += 120.0  # two idle minutes: decays by exp(-2)
    assert share.update() == pytest.approx(2.0 * (1 - math.exp(-1.0)) * math.exp(-2.0), rel=1e-12)
    assert share.update() == share.share  # no time passed: unchanged


# ------------------------------------------------------------------------ what it measures


def test_usable_cores_are_the_affinity_mask() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = Path("/sys/fs/cgroup/cpu.max")
    if quota.exists() and quota.read_text().split()[0] != "max":
        pytest.skip("a cgroup CPU quota caps the cores here")
    assert usable_cores() == expected


@pytest.fixture
def busy_processes() -> Iterator[int]:
    """One spinning Python process per usable core (real processes, not threads)."""
    cores = usable_cores()
    code = "import sys\nprint('spinning', flush=True)\nwhile True:\n    pass\n"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(cores)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "spinning\n"
        yield cores
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not LINUX_PROC, reason="/proc/loadavg is Linux's")
def test_measure_load_sees_busy_processes_at_once(busy_processes: int) -> None:
    load = measure_load()
    assert load.runnable is not None and load.own_runnable >= 1
    assert load.busy_now >= busy_processes  # every spinning process is runnable
    assert auto_threads(load.cores, load.busy, torch.get_num_threads()) == 1


def test_own_share_counts_this_process_cpu() -> None:
    share = OwnShare()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert share.update() > 0.0


# ------------------------------------------------------------------------ applying


@pytest.fixture
def restore_threads() -> Iterator[int]:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_an_explicit_count_is_applied_by_the_reading_and_wins_over_the_load(
    restore_threads: int, busy_processes: int
) -> None:
    explicit = restore_threads + 1  # not the default, whatever the machine
    policy = ThreadPolicy.from_setting(explicit)
    assert torch.get_num_threads() == restore_threads  # not process-wide at construction
    with policy.reading() as threads:
        assert threads == explicit == torch.get_num_threads()  # busy cores or not
    assert torch.get_num_threads() == explicit
    assert policy.description == f"fixed: {explicit} (--threads)"


@pytest.mark.skipif(not LINUX_PROC, reason="/proc/loadavg is Linux's")
def test_the_automatic_count_falls_to_one_when_every_core_is_busy_and_is_undone(
    restore_threads: int, busy_processes: int
) -> None:
    policy = ThreadPolicy.from_setting(None)
    assert torch.get_num_threads() == restore_threads  # nothing applied at construction
    with policy.reading() as threads:
        assert threads == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == restore_threads


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_a_bad_count_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="threads must be a whole number >= 1"):
        ThreadPolicy.from_setting(bad)  # type: ignore[arg-type]


def test_reader_reads_on_the_policy_threads_and_records_them(restore_threads: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp, mlp_probe

    explicit = restore_threads + 1
    reader = Reader.from_parts(ReadSettings(threads=explicit), factory=mlp, probe=mlp_probe())
    reader.read(mlp())
    assert reader.last_threads == explicit
    params = reader.params()
    assert params["torch_threads"] == str(explicit)
    assert params["threads_policy"] == f"fixed: {explicit} (--threads)"
    auto = Reader.from_parts(ReadSettings(), factory=mlp, probe=mlp_probe())
    auto.read(mlp())
    assert auto.last_threads is not None and 1 <= auto.last_threads <= auto.threads.default
    assert auto.params()["threads_policy"].startswith("auto: per reading")
    assert 1 <= int(auto.params()["torch_threads"]) <= auto.threads.default


#: In a fresh process: the daemon's way (main thread kept to one torch thread before any
#: parallel region, the reading in a worker thread on 2) against a main thread that ran a
#: 2-thread region first. Prints how many OpenMP pool threads the process holds: GNU
#: OpenMP keeps one pool per thread that ran a parallel region.
_POOLS = """
import sys, threading, torch
from ddsmon.threads import keep_this_thread_single
if sys.argv[1] == "kept":
    keep_this_thread_single()
a = torch.randn(400, 400, dtype=torch.float64)
(a @ a).sum()  # the main thread's own torch work (the daemon: MLflow, digests, events)
def read():
    torch.set_num_threads(2)
    for _ in range(3):
        torch.linalg.eigvalsh(a @ a.T)
worker = threading.Thread(target=read)
worker.start()
worker.join()
print(threading.active_count(), len(__import__("os").listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not LINUX_PROC, reason="reads /proc/self/task")
def test_the_main_thread_kept_single_holds_no_openmp_pool() -> None:
    """keep_this_thread_single before any parallel region: the main thread makes no pool,
    so the reading thread's team is the process's only one (a second pool made GNU
    OpenMP throttle its spinning: 2-thread readings 4x slower, see its docstring)."""
    if "OpenMP" not in torch.__config__.parallel_info() or usable_cores() < 2:
        pytest.skip("needs torch's OpenMP backend and two cores")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    counts = {}
    for mode in ("kept", "not kept"):
        out = subprocess.run(
            [sys.executable, "-c", _POOLS, mode], capture_output=True, text=True, env=env,
            timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        python_threads, os_threads = map(int, out.stdout.split())
        counts[mode] = os_threads - python_threads  # threads Python did not start
    assert counts["kept"] < counts["not kept"], counts  # the main thread's pool is not there
