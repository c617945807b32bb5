"""What a stage's candidate holds open is never emptied or written over, yet recycled
(`conductor.scratchwork`): real files in a scratch folder; the agents' side a fake."""

from __future__ import annotations

import os
from pathlib import Path

from podpipe.engine import events as ev
from podpipe.runtime.conductor.scratchwork import ScratchWork
from podpipe.runtime.data.scratch import Scratch


class _Agents:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def send(self, name: str, message: object) -> bool:
        self.sent.append((name, message))
        return True


class _Timeline:
    def granted(self, agent: str) -> None:
        pass


def _work(tmp_path: Path) -> tuple[ScratchWork, Scratch, _Agents]:
    scratch = Scratch.create("r", root=tmp_path)
    agents = _Agents()
    work = ScratchWork(scratch, tmp_path, agents, _Timeline(),  # type: ignore[arg-type]
                       lambda n: False, lambda m, level="info": None)
    return work, scratch, agents


def _opened(path: Path) -> int:
    """The file open, as a candidate holds it (its size read through the descriptor:
    emptied under it, it reads 0, where a mapping would fault)."""
    return os.open(path, os.O_RDONLY)


def _intact(fd: int) -> bool:
    return os.fstat(fd).st_size == 5000 and os.pread(fd, 5, 4995) == b"x" * 5


def test_a_held_file_deleted_is_deleted_by_name_its_bytes_stay_with_the_holder(tmp_path):
    work, scratch, _ = _work(tmp_path)
    path = scratch.path / "a.arrow"
    path.write_bytes(b"x" * 5000)
    held = _opened(path)
    work.hold(str(path))
    work.carry_out(ev.Delete(str(path)))
    assert not path.exists() and _intact(held)  # not emptied under it
    other = scratch.path / "b.arrow"
    other.write_bytes(b"y" * 5000)
    unheld = os.open(other, os.O_RDONLY)
    work.carry_out(ev.Delete(str(other)))
    assert os.fstat(unheld).st_size == 0  # what no candidate holds is emptied first
    os.close(unheld)


def test_a_held_file_is_pooled_but_not_handed_out_until_let_go(tmp_path):
    work, scratch, agents = _work(tmp_path)
    path = scratch.path / "a.arrow"
    path.write_bytes(b"x" * 5000)
    held = _opened(path)
    work.hold(str(path))
    work.carry_out(ev.Recycle(str(path), 1))
    assert Path(scratch.pool_path(1)).exists()
    work.carry_out(ev.Grant("double", 0, reuse=1))  # not to be written over: anew
    assert agents.sent[-1][1].reuse is None
    assert not Path(scratch.pool_path(1)).exists() and _intact(held)
    third = scratch.path / "c.arrow"
    third.write_bytes(b"z" * 5000)
    work.hold(str(third))
    work.carry_out(ev.Recycle(str(third), 2))
    work.let_go(str(third))  # the candidate answered: a warm file like any other
    assert work.reusable(2) == 2
    work.carry_out(ev.Grant("double", 0, reuse=2))
    assert agents.sent[-1][1].reuse == str(scratch.pool_path(2))


def test_a_held_pooled_file_given_up_is_not_emptied(tmp_path):
    work, scratch, _ = _work(tmp_path)
    path = scratch.path / "a.arrow"
    path.write_bytes(b"x" * 5000)
    held = _opened(path)
    work.hold(str(path))
    work.carry_out(ev.Recycle(str(path), 3))
    work.carry_out(ev.Unpool(3))
    assert not Path(scratch.pool_path(3)).exists() and _intact(held)
