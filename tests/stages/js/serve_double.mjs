// A serving command stage in JavaScript (`serve: true`, protocol 1): started once per
// worker, it takes each task as a JSON line on stdin, doubles the column "x" of the
// task's first input (an Arrow IPC file), writes an Arrow IPC file to the task's
// output and answers {"batch": B} on stdout ({"batch": B, "error": "..."} if it cannot).
// With FAIL_BATCH set, it answers that batch with an error (the tests' failing task).
import { readFileSync, writeFileSync, appendFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { tableFromIPC, tableFromArrays, tableToIPC } from "apache-arrow";

if (process.env.STARTS_FILE) appendFileSync(process.env.STARTS_FILE, `${process.pid}\n`);

for await (const line of createInterface({ input: process.stdin })) {
  const task = JSON.parse(line);
  try {
    if (String(task.batch) === process.env.FAIL_BATCH) throw new Error("no x to double here");
    const input = tableFromIPC(readFileSync(task.inputs[0]));
    const xs = input.getChild("x").toArray();
    const doubled = new Float64Array(xs.length);
    for (let i = 0; i < xs.length; i++) doubled[i] = Number(xs[i]) * 2;
    const out = tableFromArrays({
      x: doubled, batch: new BigInt64Array(xs.length).fill(BigInt(task.batch)) });
    writeFileSync(task.output, tableToIPC(out, "file"));
    process.stdout.write(JSON.stringify({ batch: task.batch }) + "\n");
  } catch (error) {
    process.stdout.write(JSON.stringify({ batch: task.batch, error: String(error) }) + "\n");
  }
}
