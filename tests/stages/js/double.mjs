// A command stage in JavaScript: reads the Arrow IPC file named by PODPIPE_INPUT,
// doubles the column "x" and writes an Arrow IPC file to PODPIPE_OUTPUT.
import { readFileSync, writeFileSync } from "node:fs";
import { tableFromIPC, tableFromArrays, tableToIPC } from "apache-arrow";

const input = tableFromIPC(readFileSync(process.env.PODPIPE_INPUT));
const xs = input.getChild("x").toArray();
const doubled = new Float64Array(xs.length);
for (let i = 0; i < xs.length; i++) doubled[i] = Number(xs[i]) * 2;
const batch = BigInt(process.env.PODPIPE_BATCH);
const out = tableFromArrays({ x: doubled, batch: new BigInt64Array(xs.length).fill(batch) });
writeFileSync(process.env.PODPIPE_OUTPUT, tableToIPC(out, "file"));
