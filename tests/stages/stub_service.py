"""A stub service for call stages, run as a real process on loopback (aiohttp).

    python tests/stages/stub_service.py [--latency S] [--errors P] [--throttle N] [--down]

POST / with an Arrow IPC stream (or a JSON array of row objects) of column `x`;
the answer has `y = 2 * x` (same format, a row per row). It answers after
`latency` seconds; a share `errors` of requests gets a 503 (seeded: the same
requests every run), every `throttle`-th a 429 with `Retry-After` (`--retry-after`, 0.05 s); `--down` makes
every request a 503 with a short body. `--echo` puts `x` back in each answer;
`--stale N` makes N requests that come on a kept-alive connection get first a
stale copy of the answer before them on it, then their own (a faulty proxy's way). GET /stats: requests received and
answered, distinct bodies answered, the most in flight at once; POST /mode with
JSON `{latency, errors, throttle, down}` changes them and starts the counts afresh
(one URL for a clean run and a faulty one). Prints its port.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random

import pyarrow as pa
import pyarrow.compute as pc
from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--errors", type=float, default=0.0)
    parser.add_argument("--throttle", type=int, default=0)
    parser.add_argument("--retry-after", default="0.05", help="what a 429 asks to wait")
    parser.add_argument("--down", action="store_true")
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--stale", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(7)
    seen = {"received": 0, "answered": 0, "in_flight": 0, "max_in_flight": 0,
            "max_per_second": 0, "stale": 0}
    before: dict[object, bytes] = {}  # the last answer sent on each connection
    distinct: set[str] = set()
    arrivals: list[float] = []  # when each request came, for the busiest second

    async def mode(request: web.Request) -> web.Response:
        for name, value in (await request.json()).items():
            setattr(args, name, value)
        seen.update(received=0, answered=0, max_in_flight=0, max_per_second=0, stale=0)
        distinct.clear()
        arrivals.clear()
        rng.seed(7)
        return web.json_response(vars(args))

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        seen["received"] += 1
        now = asyncio.get_running_loop().time()
        arrivals.append(now)
        seen["max_per_second"] = max(seen["max_per_second"],
                                     sum(1 for t in arrivals if t > now - 1.0))
        seen["in_flight"] += 1
        seen["max_in_flight"] = max(seen["max_in_flight"], seen["in_flight"])
        try:
            await asyncio.sleep(args.latency)
            if args.down:
                return web.Response(status=503, text="overloaded, try later")
            if args.throttle and seen["received"] % args.throttle == 0:
                return web.Response(status=429, headers={"Retry-After": args.retry_after})
            if rng.random() < args.errors:
                return web.Response(status=503, text="busy")
            if request.content_type == "application/json" or body[:1] == b"[":
                rows = json.loads(body)
                out = json.dumps([{"y": 2 * r["x"], **({"x": r["x"]} if args.echo else {})}
                                  for r in rows]).encode()
            else:
                table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
                doubled = pa.table({"y": pc.multiply(table["x"], 2),
                                    **({"x": table["x"]} if args.echo else {})})
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, doubled.schema) as writer:
                    writer.write_table(doubled)
                out = sink.getvalue().to_pybytes()
            seen["answered"] += 1
            distinct.add(hashlib.sha256(body).hexdigest())
            stale = before.get(request.transport)
            if args.stale and stale is not None and request.transport is not None:
                args.stale -= 1
                seen["stale"] += 1
                request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                        % len(stale) + stale)
            before[request.transport] = out
            return web.Response(body=out)
        finally:
            seen["in_flight"] -= 1

    async def stats(request: web.Request) -> web.Response:
        span = arrivals[-1] - arrivals[0] if arrivals else 0.0
        return web.json_response({**seen, "distinct": len(distinct), "span": span})

    async def serve() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/", answer)
        app.router.add_get("/stats", stats)
        app.router.add_post("/mode", mode)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
