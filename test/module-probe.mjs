// Loaded with `node --import ./test/module-probe.mjs …`: records every module URL the
// process resolves into $MODULE_PROBE_OUT, one a line (test/cli-complete.test.ts reads it
// to check which modules a CLI command loads).
import { register } from "node:module";

register(
  `data:text/javascript,${encodeURIComponent(`
import { appendFileSync } from "node:fs";
export async function resolve(specifier, context, next) {
  const result = await next(specifier, context);
  appendFileSync(${JSON.stringify(process.env.MODULE_PROBE_OUT ?? "/dev/null")}, result.url + "\\n");
  return result;
}`)}`,
);
