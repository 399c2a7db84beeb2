"""How many CPU threads a reading uses: the thread policy.

One concept: the threads of a reading. torch's intra-op threads (the matrix products,
the eigensolvers and the SVDs run on them), the OpenMP wait policy of that pool, and
torch's inter-op threads.

Why a policy
------------
ddsmon runs beside a training job. A parallel region of ``k`` threads ends at a
barrier; when other work holds a core, the region waits for its last thread's next
time slice (a few ms under Linux's scheduler) while the others wait at the barrier,
spinning under OpenMP's default wait policy and so spending their own slices on
nothing. Measured on 2 cores (a modular-addition checkpoint, 95 ms idle at 2 threads,
120 ms at 1): beside one busy torch process 374 ms at 2 threads and 240 ms at 1;
beside two, 0.87-1.29 s at 2 threads and 0.36-0.42 s at 1. Fewer threads than busy
cores cost little when the machine is idle (1.26x here) and save a multiple when it
is not, so the policy takes the cores that are free and rounds down towards 1.

Intra-op threads, per reading (:meth:`ThreadPolicy.threads_for_reading`)
-----------------------------------------------------------------------
``--threads N`` (``threads = N``) is used as given. Otherwise, at the start of each
reading (:func:`auto_threads`)::

    C      usable cores: len(os.sched_getaffinity(0)) (os.cpu_count() where absent),
           at most the cgroup v2 CPU quota ceil(quota / period) (/sys/fs/cgroup/cpu.max)
    B_avg  = max(0, L1 - S)   L1: the 1-minute load average (os.getloadavg);
                              S: this process's own share of it, its CPU seconds per
                              second averaged as the kernel averages the load
                              (exponentially, 60 s time constant: :class:`OwnShare`)
    B_now  = max(0, R - r)    R: runnable tasks now (the 4th field of /proc/loadavg,
                              median of 3 looks 1 ms apart); r: this process's own
                              runnable threads (/proc/self/task/*/stat in state R)
    B      = max(B_avg, B_now)               cores other work holds
    k      = clamp(floor(C - B + 1/2), 1, D)  D: torch's default thread count
                                             (OMP_NUM_THREADS, else one per core)

``B_now`` sees a trainer the moment it starts (the load average takes a minute to
follow); ``B_avg`` sees work that comes and goes between looks. A core counts as free
when at least half of it is. Where /proc is absent (macOS) ``B_now`` is 0; where the
load average is absent too, ``k = D``. Inside a container that shows the host's
/proc/loadavg, the host's load counts: the policy then leans towards 1 thread, the
cheap side. ``k`` is set for the reading's own thread (``torch.set_num_threads``; a
thread's OpenMP team size is its own, so the daemon's reading thread sets it itself)
and the previous count is restored afterwards.

The OpenMP wait policy
----------------------
Left as the user has it (``OMP_WAIT_POLICY``; GNU OpenMP reads it once, at ``import
torch``). ``PASSIVE`` (pool threads sleep at a barrier instead of spinning) was tried as
the default and measured against the default policy (``benchmarks/bench_contention.py``,
2 cores, BENCHMARKS.md section 8): it saves a reading that runs on 2 threads *beside*
busy trainers (0.29 s against 9.2 s), but costs one on an idle machine 4.5x (0.59 s
against 0.13 s), because every one of a reading's many small parallel regions then
wakes a sleeping thread. The policy above already gives a reading beside busy trainers
1 thread, where the wait policy does not matter (no barrier), so the default policy is
kept; a user who pins ``--threads`` above the free cores can set ``PASSIVE`` themselves.

The process's other threads
---------------------------
The daemon reads in a worker thread. Its main and loading threads keep to one torch
thread (:func:`keep_this_thread_single`, called by the CLI before any parallel region
and by the loading thread's start), so that the reading thread's OpenMP team is the
only one with more than one thread: see that function for the 4x it cost otherwise.

Inter-op threads
----------------
torch's inter-op pool runs only ``torch.jit.fork``/``at::launch`` work, which a reading
does not do (the pool is created lazily, so a reading starts none of its threads): the
policy leaves it alone (``torch.set_num_interop_threads(1)`` made no difference beyond
the noise in the benchmark).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ddsmon.errors import ConfigError

__all__ = (
    "Load",
    "OwnShare",
    "ThreadPolicy",
    "auto_threads",
    "check_threads",
    "default_threads",
    "keep_this_thread_single",
    "measure_load",
    "usable_cores",
)

log = logging.getLogger(__name__)

#: The kernel's 1-minute load average time constant, seconds.
LOAD_TIME_CONSTANT = 60.0
#: Looks at /proc/loadavg per reading, and the pause between two.
RUNNABLE_LOOKS = 3
RUNNABLE_PAUSE = 0.001


def check_threads(threads: object) -> int | None:
    """``threads`` as a thread count (None: the policy picks); ConfigError otherwise."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a whole number >= 1, got {threads!r}")
    return threads


