"""The state a resumed run starts from: what was kept, what runs again."""

from __future__ import annotations

from podpipe.engine.events import Key
from podpipe.engine.state import RunState
from podpipe.model.graph import BATCH, GLOBAL, SINGLE, Graph
from podpipe.model.output import Output


def restored(graph: Graph, source_batches: int, budget: int, *,
             retries: dict[str, int], kept: dict[Key, Output],
             finished: dict[str, set[int]], shards: int = 1,
             owned: tuple[int, ...] | None = None,
             global_here: bool = True, workers: dict[str, int | None] | None = None,
             cpus: float = 1.0) -> RunState:
    """A run that resumes. `kept`: outputs found intact in some tier; `finished`:
    what each node had finished (the journal).

    A source batch is not run again when everything it gave the rest of the run
    is kept: its outputs that a reduce reads, and its per-batch sinks' files.
    Other batches run again from the source. What runs once per shard (a reduce,
    and what follows it) runs again unless every sink of it had finished for that
    shard and its outputs a global reduce reads are kept; the same for what runs
    once globally.
    """
    engine = RunState(graph, source_batches, budget, retries=retries, shards=shards,
                      owned=owned, global_here=global_here, workers=workers, cpus=cpus)
    run = engine.ledger
    uses: list[Key] = []
    for domain in (BATCH, SINGLE, GLOBAL):
        nodes = [n for n in graph.order if graph.domain[n] == domain]
        needed = [n for n in graph.reduce_inputs() if graph.domain[n] == domain]
        for key in sorted(run.plan.in_domain(domain)):
            if not (all((n, key) in kept for n in needed) and
                    all(key in finished.get(n, ()) for n in nodes if n in graph.sinks)):
                if domain == BATCH:
                    run.load_again(key)
                continue
            for node in nodes:
                run.mark_done(node, key)
            uses.extend((node, key) for node in needed)
    for node, key in uses:  # once all is marked done: who still reads them
        readers = run.readers(node, key)
        if readers:
            run.restore((node, key), kept[(node, key)], readers)
    run.all_loaded()  # what is left of the source comes through `load_again`
    for node in graph.order:
        if graph.domain[node] != BATCH:
            for key in run.keys(node):
                run.maybe_ready(node, key)
    return engine
