"""What a process wants of a core counts every thread of it, not its main thread's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

from podpipe.runtime.plumbing import cputime

HELPER = """
import threading, time, sys
def spin():
    x = 0
    for i in range(3_000_000):
        x += i
helper = threading.Thread(target=spin)
helper.start()
helper.join()
print(time.process_time(), flush=True)
sys.stdin.read()
"""


def _spin(used: list[float]) -> None:
    x = 0
    for i in range(3_000_000):
        x += i
    used.append(time.thread_time())


def test_a_main_thread_waiting_for_a_helper_that_computes_wants_what_the_helper_ran():
    used: list[float] = []
    before = cputime.wanted()
    helper = threading.Thread(target=_spin, args=(used,))
    helper.start()
    helper.join()  # the main thread sleeps: it alone would want next to nothing
    assert cputime.wanted() - before >= used[0] > 0


def test_another_process_is_measured_over_all_its_threads_and_none_once_gone():
    child = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        ran = float(child.stdout.readline())
        assert ran > 0.05
        assert cputime.wanted(child.pid) >= ran - 2 / os.sysconf("SC_CLK_TCK")
    finally:
        child.communicate("", timeout=30)
    assert cputime.wanted(child.pid) is None


def _hash(data: bytes, done: threading.Barrier, release: threading.Event) -> None:
    for _ in range(4):
        hashlib.sha256(data)  # computes without the GIL
    done.wait()
    release.wait()


def _sleeps_while_helpers_hash(helpers: int) -> tuple[float, float]:
    """The main thread sleeps while `helpers` threads compute (without the GIL, as
    pyarrow's pool does, and stay, as its threads do: an ended thread's wait is gone
    with it): the seconds it took and what the process wanted meanwhile."""
    data = bytes(32 << 20)
    done, release = threading.Barrier(helpers + 1), threading.Event()
    before, started = cputime.wanted(), time.perf_counter()
    threads = [threading.Thread(target=_hash, args=(data, done, release))
               for _ in range(helpers)]
    for t in threads:
        t.start()
    done.wait()
    took, wanted = time.perf_counter() - started, cputime.wanted() - before
    release.set()
    for t in threads:
        t.join()
    return took, wanted


def test_helpers_waiting_for_a_core_count_as_wanting_it():
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # the threads started now take turns on one
    try:
        took, wanted = _sleeps_while_helpers_hash(3)
    finally:
        os.sched_setaffinity(0, cores)
    # three threads on one core: each waited for it about twice as long as it ran
    assert wanted >= 2 * took


def _schedstat_fds() -> dict[str, str]:
    """This process's open descriptors of a thread's schedstat: fd -> thread id."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith("/schedstat") and "/task/" in target:
            found[fd] = target.split("/")[-2]
    return found


def test_threads_that_come_and_go_leave_no_descriptor_open():
    cputime.wanted()
    measured = set()
    for _ in range(3):  # each round's helpers were measured while alive, then ended
        _sleeps_while_helpers_hash(2)
        measured |= set(cputime._OWN)
    cputime.wanted()
    alive = set(os.listdir("/proc/self/task"))
    assert measured - alive  # helpers were measured, and are gone
    assert set(cputime._OWN) == alive
    assert set(_schedstat_fds().values()) <= alive  # none left open for a gone thread
