"""How many CPU threads torch computes with: ``--cpu-threads N``, or 0 = auto.

Threads beyond the cores that other work leaves free only lose: a parallel region waits for its slowest thread, and
a thread whose core another process holds stalls every region. Measured on a 2-core machine (digits teacher, DMD2,
batch 128, 10 updates, seconds per update; ``benchmarks/cpu_threads.py``): idle, 1 thread 0.62-0.84, 2 threads
0.37-0.51, auto (2) 0.44-0.52; one busy process beside it, 1 thread 0.70-0.73, 2 threads 1.6-4.4, auto (1) 0.76;
two busy processes, 1 thread 1.05, 2 threads 1.86, auto (1) 0.90; other engineers' load of about 4, 1 thread
0.67-1.08, 2 threads 2.1-6.4, auto (1) 1.06. torch's default is one thread per core. The weights are the same at
every count.

auto: ``OMP_NUM_THREADS`` when set (launchers such as torchrun set it per process); else the cores this process may
use (affinity and cgroup quota, shared among the processes of this machine), less the cores other work keeps busy
(a core counts as busy when other processes use more than 30 % of it, measured from ``/proc/stat`` over 0.3 s),
at least 1. A one-process run follows the load: at each log point the other processes' CPU use since the
last one is measured again and the count adjusted. Torch-free (the trainer applies the counts).
"""

from __future__ import annotations

import math
import os
import time

SAMPLE_SECONDS = 0.3  # the first measurement of other work
BUSY_SHARE = 0.3  # a core counts as busy when other work uses more than this share of it


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None when unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as g:
            quota, period = int(f.read()), int(g.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _cpu_seconds(cpus: set[int]) -> float | None:
    """Busy seconds of ``cpus`` since boot, all processes (``/proc/stat``: user, nice, system, irq, softirq, steal);
    None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


class CpuThreads:
    """The thread count of a run: :meth:`start` chooses it, :meth:`follow` (at log points) says when the load asks for
    another. ``requested`` > 0 fixes it; ``processes``: processes of this run on this machine."""

    def __init__(self, requested: int = 0, processes: int = 1):
        self.requested, self.processes = requested, processes
        self.cores = max(1, usable_cores() // processes)
        self.count, self.why, self.history = 0, "", []  # history: [update, count] at each change
        self._cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self._mark = None  # (busy seconds of our CPUs, this process's CPU seconds, wall time) at the last measurement

    @property
    def follows_load(self) -> bool:
        return not self.requested and not _env_threads() and self.processes == 1

    def start(self) -> tuple[int, str]:
        """``(count, why)`` for the start of the run (auto: 0.3 s of measuring)."""
        if self.requested:
            self.count, self.why = self.requested, "as asked"
        elif _env_threads():
            self.count, self.why = _env_threads(), "auto: OMP_NUM_THREADS"
        elif not self.follows_load:
            self.count, self.why = self.cores, f"auto: {self.cores} core(s) per process"
        else:
            self._mark = self._measure()
            time.sleep(SAMPLE_SECONDS)
            self.count = self._for_load(self._others())
            self.why = f"auto: {self.cores} core(s), {self.cores - self.count} busy with other work; follows the load"
        self.history.append([0, self.count])
        return self.count, self.why

    def follow(self, update: int) -> int | None:
        """The new count when the other processes' CPU use since the last call asks for another one, else None."""
        if not self.follows_load or self._mark is None:
            return None
        count = self._for_load(self._others())
        if count == self.count:
            return None
        self.count = count
        self.history.append([update, count])
        return count

    def _for_load(self, others: float | None) -> int:
        if others is None:  # no /proc/stat: every core
            return self.cores
        busy = max(0, math.ceil(others - BUSY_SHARE))
        return max(1, min(self.cores, self.cores - busy))

    def _measure(self) -> tuple[float | None, float, float]:
        times = os.times()
        return _cpu_seconds(self._cpus), times.user + times.system, time.monotonic()

    def _others(self) -> float | None:
        """Cores' worth of CPU the other processes used since the last measurement."""
        (busy0, own0, wall0), (busy1, own1, wall1) = self._mark, self._measure()
        self._mark = (busy1, own1, wall1)
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)


def _env_threads() -> int:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 0
