"""No process outlives the run.

Each process podpipe starts dies with its parent (PR_SET_PDEATHSIG); each stage
process leads its own process group, ended whole when the stage is killed or the
run ends; and the conductor is a child subreaper, so that what a stage's children
leave behind becomes its own child, ended with the run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Sequence, TypeVar

P = TypeVar("P")


def child(body: Callable[[], int]) -> NoReturn:
    """In a forked child: run `body` and leave with its exit code, without the
    parent's teardown (`os._exit`, output flushed first); a traceback in the log for
    anything unexpected."""
    code = 1
    try:
        code = body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when our parent dies; leave if it already has."""
    _with_parent(signal.SIGKILL)


def stop_with_parent() -> None:
    """Ask the kernel to SIGTERM us when our parent dies (we stop as on Ctrl-C, in a
    state to resume); leave if it already has."""
    _with_parent(signal.SIGTERM)


def _with_parent(sig: int) -> None:
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def become_subreaper() -> None:
    """Orphans of this process's descendants (a stage's child that outlived it, a
    daemon a command left behind) become its children, so that it can end them."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (a stage process and what it started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # gone already


def end_children(keep: frozenset[int] = frozenset()) -> list[int]:
    """SIGKILL and reap every child of this process but `keep`; returns their pids."""
    me = str(os.getpid())
    ended = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in keep:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # the parent's pid
            if fields[2] == entry:  # it leads a process group: end the group too
                kill_group(int(entry))
            try:
                os.kill(int(entry), signal.SIGKILL)
                os.waitpid(int(entry), 0)
            except (ProcessLookupError, ChildProcessError):
                continue
            ended.append(int(entry))
    return ended


def reap(processes: Sequence[P], grace: float, ends: Callable[[P, float | None], bool],
         kill: Callable[[P], None]) -> None:
    """Wait for each of `processes` to end, all of them within `grace` seconds, and
    kill those that will not. `ends(p, seconds)`: did it end within them? (After
    `kill`, it is waited for without limit: `None`.)"""
    deadline = time.monotonic() + grace
    for process in processes:
        if not ends(process, max(0.0, deadline - time.monotonic())):
            kill(process)
            ends(process, None)


RUN_ENV = "PODPIPE_RUN_DIR"  # in a local run's stage processes: the run directory


def end_leftovers(run_dir: Path) -> list[int]:
    """SIGKILL what a killed run's stages left behind: this user's processes whose
    environment names `run_dir` (`RUN_ENV`, which a stage's own children inherit) —
    the conductor, the subreaper that would have ended them, is gone. Returns the
    pids ended."""
    marker = f"{RUN_ENV}={run_dir.resolve()}".encode()
    me, mine = os.geteuid(), os.getpid()
    ended = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == mine:
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != me:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            os.kill(int(entry), signal.SIGKILL)
            ended.append(int(entry))
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile, or not ours to read
    return ended
