// Validates every KEDA ScaledObject in the rendered manifests named on the command line:
// 1. against KEDA's own schema (the npm package @kubernetes-models/keda, generated from KEDA's
//    CRDs: types, required fields, formats);
// 2. strictly: a property the CRD does not declare (in `spec`, `scaleTargetRef`, a trigger) is
//    refused, as kubectl's server-side validation would (the generated schema lets them pass);
//    the property names are read from the same package's type declarations;
// 3. a `nats-jetstream` trigger's metadata against the scaler's parameters.
// Run from (and placed in) a directory where @kubernetes-models/keda and js-yaml are installed.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import yaml from "js-yaml";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const require = createRequire(join(process.cwd(), "noop.js"));
const types = join(dirname(require.resolve("@kubernetes-models/keda/package.json")), "keda.sh", "v1alpha1");
const declared = (type) =>
  new Set([...readFileSync(join(types, `${type}.d.ts`), "utf8").matchAll(/^\s+"([A-Za-z]+)"\??:/gm)].map((m) => m[1]));
const known = { spec: declared("ScaledObjectSpec"), scaleTargetRef: declared("ScaleTarget"), trigger: declared("ScaleTriggers") };
// The nats-jetstream scaler's trigger metadata (KEDA 2.x).
const jetstream = new Set([
  "natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold",
  "activationLagThreshold", "useHttps",
]);

function unknown(object, allowed, where) {
  return Object.keys(object ?? {}).filter((k) => !allowed.has(k)).map((k) => `${where}.${k} is not a known property`);
}

let checked = 0;
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (!doc || doc.kind !== "ScaledObject") continue;
    checked++;
    const name = `${file}: ScaledObject/${doc.metadata?.name}`;
    const problems = [];
    try {
      new ScaledObject(doc).validate();
    } catch (e) {
      problems.push(e.message);
    }
    problems.push(...unknown(doc.spec, known.spec, "spec"));
    problems.push(...unknown(doc.spec?.scaleTargetRef, known.scaleTargetRef, "spec.scaleTargetRef"));
    (doc.spec?.triggers ?? []).forEach((t, i) => {
      problems.push(...unknown(t, known.trigger, `spec.triggers[${i}]`));
      if (t.type === "nats-jetstream") {
        problems.push(...unknown(t.metadata, jetstream, `spec.triggers[${i}].metadata`));
        for (const required of ["natsServerMonitoringEndpoint", "account", "stream", "consumer"]) {
          if (!t.metadata?.[required]) problems.push(`spec.triggers[${i}].metadata.${required} is required`);
        }
      }
    });
    if (problems.length) {
      failed++;
      for (const p of problems) console.error(`${name}: ${p}`);
    } else {
      console.log(`${name} passed against KEDA's schema (strict)`);
    }
  }
}
if (checked === 0) {
  console.error("no ScaledObject found");
  process.exit(1);
}
process.exit(failed ? 1 : 0);
