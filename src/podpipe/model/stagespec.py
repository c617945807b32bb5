"""A stage as the spec says it: its fields read and checked into one `Stage` each —
what it runs (a Python callable with its `params` and `setupInputs`, a command,
served or not, or a service to call), its inputs and kind (per batch, or a reduce
and its scope), its resources (GPUs among them) and the `Policy` its outputs and
failures are judged by. `model.spec` reads the rest of the pipeline.

Reading it, top to bottom: `stages` (the list, names unique), `_stage` (one stage),
`_runs` (which of run, command or call), `_call` (a call stage's request),
`_resources`."""

from __future__ import annotations

import re
from typing import Any

from podpipe.model.fields import MAX_BATCH_ROWS, Reader, kind
from podpipe.model.pipeline import (DEFAULT_RETRIES, SOURCE, Call, Command, Policy,
                                     Resources, Stage)
from podpipe.model.sizes import parse_size

MAX_GPUS = 64  # devices of one pod, or of one stage's worker
SCHEMAS = ("fixed", "any")  # may a stage's output schema differ from batch to batch?
SCOPES = ("shard", "global")
CALL_FORMATS = ("arrow", "json")
_FIELDS = {"name", "run", "command", "call", "inputs", "reduce", "scope", "version", "image",
           "env", "resources", "retries", "timeout", "schema", "workers", "params", "serve",
           "setupInputs"}
_CALLABLE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_CPU = re.compile(r"^(\d+(\.\d{1,3})?|\d+m)$")  # Kubernetes CPU: cores or millicores
_URL = re.compile(r"^https?://[^/?#\s]+(/\S*)?$")


def stages(r: Reader, value: Any, tables: set[str]) -> tuple[Stage, ...]:
    """`spec.stages`, each named uniquely among stages and `tables`."""
    if not isinstance(value, list) or not value:
        raise r.fail("spec.stages", f"expected a non-empty list of stages, got {kind(value)}")
    read, seen = [], set()
    for i, item in enumerate(value):
        stage = _stage(r, f"spec.stages[{i}]", item, tables)
        if stage.name in seen:
            raise r.fail(f"spec.stages[{i}].name", f"duplicate stage name {stage.name!r}")
        seen.add(stage.name)
        read.append(stage)
    return tuple(read)


def _stage(r: Reader, path: str, item: Any, tables: set[str]) -> Stage:
    st = r.mapping(path, item, _FIELDS, {"name", "inputs"})
    name = r.name(f"{path}.name", st["name"])
    if name == SOURCE:
        raise r.fail(f"{path}.name", f"{SOURCE!r} is reserved for the pipeline's source")
    if name in tables:
        raise r.fail(f"{path}.name", f"{name!r} names a table already (spec.tables): "
                                     "stages, tables and sinks share one namespace")
    run, command, call = _runs(r, path, st)
    reduce = st.get("reduce", False)
    if not isinstance(reduce, bool):
        raise r.fail(f"{path}.reduce", f"expected true or false, got {reduce!r}")
    scope = st.get("scope", "shard")
    if scope not in SCOPES:
        raise r.fail(f"{path}.scope", f"expected one of {list(SCOPES)}, got {scope!r}")
    if scope == "global" and not reduce:
        raise r.fail(f"{path}.scope", "'scope: global' is for a reduce stage "
                                      "(add 'reduce: true')")
    if reduce and "workers" in st:
        raise r.fail(f"{path}.workers", "a reduce runs as one worker (it reads every "
                                        "batch at once); remove 'workers'")
    env = st.get("env", {})
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise r.fail(f"{path}.env", "expected a mapping of strings to strings")
    params = st.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) and k.isidentifier()
                                               for k in params):
        raise r.fail(f"{path}.params", "expected a mapping of keyword argument names "
                                       "to values")
    if params and run is None:
        raise r.fail(f"{path}.params", "params are a Python stage's (run:) keyword "
                                       "arguments; a command or call stage has none")
    inputs = r.strings(f"{path}.inputs", st["inputs"])
    setup_inputs = (r.strings(f"{path}.setupInputs", st["setupInputs"])
                    if "setupInputs" in st else ())
    for table in setup_inputs:
        if table not in tables or table in inputs or run is None:
            raise r.fail(f"{path}.setupInputs", f"{table!r}: setupInputs are tables "
                         "(spec.tables) handed to a Python class stage's setup once, "
                         "not listed in its inputs")
    serve = r.boolean(f"{path}.serve", st["serve"]) if "serve" in st else False
    if serve and command is None:
        raise r.fail(f"{path}.serve", "serve is a command stage's: its executable "
                                      "started once per worker, taking tasks on stdin")
    schema = st.get("schema", "fixed")
    if schema not in SCHEMAS:
        raise r.fail(f"{path}.schema", f"expected one of {list(SCHEMAS)}, got {schema!r}")
    policy = Policy(
        retries=(r.integer(f"{path}.retries", st["retries"], minimum=0, maximum=100)
                 if "retries" in st else DEFAULT_RETRIES),
        timeout=r.seconds(f"{path}.timeout", st["timeout"]) if "timeout" in st else None,
        schema=schema)
    return Stage(
        name=name, inputs=inputs + setup_inputs, run=run, setup_inputs=setup_inputs,
        command=Command(command, serve) if command is not None else None, call=call,
        reduce=scope if reduce else None,
        version=str(st["version"]) if st.get("version") is not None else None,
        image=r.string(f"{path}.image", st["image"]) if "image" in st else None,
        env=dict(env), resources=_resources(r, f"{path}.resources", st.get("resources", {})),
        policy=policy, workers=r.workers(f"{path}.workers", st.get("workers", "auto")),
        params=dict(params))


