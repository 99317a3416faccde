// Bundles the command line (src/cli/program.ts: commander, the command trees, each command
// group's actions with the SDK, the generated descriptors, the Connect and protobuf
// runtimes and yaml) into one CommonJS script, dist/cli/tessera.cjs, which src/main.ts runs
// compiled through node:vm with a V8 code cache (src/cli/bundle-loader.ts): Node 20 has no
// compile cache for modules, and one cached script starts in a fraction of the time of the
// hundreds of modules it replaces. The server's modules stay out: `serve` and the other
// server commands import them from dist/src/ when they run, through the import function
// the loader hands the script. Run by `npm run build` after tsc.
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { type BuildOptions, build, type Metafile, type Plugin } from "esbuild";

/** The bundle's folder and file, relative to the repository (src/main.ts looks for the file there). */
export const CLI_BUNDLE_DIR = "dist/cli";
export const CLI_BUNDLE_FILE = "tessera.cjs";
export const CLI_BUNDLE = `${CLI_BUNDLE_DIR}/${CLI_BUNDLE_FILE}`;

/** The bundle's first line, naming its contents for the code cache (src/cli/bundle-loader.ts). */
const BUNDLE_ID_PREFIX = "// tessera-cli-bundle ";

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
 * module of the compiled tree, imported at run time from dist/src/: a script run through
 * node:vm cannot `import()` (Node 20 needs --experimental-vm-modules for that), so these
 * imports call the function src/main.ts hands the script, `__tesseraImport`, with the same
 * specifier (relative to src/cli/, i.e. dist/src/cli/).
 */
function serverModulesImported(root: string): Plugin {
  const importer = resolve(root, "src/cli/server-commands.ts");
  return {
    name: "server-modules-imported",
    setup(b) {
      b.onLoad({ filter: /src\/cli\/server-commands\.ts$/ }, (args) => {
        if (args.path !== importer) return undefined;
        const text = readFileSync(args.path, "utf8");
        return {
          contents: text.replace(/\bimport\((["'])(\.\.\/[^"']+)\1\)/g, "__tesseraImport($1$2$1)"),
          loader: "ts",
        };
      });
    },
  };
}

/**
 * Modules of the bundle that load a dependency when first used rather than when the
 * bundle starts, each a replacement for one import of one importer: commander's
 * `child_process` (with `net` and `dgram` behind it: ~10 ms of CPU), which it uses only
 * to run external subcommands, which tessera has none of; and the SDK's `yaml` (~10 ms),
 * which only a command that reads or writes the credentials file needs (`whoami` with
 * TESSERA_TOKEN and TESSERA_SERVER reads none); and connect-node's `zlib`, which it loads
 * to offer gzip and brotli (Node's zlib is not in its start-up snapshot: the largest single
 * cost of `whoami`'s module start), though only a compressed message would use it and
 * neither side compresses messages this small. `require()` of a bundled module is
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
  {
    // compression.js takes promisify() of these four at load: functions with zlib's own
    // (callback) signature that load it at their first call keep its behaviour.
    importer: /@connectrpc\/connect-node\/dist\/(esm|cjs)\/compression\.js$/,
    path: /^node:zlib$/,
    contents: ["gzip", "gunzip", "brotliCompress", "brotliDecompress"]
      .map((f) => `export const ${f} = (...args) => require("node:zlib").${f}(...args);`)
      .join("\n"),
  },
];

function deferred(): Plugin {
  return {
    name: "deferred",
    setup(b) {
      b.onResolve({ filter: /^(node:child_process|node:zlib|yaml)$/ }, (args) => {
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
    entryPoints: ["src/cli/program.ts"],
    outfile: join(outdir, CLI_BUNDLE_FILE),
    bundle: true,
    // A script for node:vm (src/cli/bundle-loader.ts), which can compile it with a code cache.
    format: "cjs",
    platform: "node",
    target: "node20",
    // The command groups' `import()`s become calls of the bundle's own modules; the
    // built-ins' (readline) a require().
    supported: { "dynamic-import": false },
    // The CLI's own `Headers` for the Connect runtime (see src/cli/lean-headers.ts).
    inject: ["src/cli/lean-headers.ts"],
    plugins: [serverModulesImported(root), deferred()],
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
  // A previous build's files (an older layout's chunks among them) must not stay beside it.
  rmSync(resolve(root, outdir), { recursive: true, force: true });
  const result = await build({ ...cliBundleOptions(root, outdir), write: false });
  const leaked = serverInputs(result.metafile!);
  if (leaked.length > 0) throw new Error(`the CLI bundle contains server modules: ${leaked.join(", ")}`);
  const [out] = result.outputFiles!;
  // Its content hash on the first line: a code cache is used for these very contents only.
  const id = createHash("sha256").update(out!.contents).digest("hex");
  mkdirSync(dirname(out!.path), { recursive: true });
  writeFileSync(out!.path, `${BUNDLE_ID_PREFIX}${id}\n${out!.text}`);
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
