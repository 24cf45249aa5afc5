"""How many threads a native forward step uses (backends/native_model.py).

All of them (native.threads()) unless one thread has been measured faster for steps of the same
size. That happens when another process keeps a core busy: every kernel call ends at a barrier
that waits for the starved thread, ~100 times per decode step, and two threads then decode at a
fraction of one thread's speed (measured here: SmolLM2 21-24 tok/s with two, ~107 with one).

The first step of a size starts on one thread when other threads that keep running (/proc/stat's
procs_running less this one, the fewest of 5 samples) leave fewer free CPUs than the full count
(a one-shot run's prompt is a single step). Each step's wall time and the process's CPU time over
it are measured. A step that got much less CPU time than its threads could use (they were not all
running: starved) makes the next step of that size a probe on one thread, and the faster of the
two becomes the choice. While one thread is the choice, the full count is probed now and then, so
the pool grows back when the neighbour is gone: 128 steps after starting on or switching to one
thread, 4 after switching back; after a probe that changes nothing, twice as far, and at least 20
times as many steps as the probe cost steps of the choice, up to 2048. A probe that is due waits
while the machine is busy: from /proc/stat's cpu line, the CPU time spent at normal priority
(user, system, irq; not nice, idle or steal) less this process's own, over at least 0.2 s, is half
a CPU or more. A probe of two starved threads beside a spinning neighbour cost ~170 ms here (33
one-thread SmolLM2 steps: 7% of a 400-token run); waiting costs one read of /proc/stat per 0.2 s.
A niced neighbour's time is nice time, so it does not hold a probe back; work that a cgroup's
lower weight would hold back looks busy (it takes the CPU this process leaves free), and only the
probe that runs anyway once it has waited 2048 steps past due finds the CPU. On a quiet machine steps get their CPU time, so none is a
probe. The kernels give the same bits on any thread count (each output's sums run in an order
fixed by the data, not by the split), so switching never changes results.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import native

MIN_EVERY, MAX_EVERY = 4, 2048
FIRST_EVERY = 128  # steps on one thread (started there, or just switched) before the full count is probed
STARVED = 0.6  # CPU time / (wall time x threads) below this: the threads were not all running
FASTER = 0.9   # a probe takes over when it is this much faster than the choice
WINDOW = 0.2   # seconds of /proc/stat time behind a "the machine is busy" verdict
BUSY = 0.5     # other processes' CPUs' worth of normal-priority work that holds a probe back


@dataclass
class _Size:
    choice: int
    times: dict = field(default_factory=dict)  # threads -> seconds per step (recent)
    since: int = 0          # steps since the last probe
    every: int = MIN_EVERY  # at least this many steps between probes
    probe: bool = False     # the next step is a probe of the other count


def _size(rows: int) -> int:
    """Steps of similar size share their measurements: decode batches by row count, prompt
    chunks by power of two."""
    return rows if rows <= 8 else 1 << (rows - 1).bit_length()


def _procs_running() -> int:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 1


def _others_running(samples: int = 5) -> int:
    """Threads that kept running on the machine besides the caller: the fewest in a few samples
    ~0.2 ms apart, so a thread that runs for a moment does not count (0 without /proc/stat)."""
    fewest = _procs_running()
    for _ in range(samples - 1):
        time.sleep(0.0002)
        fewest = min(fewest, _procs_running())
    return max(0, fewest - 1)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float | None:
    """CPU seconds the machine spent at normal priority since boot: /proc/stat's user (guest
    included), system, irq and softirq; None without /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
        return (v[0] + v[2] + v[5] + v[6]) / _TICK
    except (OSError, ValueError, IndexError):
        return None


class ThreadPolicy:
    def __init__(self, threads=native.threads, others=_others_running, busy=_busy_seconds):
        self.threads, self.others, self.busy = threads, others, busy
        self.sizes: dict[tuple[int, int], _Size] = {}
        self.mark = None  # (busy seconds, own CPU seconds, wall) when the machine was last looked at
        self.verdict: bool | None = None  # _quiet()'s over the window that ended at mark

    def _quiet(self) -> bool | None:
        """Whether other processes' normal-priority work left a CPU free over the last window of
        >= WINDOW seconds (None until one has passed since a fresh look): one /proc/stat read per
        window, the verdict shared by all step sizes until the next."""
        now = time.perf_counter()
        if self.mark is not None and now - self.mark[2] < WINDOW:
            return self.verdict
        busy, own = self.busy(), time.process_time()
        if busy is None:
            return True  # nothing to go by: probe when due
        last, self.mark = self.mark, (busy, own, now)
        if last is None or now - last[2] > 4 * WINDOW:  # a stale look: start a window here
            self.verdict = None
        else:
            self.verdict = (busy - last[0]) - (own - last[1]) < BUSY * (now - last[2])
        return self.verdict

    def pick(self, rows: int) -> int:
        n = self.threads()
        if n <= 1:
            return n
        s = self.sizes.get((n, _size(rows)))
        if s is None:
            free = (os.cpu_count() or n) - self.others()
            s = self.sizes[(n, _size(rows))] = _Size(n) if free >= n else _Size(1, every=FIRST_EVERY)
        s.since += 1
        if s.choice == 1 and not s.probe and s.since >= s.every:
            s.probe = bool(self._quiet()) or s.since >= s.every + MAX_EVERY
        return (n if s.choice == 1 else 1) if s.probe else s.choice

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def record(self, rows: int, used: int, started: tuple[float, float]) -> None:
        wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
        n = self.threads()
        s = self.sizes.get((n, _size(rows)))
        if s is None or wall <= 0:
            return
        if used == s.choice and not s.probe:
            old = s.times.get(used)
            s.times[used] = wall if old is None else 0.75 * old + 0.25 * wall
            if used > 1 and cpu < STARVED * used * wall and (s.since >= s.every or 1 not in s.times):
                s.probe = True  # its threads were starved: try one thread next step
            return
        s.probe, s.since = False, 0
        s.times[used] = wall
        mine = s.times.get(s.choice)
        if mine is not None and wall < FASTER * mine:
            s.choice, s.every = used, (FIRST_EVERY if used == 1 else MIN_EVERY)
        else:
            cost = wall / mine if mine else 1.0
            s.every = min(max(2 * s.every, int(20 * cost)), MAX_EVERY)
