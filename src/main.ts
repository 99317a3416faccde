import { existsSync } from "node:fs";

// The `tessera` entry point (bin/tessera.js imports it; `node dist/src/main.js …` runs it).
// It holds no command: it loads the command line, src/cli/program.ts, from the bundle the
// build makes of it (dist/cli/tessera.js, one ES module with a chunk per command group,
// scripts/bundle-cli.ts) when running compiled, since Node 20 loads one file in a fraction
// of the time of the hundreds of modules it replaces; from the separate modules otherwise
// (the TypeScript sources through tsx, or a compiled tree without the bundle).

/** The command line's module. */
export type Program = typeof import("./cli/program.js");

/**
 * The bundle, seen from this module compiled into dist/src/. Run from the TypeScript
 * sources this module's URL ends in .ts and the bundle is never used: it would be a
 * stale build of other sources.
 */
const BUNDLE = new URL("../cli/tessera.js", import.meta.url);
const COMPILED = import.meta.url.endsWith(".js");

/** Load the command line: the bundle when running compiled and the build made one. */
export function loadProgram(): Promise<Program> {
  return COMPILED && existsSync(BUNDLE)
    ? (import(BUNDLE.href) as Promise<Program>)
    : import("./cli/program.js");
}

/** Run the CLI with `argv` (as process.argv); resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  return (await loadProgram()).main(argv);
}

const isEntry = process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isEntry) {
  main(process.argv).then((code) => {
    // A failure ends the process now: a pool, timer or half-started server left behind by
    // a failed start must not keep alive a process that serves nothing.
    if (code !== 0) process.exit(code);
    // `serve` keeps running; other commands exit with their code.
    if (!process.argv.includes("serve")) process.exitCode = code;
  });
}
