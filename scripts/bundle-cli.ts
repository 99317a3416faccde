// Bundles the client commands (src/cli/client-entry.ts and all it imports: the SDK, the
// generated descriptors, the Connect and protobuf runtimes, yaml) into one ES module,
// dist/cli/client.bundle.js. Node 20 loads that one file in about half the CPU time of
// the several hundred modules it replaces. Run by `npm run build` after tsc.
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { type BuildOptions, build, type Metafile } from "esbuild";

/** The bundle, relative to the repository (src/cli/client-module.ts looks for it there). */
export const CLIENT_BUNDLE = "dist/cli/client.bundle.js";

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

/** esbuild's options for the client bundle, written to `outfile` under `root`. */
export function clientBundleOptions(root: string, outfile = CLIENT_BUNDLE): BuildOptions {
  return {
    absWorkingDir: root,
    entryPoints: ["src/cli/client-entry.ts"],
    outfile,
    bundle: true,
    format: "esm",
    platform: "node",
    target: "node20",
    // Some bundled packages are CommonJS (yaml's Node build) and call require() for Node's
    // built-ins, which an ES module has no binding for.
    banner: {
      js: 'import { createRequire as __tesseraCreateRequire } from "node:module";\nconst require = __tesseraCreateRequire(import.meta.url);',
    },
    metafile: true,
    logLevel: "warning",
  };
}

/** The bundle's inputs (repository-relative paths) that are server modules. */
export function serverInputs(metafile: Metafile): string[] {
  return Object.keys(metafile.inputs).filter((input) => SERVER_ONLY.some((re) => re.test(input)));
}

/** Build the bundle; fails if a server module found its way into it. */
export async function bundleClientCli(root: string, outfile = CLIENT_BUNDLE): Promise<Metafile> {
  const result = await build(clientBundleOptions(root, outfile));
  const leaked = serverInputs(result.metafile!);
  if (leaked.length > 0) throw new Error(`the client bundle contains server modules: ${leaked.join(", ")}`);
  return result.metafile!;
}

// `tsx scripts/bundle-cli.ts [outfile]`: the bench passes the outfile of its own build folder.
if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await bundleClientCli(fileURLToPath(new URL("..", import.meta.url)), process.argv[2]);
}
