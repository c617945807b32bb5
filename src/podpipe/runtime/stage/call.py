"""A call stage's client: each batch POSTed to a service in slices, every answer kept.

A batch is cut into consecutive slices of `rowsPerRequest` rows; each slice is one
POST (an Arrow IPC stream, or a JSON array of row objects) and its answer must
have as many rows, and carry back the `echo` columns as they were sent. The stage's
output is the answers, concatenated in request order. Requests overlap (asyncio, one aiohttp session per process: connections
pooled and kept alive), at most `concurrency` at once over all the stage's workers
(each has its share) and `rateLimit` a second; a request that meets a connection
error, a timeout, a 429 or a 5xx is sent again after a backoff (exponential, with
jitter, at least what `Retry-After` says, up to the call's `timeout`), `retries` times
at most; so is one whose answer fails its check, on a new connection (the one it came
on may hold an answer meant for another request).

**At most once per request.** Every answer is kept on the node tier, under a
digest of the request (method, URL, the headers named in `memoKey`, body), as it
arrives; a request whose answer is kept is never sent again — not after a
restart, a given-up batch, a resume or a recompute. Only requests in flight when
a process dies may be sent twice. The conductor uploads the answers to the
durable tier with its checkpoints, so that a run on another node finds them too.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from podpipe.model.pipeline import Call
from podpipe.runtime.storage.answers import Answers

_ENV = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
BACKOFF, MAX_BACKOFF = 0.1, 10.0  # seconds: 0.1, 0.2, 0.4, ... (x 0.5-1.5), at most 10
NOTIFY_SECONDS = 0.25  # how often, at most, the requests in flight are told


class CallFailed(Exception):
    """A request failed for good (after its retries, or with an answer that does not do)."""


def expand(text: str, env: dict[str, str], where: str) -> str:
    """`$(NAME)` replaced by the environment's NAME (KeyError naming `where` if unset)."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise KeyError(f"{where}: $({name}) is not set in the stage's environment")
        return env[name]
    return _ENV.sub(value, text)


@dataclass
class Figures:
    """What a process's requests did (per task, reported with its stats)."""

    requests: int = 0     # sent (each retry is one)
    memo_hits: int = 0    # answers kept from before: not sent
    retries: int = 0
    failures: int = 0
    in_flight: int = 0
    in_flight_max: int = 0
    latencies: list[float] = field(default_factory=list)


