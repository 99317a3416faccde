import { readFileSync } from "node:fs";

// The `tessera` entry point (bin/tessera.js imports it; `node dist/src/main.js …` runs it).
// It holds no command: running compiled, it runs the command line (src/cli/program.ts)
// from the bundle the build makes of it (dist/cli/tessera.cjs, one script,
// scripts/bundle-cli.ts) with a V8 code cache (src/cli/bundle-loader.ts), since Node 20
// loads and compiles one cached script in a fraction of the time of the hundreds of
// modules it replaces; from the separate modules otherwise (the TypeScript sources
// through tsx, or a compiled tree without the bundle).

/** The command line's module. */
export type Program = typeof import("./cli/program.js");

/**
 * The bundle, seen from this module compiled into dist/src/. Run from the TypeScript
 * sources this module's URL ends in .ts and the bundle is never used: it would be a
 * stale build of other sources.
 */
const BUNDLE = new URL("../cli/tessera.cjs", import.meta.url);
const COMPILED = import.meta.url.endsWith(".js");

/** The bundle's text, or null when this is not a compiled tree with a bundle. */
function bundleSource(): string | null {
  if (!COMPILED) return null;
  try {
    return readFileSync(BUNDLE, "utf8");
  } catch {
    return null;
  }
}

/**
 * The server commands' imports of the compiled tree, which the bundle leaves out: their
 * specifiers are relative to src/cli/server-commands.ts, i.e. to dist/src/cli/ here.
 */
function serverImport(specifier: string): Promise<unknown> {
  return import(new URL(specifier, new URL("./cli/", import.meta.url)).href);
}

/** Run the CLI with `argv` (as process.argv); resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  const source = bundleSource();
  if (source !== null) {
    const { runBundle } = await import("./cli/bundle-loader.js");
    return runBundle(BUNDLE, source, argv, serverImport);
  }
  return (await import("./cli/program.js")).main(argv);
}

/**
 * End the process the way `tessera` ends: a failure at once with its code; `serve` keeps
 * running; any other command exits as soon as what it printed is written. It does not wait
 * for the event loop to drain: a client's HTTP/2 session closing, a timer or Node's own
 * teardown of the heap would only delay the prompt (whoami's output is complete by then).
 */
export function finish(code: number, argv: string[]): void {
  // A failure ends the process now: a pool, timer or half-started server left behind by
  // a failed start must not keep alive a process that serves nothing.
  if (code !== 0) process.exit(code);
  if (argv.includes("serve")) return;
  process.exitCode = code;
  // Written to a pipe or file, stdout may still hold output: each stream calls back once
  // what was written before is out. A stream that failed (its reader left) is left to its
  // error listener (exit 141, program.ts) and the process ends as it would have.
  let pending = 2;
  const done = (err?: Error | null) => {
    if (!err && --pending === 0) process.exit(code);
  };
  process.stdout.write("", done);
  process.stderr.write("", done);
}

const isEntry = process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isEntry) main(process.argv).then((code) => finish(code, process.argv));
