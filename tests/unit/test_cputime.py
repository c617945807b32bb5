"""What a process wants of a core counts every thread of it, not its main thread's."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from podpipe.runtime import cputime

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