class Client:
    def __init__(self, call: Call, workers: int, env: dict[str, str], where: str) -> None:
        self.call = call
        self.url = expand(call.url, env, f"{where}.url")
        self.headers = {k: expand(v, env, f"{where}.headers.{k}")
                        for k, v in call.headers.items()}
        self.share = max(1, call.concurrency // max(1, workers))
        self.interval = workers / call.rate_limit if call.rate_limit else 0.0
        self.ext = "arrow" if call.format == "arrow" else "json"
        keyed = "".join(f"{k}: {self.headers[k]}\n" for k in sorted(call.memo_key))
        self._prefix = f"POST\0{self.url}\0{keyed}\0".encode()
        self.loop: asyncio.AbstractEventLoop | None = None  # the process's, from its first batch
        self.session: Any = None
        self._next = 0.0  # when the rate limit lets the next request go
        self.last = Figures()  # what the last batch's requests did (failed or not)
        self.notify: Callable[[int], None] | None = None  # told the requests in flight
        self._told = 0.0

    def close(self) -> None:
        """Close the session and its connections (a standing line's next job makes its
        own client: another spec may name another service)."""
        if self.loop is not None:
            if self.session is not None:
                self.loop.run_until_complete(self.session.close())
            self.loop.close()
        self.loop = self.session = None

    def send(self, table: pa.Table, kept: Answers | None) -> pa.Table:
        """The answers to `table`'s requests, in order; `kept`: the answers kept
        (None: `memo: false`). CallFailed naming the request that failed."""
        self.last = Figures()
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        answers = self.loop.run_until_complete(self._batch(table, kept, self.last))
        if self.call.format == "arrow":
            return pa.concat_tables(answers)
        return pa.Table.from_pylist([row for answer in answers for row in answer])

    async def _batch(self, table: pa.Table, kept: Answers | None, figures: Figures) -> list[Any]:
        import aiohttp

        if self.session is None:  # one per process: its connections are kept alive
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.share),
                timeout=aiohttp.ClientTimeout(total=self.call.timeout))
        step = self.call.rows_per_request
        starts = range(0, max(1, table.num_rows), step)  # an empty batch: one empty request
        gate = asyncio.Semaphore(self.share)
        tasks = [asyncio.ensure_future(self._one(i, table.slice(at, step), gate, kept, figures))
                 for i, at in enumerate(starts)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _one(self, index: int, rows: pa.Table, gate: asyncio.Semaphore,
                   kept: Answers | None, figures: Figures) -> Any:
        body = self.encode(rows)
        name = self.name(body)
        data = kept.get(name) if kept is not None else None
        if data is not None and kept is not None:
            try:
                answer = self.decode(data, rows, index)
                figures.memo_hits += 1
                return answer
            except CallFailed:  # a kept answer that does not do: asked again
                kept.drop(name)
        # a slot is held until its answer is kept: what a kill can make us send again is
        # at most the `concurrency`
        async with gate:
            answer, data = await self._post(index, rows, body, figures)
            if kept is not None:
                # checked, then kept as it comes, not once the batch is done: a restart
                # (or a lost node) finds it
                await asyncio.get_running_loop().run_in_executor(None, kept.put, name, data)
        return answer

    async def _post(self, index: int, rows: pa.Table, body: bytes,
                    figures: Figures) -> tuple[Any, bytes]:
        """The checked answer to request `index` and its bytes, after retries."""
        import aiohttp

        for attempt in range(self.call.retries + 1):
            await self._pace()
            figures.in_flight += 1
            figures.in_flight_max = max(figures.in_flight_max, figures.in_flight)
            started = time.monotonic()
            if self.notify is not None and started - self._told >= NOTIFY_SECONDS:
                self._told = started
                self.notify(figures.in_flight)
            status, data, wait, connection = None, b"", None, None
            try:
                async with self.session.post(self.url, data=body, headers=self.headers) as reply:
                    connection = reply.connection.protocol if reply.connection else None
                    status, data = reply.status, await reply.read()
                    wait = _retry_after(reply.headers.get("Retry-After"))
                problem = f"HTTP {status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if isinstance(exc, asyncio.TimeoutError):
                    problem = f"no answer within {self.call.timeout:g} s"
            finally:
                figures.in_flight -= 1
                figures.requests += 1
                figures.latencies.append(time.monotonic() - started)
            retryable = status is None or status == 429 or status >= 500
            if status is not None and 200 <= status < 300:
                try:
                    return self.decode(data, rows, index), data
                except CallFailed as exc:  # a wrong answer: perhaps one meant for another
                    problem, retryable = str(exc), True  # request, left on a kept-alive
                    if connection is not None:  # connection: it goes with whatever else
                        connection.close()      # it holds, and the request is sent again
            if not retryable or attempt == self.call.retries:
                figures.failures += 1
                tried = f" after {attempt} retries" if attempt else ""
                raise CallFailed(f"request {index} (rows {index * self.call.rows_per_request}"
                                 f"+{rows.num_rows}) to {self.url} failed{tried}: {problem}; "
                                 f"the answer begins {data[:120]!r}")
            figures.retries += 1
            delay = min(MAX_BACKOFF, BACKOFF * 2 ** attempt) * random.uniform(0.5, 1.5)
            # as long as the service asks, but never longer than a request may take
            await asyncio.sleep(max(delay, min(wait or 0.0, self.call.timeout)))
        raise AssertionError("unreachable")

    async def _pace(self) -> None:
        """Wait for the rate limit's next slot (requests evenly spaced, no burst)."""
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def name(self, body: bytes) -> str:
        """The name a request's answer is kept under: a digest of the method, the URL,
        the headers named in `memoKey` and the body."""
        return f"{hashlib.sha256(self._prefix + body).hexdigest()[:40]}.{self.ext}"

    def encode(self, rows: pa.Table) -> bytes:
        if self.call.format == "json":
            return json.dumps(rows.to_pylist(), default=str, separators=(",", ":")).encode()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as writer:
            writer.write_table(rows)
        data: bytes = sink.getvalue().to_pybytes()
        return data

    def decode(self, data: bytes, rows: pa.Table, index: int) -> Any:
        """The answer to request `index` (of `rows`), checked: as many rows as it was
        sent, and the `echo` columns' values as they were sent."""
        try:
            if self.call.format == "json":
                answer = json.loads(data)
                if not isinstance(answer, list) or not all(isinstance(r, dict) for r in answer):
                    raise ValueError("expected a JSON array of row objects")
                count = len(answer)
            else:
                answer = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
                count = answer.num_rows
        except (ValueError, pa.ArrowException) as exc:
            raise CallFailed(f"request {index}: the answer of {self.url} is not "
                             f"{self.call.format}: {exc}; it begins {data[:120]!r}") from None
        if count != rows.num_rows:
            raise CallFailed(f"request {index}: the answer of {self.url} has {count} rows, the "
                             f"request {rows.num_rows}; each answer must have a row per row sent")
        for column in self.call.echo:
            wrong = self._echoed(answer, rows, column)
            if wrong:
                raise CallFailed(f"request {index}: the answer of {self.url} does not echo "
                                 f"the rows sent: {wrong} (call.echo; it may be the answer to "
                                 f"another request)")
        return answer

    def _echoed(self, answer: Any, rows: pa.Table, column: str) -> str:
        """What is wrong with `column` as `answer` echoes it ('' when nothing)."""
        if column not in rows.column_names:
            return f"{column!r} is not a column of the rows sent {rows.column_names}"
        sent = rows.column(column)
        if self.call.format == "json":
            got = [row.get(column) for row in answer]
            want = json.loads(json.dumps(sent.to_pylist(), default=str))
            if got == want:
                return ""
        else:
            if column not in answer.column_names:
                return f"it has no column {column!r}"
            echoed = answer.column(column)
            try:
                if echoed.type != sent.type:
                    echoed = echoed.cast(sent.type)
                if echoed.equals(sent):
                    return ""
            except pa.ArrowException:
                return f"column {column!r} is {echoed.type}, sent as {sent.type}"
            got, want = echoed.to_pylist(), sent.to_pylist()
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 0)
        return f"row {at}'s {column!r} is {got[at]!r}, sent as {want[at]!r}"


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (a number or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
