// Validates the Prometheus Operator objects (monitoring.coreos.com/v1: ServiceMonitor, ...) in
// the given YAML files with the @kubernetes-models/prometheus-operator schemas; other objects
// are left to kubernetes-validate. Exit 1 when any fails. Installed by scripts/k8s-tools.sh.
//   node validate-crds.mjs FILE.yaml...
import fs from "node:fs";
import yaml from "js-yaml";
import * as models from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

let checked = 0;
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc || doc.apiVersion !== "monitoring.coreos.com/v1") continue;
    checked++;
    const name = `${file}: ${doc.kind}/${doc.metadata?.name}`;
    const Model = models[doc.kind];
    if (!Model) {
      failed++;
      console.log(`ERROR ${name}: unknown kind`);
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`OK ${name}`);
    } catch (e) {
      failed++;
      console.log(`ERROR ${name}: ${e.message}`);
    }
  }
}
console.log(`${checked - failed} of ${checked} monitoring.coreos.com objects valid`);
process.exit(failed ? 1 : 0);
