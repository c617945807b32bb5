"""A call stage's kept answers: each on the node tier under the digest of its
request (`call.Client` names them), copied to the durable tier when the spec has
one, and fetched from there before a run on a new node. What the conductor needs of
call stages, without the client (asyncio, aiohttp) the stage's processes use."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from podpipe.errors import StoreError
from podpipe.model.pipeline import Pipeline
from podpipe.runtime.plumbing import files, logline
from podpipe.runtime.storage.store import Store, open_store

ANSWER = re.compile(r"^[0-9a-f]{40}\.(arrow|json)$")  # a kept answer's file name


def folder(run_dir: Path, node: str) -> Path:
    """Where the node tier keeps a call stage's answers, for the run."""
    return run_dir / "answers" / node


def answers_store(pipeline: Pipeline, node: str) -> Store | None:
    """Where the durable tier keeps a call stage's answers (None: no durable tier). Not
    under a checkpoint: an answer stands for its request whatever the spec around it."""
    url = pipeline.checkpoints.durable
    return None if url is None else open_store(url).child(f"{pipeline.name}/answers/{node}")


class Answers:
    """The answers kept for one call stage: files on the node tier, named by the
    request's digest, and copies on the durable tier (when the spec has one)."""

    def __init__(self, folder: Path, durable: Store | None) -> None:
        self.folder, self.durable = folder, durable
        files.private_dirs(folder)

    def get(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def drop(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def put(self, name: str, data: bytes) -> None:
        """Keep an answer: durable first (a lost node finds it), then the node tier.
        A durable tier that fails only costs what a lost node would send again."""
        if self.durable is not None:
            try:
                self.durable.write(name, data)
            except StoreError as exc:
                sys.stderr.write(logline.line(f"cannot keep an answer on the durable tier: "
                                              f"{exc}", "warning"))
        files.publish(self.folder / name, data)


def fetch(pipeline: Pipeline, node: str, folder: Path) -> int:
    """Before a run: the answers the durable tier keeps for `node` and the node tier
    does not, downloaded (a run on a new node sends none of them again). Returns how
    many."""
    store = answers_store(pipeline, node)
    if store is None:
        return 0
    files.private_dirs(folder)
    have = set(os.listdir(folder))
    fetched = 0
    for key in store.list(""):
        name = key.rsplit("/", 1)[-1]
        if ANSWER.match(name) and name not in have:  # names from the store are input
            with files.publishing(folder / name) as tmp:
                if store.download(key, tmp):
                    fetched += 1
    return fetched
