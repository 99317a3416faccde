// Loaded with `node --import ./test/module-probe.mjs …`: records every module URL the
// process resolves into $MODULE_PROBE_OUT, one a line, and at exit the Node built-ins it
// loaded, as `builtin:<id>` lines (test/cli-complete.test.ts reads them to check which
// modules a CLI command loads).
import { appendFileSync } from "node:fs";
import { register } from "node:module";

const out = process.env.MODULE_PROBE_OUT ?? "/dev/null";
register(
  `data:text/javascript,${encodeURIComponent(`
import { appendFileSync } from "node:fs";
export async function resolve(specifier, context, next) {
  const result = await next(specifier, context);
  appendFileSync(${JSON.stringify(out)}, result.url + "\\n");
  return result;
}`)}`,
);
process.on("exit", () => {
  const builtins = process.moduleLoadList
    .filter((m) => m.startsWith("NativeModule "))
    .map((m) => `builtin:${m.slice("NativeModule ".length)}\n`);
  appendFileSync(out, builtins.join(""));
});
