"""Changing the line while it runs: `podpipe swap` and `podpipe apply` requests.

A swap is a per-stage override (`--set stages.NAME.run=…`): checked against the
spec, then asked of the engine (`SwapRequested`), which says when to replace the
process (`Replace`). The request is answered once the new process says hello
(`Swapped`), or its version fails (`Held`). An apply is checked here too (what may
change, `model.change`); the conductor carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from podpipe.engine import events as ev
from podpipe.errors import PodpipeError
from podpipe.model import change
from podpipe.model import spec as specs
from podpipe.model.pipeline import Pipeline
from podpipe.runtime.plumbing import files, protocol
from podpipe.runtime.conductor.agents import Agents, Conn


@dataclass
class _Swap:
    overrides: list[str]
    conn: Conn | None  # who asked; None: part of an apply, which answers for itself


@dataclass(frozen=True)
class Change:
    """An apply that was accepted: the new spec, and what changes."""

    pipeline: Pipeline
    diff: change.Change

    def said(self) -> str:
        d = self.diff
        return (f"added {list(d.added)}, removed {list(d.removed)}, changed "
                f"{list(d.changed)}, resized {list(d.resized)}")

    def applied(self, redo: int) -> protocol.Applied:
        """The answer to the apply: what changed, and how many source batches run
        down the line again."""
        d = self.diff
        return protocol.Applied(added=list(d.added), removed=list(d.removed),
                                changed=list(d.changed), redo=redo, resized=list(d.resized))


class Swaps:
    def __init__(self, run_dir: Path, base_overrides: list[str], agents: Agents,
                 swapped: dict[str, list[str]] | None = None) -> None:
        """`swapped`: stages swapped before this run began (a line's, for its jobs)."""
        self._run_dir, self._base, self._agents = run_dir, base_overrides, agents
        self._asked: dict[str, _Swap] = {}      # requested, not yet replaced
        self._coming: dict[str, _Swap] = {}     # replaced, new process not yet up
        self.overrides: dict[str, list[str]] = dict(swapped or {})  # swapped: their --set
        # containers: stages whose new image is expected (`swap --image`), and whether
        # what the old versions made is to be done again then
        self.expected: dict[str, bool] = {}

    @property
    def busy(self) -> list[str]:
        return sorted({*self._asked, *self._coming})

    def check(self, request: protocol.SwapRequest, pipeline: Pipeline, *, local: bool,
              shared_global: bool) -> protocol.Refused | protocol.Swapped | None:
        """Why this swap cannot be done (`Refused`); else None, and it is recorded: the
        conductor has the engine carry it out. A container's (not `local`): the answer
        now, `pending` until the container comes back with the new image."""
        refused = self._refused(request, pipeline, local=local, shared_global=shared_global)
        if refused is not None:
            return protocol.Refused(message=refused)
        if local:
            return None
        return protocol.Swapped(stage=request.stage, version="", pid=0, pending=True)

    def image_updated(self, node: str) -> ev.VersionChanged:
        """A container of `node` came back with another version (its image updated in
        place, by `swap --image` or not): swapped in; recomputing if the swap said so."""
        return ev.VersionChanged(node, self.expected.pop(node, False))

    def _refused(self, request: protocol.SwapRequest, pipeline: Pipeline, *, local: bool,
                 shared_global: bool) -> str | None:
        node = request.stage
        stages = [s.name for s in pipeline.stages]
        if node not in stages:
            return f"no stage {node!r} in this run; its stages are {stages}"
        if not local and not any(o.startswith(f"stages.{node}.image=")
                                 for o in request.overrides):
            return ("this pod's stages are containers: swap one by its image (podpipe "
                    "swap RUN_DIR STAGE --image IMAGE; --k8s prints the patch that updates "
                    "it in place)")
        if node in self._asked or node in self._coming:
            return f"stage {node!r} is being swapped already"
        if request.recompute and shared_global:
            return ("--recompute in a run of several replicas with a global reduce is not "
                    "supported yet (the other pods' shards would need handing over again)")
        overrides = self.version(node, request.overrides)
        if isinstance(overrides, str):
            return overrides
        if local:
            self._asked[node] = _Swap(overrides, None)
        else:  # carried out by the kubelet: the container comes back with the new image
            self.expected[node] = request.recompute
        return None

    def version(self, node: str, overrides: list[str]) -> list[str] | str:
        """The overrides that make `node` a new version (`overrides` after those it was
        swapped with), or why that version is not valid."""
        overrides = [*self.overrides.get(node, []), *overrides]
        try:
            specs.load(self._run_dir / "spec.yaml", [*self._base, *overrides])
        except PodpipeError as exc:
            return f"the new version is not valid: {exc}"
        return overrides

    def asked_by(self, node: str, conn: Conn) -> None:
        self._asked[node].conn = conn

    def to_spec(self, node: str) -> None:
        """Swap `node` to what the (applied) spec says: no overrides of its own."""
        self.overrides.pop(node, None)
        self._asked[node] = _Swap([], None)

    def replacing(self, node: str) -> list[str]:
        """The engine replaces `node` now: the overrides its new process runs with."""
        swap = self._asked.pop(node, None)
        if swap is not None:
            self._coming[node] = swap
            self.overrides[node] = swap.overrides
        return self.overrides.get(node, [])

    def hello(self, node: str, version: str, pid: int) -> None:
        """The new version of `node` is up: answer whoever asked."""
        self._answer(node, protocol.Swapped(stage=node, version=version, pid=pid))

    def held(self, node: str, message: str) -> None:
        self._answer(node, protocol.Held(stage=node, message=message))

    def _answer(self, node: str, message: protocol.Message) -> None:
        swap = self._coming.pop(node, None)
        if swap is not None and swap.conn is not None:
            self._agents.answer(swap.conn, message)

    def check_apply(self, request: protocol.ApplyRequest, pipeline: Pipeline, *,
                    local: bool, shared_global: bool) -> Change | str:
        """The change an apply makes, or why it cannot be made."""
        if not local:
            return ("this pod's stages are containers: render the new spec and apply the "
                    "manifests instead")
        if shared_global:
            return "apply in a run of several replicas with a global reduce is not " \
                   "supported yet"
        if self.busy:
            return f"a swap of {self.busy} is in progress; apply once it is done"
        spec = self._run_dir / "spec.yaml"  # what the run runs from now on, if valid
        try:
            with files.publishing(spec) as new_path:  # an error leaves the old spec
                new_path.write_text(request.spec)
                new = specs.load(new_path, self._base)
                diff = change.diff(pipeline, new)
        except PodpipeError as exc:  # named after the user's file, not our copy
            return str(exc).replace(str(files.temporary(spec)), request.path)
        except OSError as exc:
            return f"cannot write {spec}: {exc.strerror}"
        return Change(new, diff)