# ------------------------------------------------------------------------ measuring


def usable_cores() -> int:
    """C: the cores this process may run on, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _runnable_now() -> int | None:
    """R: runnable tasks on the machine now (/proc/loadavg's ``running/total``)."""
    try:
        with open("/proc/loadavg") as fh:
            return int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _own_runnable() -> int:
    """r: this process's threads in state R (the calling thread among them)."""
    count = 0
    for path in glob.glob("/proc/self/task/*/stat"):
        try:
            with open(path) as fh:
                stat = fh.read()
        except OSError:  # the thread ended meanwhile
            continue
        if stat[stat.rindex(")") + 2 : stat.rindex(")") + 3] == "R":
            count += 1
    return max(1, count)


class OwnShare:
    """S: this process's own share of the 1-minute load average, in cores.

    Its CPU seconds per wall second over each interval between two calls, averaged as
    the kernel averages the load: ``S <- S e + rate (1 - e)``, ``e = exp(-dt / 60)``.
    It starts at this module's import with ``S = 0`` (what ran before, the interpreter
    starting, is short). CPU seconds undercount a thread that is runnable but waiting
    for a core, so under contention ``S`` is low and the policy errs towards fewer
    threads.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        cpu_seconds: Callable[[], float] | None = None,
    ) -> None:
        self._clock = clock
        self._cpu_seconds = cpu_seconds or _process_cpu
        self._lock = threading.Lock()
        self._wall = clock()
        self._cpu = self._cpu_seconds()
        self.share = 0.0

    def update(self) -> float:
        """S now (and the start of the next interval)."""
        with self._lock:
            wall, cpu = self._clock(), self._cpu_seconds()
            dt = wall - self._wall
            if dt > 0:
                decay = math.exp(-dt / LOAD_TIME_CONSTANT)
                rate = max(0.0, cpu - self._cpu) / dt
                self.share = self.share * decay + rate * (1.0 - decay)
                self._wall, self._cpu = wall, cpu
            return self.share


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system


_OWN_SHARE = OwnShare()


@dataclass(frozen=True)
class Load:
    """What the policy saw: cores, load average, own share, runnable tasks, the result."""

    cores: int
    load_average: float | None
    own_share: float
    runnable: float | None
    own_runnable: int

    @property
    def busy_average(self) -> float:
        """B_avg = max(0, L1 - S)."""
        return 0.0 if self.load_average is None else max(0.0, self.load_average - self.own_share)

    @property
    def busy_now(self) -> float:
        """B_now = max(0, R - r)."""
        return 0.0 if self.runnable is None else max(0.0, self.runnable - self.own_runnable)

    @property
    def busy(self) -> float:
        """B = max(B_avg, B_now): cores other work holds."""
        return max(self.busy_average, self.busy_now)


def measure_load(own: OwnShare | None = None) -> Load:
    """The machine's load now, as :func:`auto_threads` reads it."""
    try:
        load_average: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load_average = None
    looks: list[int] = []
    for i in range(RUNNABLE_LOOKS):
        if i:
            time.sleep(RUNNABLE_PAUSE)
        now = _runnable_now()
        if now is None:
            break
        looks.append(now)
    return Load(
        cores=usable_cores(),
        load_average=load_average,
        own_share=(own or _OWN_SHARE).update(),
        runnable=statistics.median(looks) if looks else None,
        own_runnable=_own_runnable() if looks else 1,
    )


def auto_threads(cores: int, busy: float, default: int) -> int:
    """k = clamp(floor(C - B + 1/2), 1, D): the free cores, a core free when half of it
    is, at least 1 and at most torch's default ``D``."""
    free = math.floor(cores - busy + 0.5)
    return max(1, min(default, free))


# ------------------------------------------------------------------------ applying

_DEFAULT_THREADS: list[int] = []


def default_threads() -> int:
    """D: torch's intra-op thread count of this process before ddsmon changed any
    (``OMP_NUM_THREADS``, else one per core), read once."""
    if not _DEFAULT_THREADS:
        import torch

        _DEFAULT_THREADS.append(torch.get_num_threads())
    return _DEFAULT_THREADS[0]


def keep_this_thread_single() -> None:
    """One torch thread for the calling thread: the daemon's main and loading threads,
    so that the reading thread's OpenMP team is the only one in the process with more
    than one thread.

    Why: GNU OpenMP keeps a pool of threads for every thread that has run a parallel
    region, and once it manages more threads than there are cores it all but stops
    spinning at barriers (its throttled spin count), so every one of a reading's many
    small parallel regions then waits for a sleeping thread to wake. Measured on 2
    cores: a 2-thread reading in a worker thread took 0.45-0.60 s once the main thread
    had run one 2-thread region, and 0.10 s when it had not (0.12 s on 1 thread);
    ``ddsmon scan --threads 2`` read at 0.44 s a checkpoint against 0.12 s at
    ``--threads 1``. It must run before this thread's first parallel region: a pool,
    once made, stays.
    """
    import torch

    default_threads()
    torch.set_num_threads(1)


@dataclass(frozen=True)
class ThreadPolicy:
    """The threads of each reading: ``threads`` (``--threads``) when given, else
    :func:`auto_threads` of the load measured at the start of the reading.

    default: torch's intra-op thread count when the policy was made (``D``).
    """

    threads: int | None
    default: int

    @classmethod
    def from_setting(cls, threads: int | None) -> ThreadPolicy:
        """The policy of the ``threads`` setting. An explicit count, like an automatic
        one, is set by :meth:`reading` in the thread that reads (not process-wide: the
        daemon keeps its other threads to one, :func:`keep_this_thread_single`)."""
        return cls(threads=check_threads(threads), default=default_threads())

    @property
    def description(self) -> str:
        """The policy in words, as recorded in the run's params."""
        if self.threads is not None:
            return f"fixed: {self.threads} (--threads)"
        return f"auto: per reading, the free cores, 1 to {self.default}"

    def threads_for_reading(self) -> tuple[int, Load | None]:
        """The thread count for a reading starting now, and the load it was chosen by
        (None when given)."""
        if self.threads is not None:
            return self.threads, None
        load = measure_load()
        return auto_threads(load.cores, load.busy, self.default), load

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """Run a reading on :meth:`threads_for_reading` threads (this thread's torch
        intra-op count); an automatic count is undone afterwards, a given one stays."""
        import torch

        threads, load = self.threads_for_reading()
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        if load is not None:
            log.debug(
                "reading on %d torch thread(s): %d cores, load %s (own %.2f), %s runnable (own %d)",
                threads,
                load.cores,
                "?" if load.load_average is None else f"{load.load_average:.2f}",
                load.own_share,
                "?" if load.runnable is None else f"{load.runnable:g}",
                load.own_runnable,
            )
        try:
            yield threads
        finally:
            if self.threads is None and torch.get_num_threads() != before:
                torch.set_num_threads(before)
