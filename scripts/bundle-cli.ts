// Bundles the command line (src/cli/program.ts: commander, the command trees and, in
// chunks of their own, each command group's actions with the SDK, the generated
// descriptors of its service, the Connect and protobuf runtimes and yaml) into ES modules
// in dist/cli/: tessera.js, which src/main.ts loads when compiled, and the chunks it
// imports when a command runs. Node 20 loads one file in a fraction of the time of the
// several hundred modules it replaces, and `tessera whoami` loads the chunks it needs
// only. The server's modules stay out: `serve` and the other server commands import them
// from dist/src/ when they run. Run by `npm run build` after tsc.
import { rmSync } from "node:fs";
import { dirname, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { type BuildOptions, build, type Metafile, type Plugin } from "esbuild";

/** The bundle's folder and entry, relative to the repository (src/main.ts looks for the entry there). */
export const CLI_BUNDLE_DIR = "dist/cli";
export const CLI_BUNDLE = `${CLI_BUNDLE_DIR}/tessera.js`;

/**
 * Inputs that must never be in the bundle: the server's storage, drivers, Redis, logger,
 * configuration and credential handling (only src/auth/scopes.ts is shared with clients).
 */
export const SERVER_ONLY: RegExp[] = [
  /(^|\/)src\/(storage|services|interceptors)\//,
  /(^|\/)src\/auth\/(?!scopes\.ts$)/,
  /(^|\/)src\/(config|server)\.ts$/,
  /node_modules\/(@mikro-orm|knex|pg|pg-[^/]+|ioredis|better-sqlite3|pino|rate-limiter-flexible)\//,
];

/**
 * What the server commands (src/cli/server-commands.ts) import outside src/cli/ stays a
 * module of the compiled tree, imported at run time from dist/src/: every output file is
 * in dist/cli/, so `../src/<path>.js` names it.
 */
function serverModulesExternal(root: string): Plugin {
  const importer = resolve(root, "src/cli/server-commands.ts");
  return {
    name: "server-modules-external",
    setup(b) {
      b.onResolve({ filter: /^\.\.\// }, (args) => {
        if (args.importer !== importer) return undefined;
        const target = resolve(dirname(args.importer), args.path);
        return { path: `../${relative(root, target)}`, external: true };
      });
    },
  };
}

/**
 * Modules of the bundle that load a dependency when first used rather than with the
 * chunk, each a replacement for one import of one importer: commander's
 * `child_process` (with `net` and `dgram` behind it: ~10 ms of CPU), which it uses only
 * to run external subcommands, which tessera has none of; and the SDK's `yaml` (~10 ms),
 * which only a command that reads or writes the credentials file needs (`whoami` with
 * TESSERA_TOKEN and TESSERA_SERVER reads none). `require()` in a bundled ES module is
 * esbuild's: the CommonJS module it names is in the bundle and runs at the first call.
 */
const DEFERRED: { importer: RegExp; path: RegExp; contents: string }[] = [
  {
    importer: /node_modules\/commander\/lib\/command\.js$/,
    path: /^node:child_process$/,
    contents: `module.exports = { spawn: (...args) => require("node:child_process").spawn(...args) };`,
  },
  {
    importer: /src\/sdk\/credentials\.ts$/,
    path: /^yaml$/,
    contents: [
      "let yaml;",
      'const load = () => (yaml ??= require("yaml"));',
      "export const parse = (...args) => load().parse(...args);",
      "export const stringify = (...args) => load().stringify(...args);",
    ].join("\n"),
  },
];

function deferred(): Plugin {
  return {
    name: "deferred",
    setup(b) {
      b.onResolve({ filter: /^(node:child_process|yaml)$/ }, (args) => {
        const i = DEFERRED.findIndex((d) => d.importer.test(args.importer) && d.path.test(args.path));
        return i < 0 ? undefined : { path: String(i), namespace: "deferred" };
      });
      b.onLoad({ filter: /.*/, namespace: "deferred" }, (args) => ({
        contents: DEFERRED[Number(args.path)]!.contents,
        loader: "js",
        resolveDir: b.initialOptions.absWorkingDir ?? process.cwd(),
      }));
    },
  };
}

/** esbuild's options for the CLI bundle, written to `outdir` under `root`. */
export function cliBundleOptions(root: string, outdir = CLI_BUNDLE_DIR): BuildOptions {
  return {
    absWorkingDir: root,
    entryPoints: [{ in: "src/cli/program.ts", out: "tessera" }],
    outdir,
    // One chunk per command group (the dynamic imports in client-commands.ts) and chunks
    // for what groups share, beside the entry: the server modules' paths above rely on it.
    splitting: true,
    chunkNames: "[name]-[hash]",
    bundle: true,
    format: "esm",
    platform: "node",
    target: "node20",
    // The CLI's own `Headers` for the Connect runtime (see src/cli/lean-headers.ts).
    inject: ["src/cli/lean-headers.ts"],
    // Some bundled packages are CommonJS (commander, yaml's Node build) and call require()
    // for Node's built-ins, which an ES module has no binding for.
    banner: {
      js: 'import { createRequire as __tesseraCreateRequire } from "node:module";\nconst require = __tesseraCreateRequire(import.meta.url);',
    },
    plugins: [serverModulesExternal(root), deferred()],
    metafile: true,
    logLevel: "warning",
  };
}

/** The bundle's inputs (repository-relative paths) that are server modules. */
export function serverInputs(metafile: Metafile): string[] {
  return Object.keys(metafile.inputs).filter((input) => SERVER_ONLY.some((re) => re.test(input)));
}

/** Build the bundle; fails if a server module found its way into it. */
export async function bundleCli(root: string, outdir = CLI_BUNDLE_DIR): Promise<Metafile> {
  // The chunks' names change with their contents: a previous build's must not stay beside them.
  rmSync(resolve(root, outdir), { recursive: true, force: true });
  const result = await build(cliBundleOptions(root, outdir));
  const leaked = serverInputs(result.metafile!);
  if (leaked.length > 0) throw new Error(`the CLI bundle contains server modules: ${leaked.join(", ")}`);
  return result.metafile!;
}

// `tsx scripts/bundle-cli.ts [outdir]`: the bench passes its own build's dist/cli (an
// older bench passes a file in it, dist/cli/client.bundle.js: its folder is meant).
if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const out = process.argv[2];
  await bundleCli(
    fileURLToPath(new URL("..", import.meta.url)),
    out === undefined ? undefined : out.endsWith(".js") ? dirname(out) : out,
  );
}
