// Validate a PodMonitor (JSON on stdin) against the Prometheus Operator's CRD schema.
// Exit 0 when it is valid; else 1, the first error on stderr.
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";

const manifest = JSON.parse(readFileSync(0, "utf8"));
if (manifest.apiVersion !== PodMonitor.apiVersion || manifest.kind !== PodMonitor.kind) {
  console.error(`not a PodMonitor: ${manifest.apiVersion} ${manifest.kind}`);
  process.exit(1);
}
try {
  new PodMonitor(manifest).validate();
} catch (error) {
  console.error(error.message);
  process.exit(1);
}