def _runs(r: Reader, path: str, st: dict[str, Any]
          ) -> tuple[str | None, tuple[str, ...] | None, Call | None]:
    """What the stage runs: exactly one of a Python callable, a command, a call."""
    given = [k for k in ("run", "command", "call") if k in st]
    if len(given) != 1:
        raise r.fail(path, "expected exactly one of 'run' (a Python callable "
                           "module:function), 'command' (an executable) or 'call' (a "
                           "service), " + (f"got {' and '.join(given)}" if given
                                           else "got neither"))
    if "run" in st:
        run = r.string(f"{path}.run", st["run"])
        if not _CALLABLE.match(run):
            raise r.fail(f"{path}.run", f"expected a Python callable as "
                                        f"'module.path:function', got {run!r}")
        return run, None, None
    if "command" in st:
        return None, r.strings(f"{path}.command", st["command"]), None
    call = _call(r, f"{path}.call", st["call"])
    if len(st.get("inputs") or []) != 1:
        raise r.fail(f"{path}.inputs", "a call stage sends one input to its service: "
                                       "list exactly one")
    if isinstance(st.get("workers"), int) and st["workers"] > call.concurrency:
        raise r.fail(f"{path}.workers", f"{st['workers']} workers share "
                     f"call.concurrency {call.concurrency}: each needs at least one "
                     "request in flight")
    return None, None, call


def _call(r: Reader, path: str, value: Any) -> Call:
    c = r.mapping(path, value, {"url", "format", "rowsPerRequest", "concurrency", "rateLimit",
                                "timeout", "retries", "headers", "memoKey", "echo", "memo"},
                  {"url"})
    url = r.string(f"{path}.url", c["url"])
    if not _URL.match(url):
        raise r.fail(f"{path}.url", f"expected an http:// or https:// URL with a host, such "
                                    f"as http://geo.default.svc:8080/v1/lookup, got {url!r}")
    fmt = c.get("format", "arrow")
    if fmt not in CALL_FORMATS:
        raise r.fail(f"{path}.format", f"expected one of {list(CALL_FORMATS)}, got {fmt!r}")
    headers = c.get("headers", {})
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise r.fail(f"{path}.headers", "expected a mapping of header names to strings")
    memo_key = r.strings(f"{path}.memoKey", c["memoKey"]) if "memoKey" in c else ()
    for i, name in enumerate(memo_key):
        if name not in headers:
            raise r.fail(f"{path}.memoKey[{i}]", f"{name!r} is not one of call.headers "
                                                 f"{sorted(headers)}")
    rate = c.get("rateLimit")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or rate <= 0):
        raise r.fail(f"{path}.rateLimit", f"expected requests per second above 0, got {rate!r}")
    return Call(
        url=url, format=fmt,
        rows_per_request=r.integer(f"{path}.rowsPerRequest", c.get("rowsPerRequest", 1000),
                                   maximum=MAX_BATCH_ROWS),
        concurrency=r.integer(f"{path}.concurrency", c.get("concurrency", 8), maximum=4096),
        rate_limit=float(rate) if rate is not None else None,
        timeout=r.seconds(f"{path}.timeout", c.get("timeout", 10.0)),
        retries=r.integer(f"{path}.retries", c.get("retries", 5), minimum=0, maximum=100),
        headers=dict(headers), memo_key=memo_key,
        echo=r.strings(f"{path}.echo", c["echo"]) if "echo" in c else (),
        memo=r.boolean(f"{path}.memo", c.get("memo", True)))


def _resources(r: Reader, path: str, value: Any) -> Resources:
    res = r.mapping(path, value, {"cpu", "memory", "gpu"}, set())
    cpu = res.get("cpu")
    if cpu is not None:
        cpu = str(cpu) if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) else cpu
        if not isinstance(cpu, str) or not _CPU.match(cpu) or float(cpu.rstrip("m")) <= 0:
            raise r.fail(f"{path}.cpu", f"expected CPU cores such as 2, 0.5 or 500m, "
                                        f"got {cpu!r}")
    memory = None
    if res.get("memory") is not None:
        try:
            memory = parse_size(res["memory"])
        except ValueError as exc:
            raise r.fail(f"{path}.memory", str(exc)) from None
    gpu = (r.integer(f"{path}.gpu", res["gpu"], minimum=1, maximum=MAX_GPUS)
           if res.get("gpu") is not None else None)
    return Resources(cpu=cpu, memory=memory, gpu=gpu)
