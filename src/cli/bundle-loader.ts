import {
  closeSync,
  fstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { createRequire } from "node:module";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Script } from "node:vm";

// Runs the command line's bundle (dist/cli/tessera.cjs, scripts/bundle-cli.ts) as one
// script compiled by V8 with a code cache. Node 20 has no compile cache for modules
// (`module.enableCompileCache` is Node ≥ 22.1), so every start parsed and compiled the
// bundle's ~900 kB again; with V8's cached data of a previous run of the same command the
// functions that run are deserialized instead (whoami: −125 M instructions of ~380 M above
// a bare start, bench/results/2026-12-05-cli-sdk.md).
//
// The cache is code that this process runs, so it is read only from the user's own cache
// folder (never from beside the bundle, which an installation may share between users),
// only when the folder and the file belong to the user and nobody else may write them, and
// only when it was made from this very bundle (the build's content hash is in its name)
// by this Node version. V8 checks its own version and flags and rejects anything else.

/** The bundle's first line: `// tessera-cli-bundle <sha256 of the rest>`, written by the build. */
export const BUNDLE_ID_PREFIX = "// tessera-cli-bundle ";

/** Set to `off` (or `0`) to run without a code cache (neither read nor written). */
export const CODE_CACHE_ENV = "TESSERA_CLI_CODE_CACHE";

/** The command line's exports, as src/cli/program.ts declares them. */
export type Program = typeof import("./program.js");

/** What the bundle gets besides CommonJS's own parameters: imports of the server modules it leaves out. */
export type ServerImport = (specifier: string) => Promise<unknown>;

/**
 * The folder for the cache: `$XDG_CACHE_HOME/tessera/cli`, else `~/.cache/tessera/cli`;
 * none where file ownership cannot be checked (no `process.getuid`, i.e. Windows).
 */
export function codeCacheDir(env: NodeJS.ProcessEnv = process.env): string | null {
  if (env[CODE_CACHE_ENV] === "off" || env[CODE_CACHE_ENV] === "0") return null;
  if (typeof process.getuid !== "function") return null;
  const base = env.XDG_CACHE_HOME || (env.HOME ? join(env.HOME, ".cache") : join(homedir(), ".cache"));
  return join(base, "tessera", "cli");
}

/**
 * The cache's key among commands: each top-level command (`whoami`, `token`, …) runs other
 * functions of the bundle, so each has its own cache; the first argument that is not an
 * option or an option's value names it. Anything unexpected shares one key: the key only
 * picks a file, it never changes what runs.
 */
export function commandKey(args: string[]): string {
  const withValue = new Set([
    "--profile",
    "--server",
    "--cert-folder",
    "--ca-file",
    "--protocol",
    "--output",
  ]);
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (withValue.has(a)) i++;
    else if (!a.startsWith("-")) return /^[a-z][a-z-]{0,31}$/.test(a) ? a : "other";
    else if (a === "--help" || a === "-h") return "help";
  }
  return "help";
}

/** True when `path` belongs to this user and neither group nor others may write it. */
function ownedPrivately(mode: number, uid: number): boolean {
  return uid === process.getuid!() && (mode & 0o022) === 0;
}

/** The cached data at `file`, or undefined when there is none or it cannot be trusted. */
function readCache(dir: string, file: string): Buffer | undefined {
  try {
    const d = statSync(dir);
    if (!d.isDirectory() || !ownedPrivately(d.mode, d.uid)) return undefined;
    const fd = openSync(file, "r");
    try {
      const f = fstatSync(fd);
      if (!f.isFile() || !ownedPrivately(f.mode, f.uid)) return undefined;
      return readFileSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    return undefined;
  }
}

/**
 * Write `data` to `file` atomically (a reader sees the old file or the whole new one), mode
 * 0600, and remove the same command's cache of other builds: an upgrade (or a rebuild)
 * leaves no stale file behind. (Two installations used in turn each lose their cache to
 * the other then, and run as they would without one.)
 */
function writeCache(dir: string, file: string, data: Buffer): boolean {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const d = statSync(dir);
    if (!ownedPrivately(d.mode, d.uid)) return false;
    const tmp = `${file}.${process.pid}.tmp`;
    writeFileSync(tmp, data, { mode: 0o600 });
    renameSync(tmp, file);
    const name = file.slice(dir.length + 1);
    const rest = name.slice(name.indexOf("-"));
    for (const other of readdirSync(dir))
      if (
        other !== name &&
        other.length === name.length &&
        other.endsWith(rest) &&
        /^[0-9a-f]{32}-/.test(other)
      )
        rmSync(join(dir, other), { force: true });
    return true;
  } catch {
    // A cache that cannot be written costs the next start its compile time, nothing else.
    return false;
  }
}

/** What {@link runBundle} did with the code cache (for tests). */
export interface CacheOutcome {
  file: string | null;
  used: boolean;
  written: boolean;
}

/**
 * Run the command line from the bundle at `bundleUrl` with `argv` (as process.argv);
 * resolves to the exit code. `serverImport` imports a module of the compiled tree for the
 * server commands, which the bundle leaves out (relative to dist/src/cli/).
 */
export async function runBundle(
  bundleUrl: URL,
  source: string,
  argv: string[],
  serverImport: ServerImport,
  onCache?: (outcome: CacheOutcome) => void,
): Promise<number> {
  const filename = fileURLToPath(bundleUrl);
  const id = source.startsWith(BUNDLE_ID_PREFIX)
    ? source.slice(BUNDLE_ID_PREFIX.length, source.indexOf("\n")).trim()
    : "";
  const key = commandKey(argv.slice(2));
  // `serve` runs for hours: what its start compiles is not worth a cache file.
  const dir = /^[0-9a-f]{64}$/.test(id) && key !== "serve" ? codeCacheDir() : null;
  const file = dir ? join(dir, `${id.slice(0, 32)}-${process.version}-${process.arch}-${key}.bin`) : null;
  const cachedData = dir && file ? readCache(dir, file) : undefined;
  // The CommonJS wrapper, on the same line as the bundle's first so that stack traces keep its line numbers.
  const script = new Script(
    `(function (exports, require, module, __filename, __dirname, __tesseraImport) {${source}\n})`,
    { filename, ...(cachedData ? { cachedData } : {}) },
  );
  const module = { exports: {} as Program };
  (script.runInThisContext() as (...a: unknown[]) => void)(
    module.exports,
    createRequire(filename),
    module,
    filename,
    dirname(filename),
    serverImport,
  );
  const code = await module.exports.main(argv);
  const used = cachedData !== undefined && !script.cachedDataRejected;
  // Only a command that succeeded writes one: a usage error's run would make a cache of its parsing only.
  const written =
    dir !== null && file !== null && !used && code === 0 && writeCache(dir, file, script.createCachedData());
  onCache?.({ file, used, written });
  return code;
}
