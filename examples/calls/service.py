"""A tiny shipping-quote service for the call-stage example: an ordinary service the
pipeline calls out to, not a station of the line.

    python -m examples.calls.service      # prints the port it listens on (loopback)

POST /quote with an Arrow IPC stream of `l_shipmode` and `l_quantity`; the answer is
an Arrow IPC stream with `quote` (a row per row): the quantity times the mode's rate.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc
from aiohttp import web

RATES = {"AIR": "4.10", "FOB": "1.30", "MAIL": "2.25", "RAIL": "1.05", "REG AIR": "3.60",
         "SHIP": "0.80", "TRUCK": "1.15"}  # per unit shipped


def quote(rows: pa.Table) -> pa.Table:
    rate = pc.index_in(rows["l_shipmode"], pa.array(list(RATES)))
    rates = pa.array([Decimal(r) for r in RATES.values()], pa.decimal128(6, 2))
    per_unit = pc.take(rates, rate)
    return pa.table({"quote": pc.multiply(rows["l_quantity"], per_unit)})


async def handle(request: web.Request) -> web.Response:
    rows = pa.ipc.open_stream(pa.py_buffer(await request.read())).read_all()
    answer = quote(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, answer.schema) as writer:
        writer.write_table(answer)
    return web.Response(body=sink.getvalue().to_pybytes(),
                        content_type="application/vnd.apache.arrow.stream")


async def main() -> None:
    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/quote", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
