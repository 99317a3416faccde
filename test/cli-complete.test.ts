import { execFile, execFileSync, spawn } from "node:child_process";
import {
  chmodSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { isBuiltin } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Code } from "@connectrpc/connect";
import { build } from "esbuild";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bundleCli, cliBundleOptions, serverInputs } from "../scripts/bundle-cli.js";
import { commandKey } from "../src/cli/bundle-loader.js";
import { describeClientError } from "../src/cli/client-errors.js";
import { EXIT } from "../src/cli/exit-codes.js";
import { CLIENT_ENV, RateLimitedError } from "../src/sdk/index.js";
import { type CliResult, runCli } from "./cli-helpers.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const PROBE = join(ROOT, "test", "module-probe.mjs");
const ADMIN_TOKEN = "cli-static-admin-token-0123456789-abcdef";
/** Modules no client command may load: the server's storage, drivers, Redis, logger and configuration. */
const SERVER_MODULES = [
  /@mikro-orm/,
  /node_modules\/pg\//,
  /better-sqlite3/,
  /ioredis/,
  /node_modules\/pino\//,
  /src\/config\.ts/,
  /src\/storage\//,
];

/**
 * The CLI's completeness and consistency (issue 23): user commands, completion scripts,
 * the RPC's own JSON field names, exit codes, flag names in hints, ids that must not be
 * empty, files not overwritten without --force, and what each command loads.
 */
describe("the tessera CLI, complete and consistent", { timeout: 300_000 }, () => {
  let ts: TestServer;
  let env: Record<string, string>;
  const tessera = (args: string[], extra: Record<string, string> = {}, input = "") =>
    runCli(args, { ...env, ...extra }, input);
  const json = <T>(r: CliResult): T => {
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as T;
  };

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { admin: { token: ADMIN_TOKEN } });
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-cli-complete-")),
      TESSERA_SERVER: `127.0.0.1:${ts.server.port}`,
      TESSERA_CA_FILE: join(ts.certs.dir, "ca.crt"),
    };
    const r = await tessera(["login", "-u", "admin", "--password-stdin"], {}, `${ADMIN_PASSWORD}\n`);
    expect(r.code, r.stderr).toBe(0);
  }, 300_000);
  afterAll(async () => {
    await ts?.close();
  });

  it("answers whoami for the static admin token given as TESSERA_TOKEN", async () => {
    const me = json<{ id: string; permissions: string[] }>(
      await tessera(["whoami", "--output", "json"], { TESSERA_TOKEN: ADMIN_TOKEN }),
    );
    expect(me.id).toBe("admin-token");
    expect(me.permissions).toEqual(["*"]);
  });

  it("prints a created API key under the RPC's own field name `key`", async () => {
    const created = json<Record<string, unknown>>(
      await tessera(["api-key", "create", "--name", "cli-key", "--output", "json"]),
    );
    expect(created.key).toMatch(/^tsr_key_/);
    expect(created).not.toHaveProperty("token");
  });

  it("manages a user: create, list, get, update, disable, enable, reset-password, delete", async () => {
    const u = json<{ id: string; username: string; permissions: string[] }>(
      await tessera(
        ["user", "create", "carol", "--scopes", "cluster:read", "--password-stdin", "--output", "json"],
        {},
        "carol's first password\n",
      ),
    );
    expect(u.username).toBe("carol");
    expect(u.permissions).toEqual(["cluster:read"]);
    const list = json<{ users: { id: string }[] }>(await tessera(["user", "list", "--output", "json"]));
    expect(list.users.map((x) => x.id)).toContain(u.id);
    expect(json<{ id: string }>(await tessera(["user", "get", u.id, "--output", "json"])).id).toBe(u.id);
    const updated = json<{ permissions: string[] }>(
      await tessera(["user", "update", u.id, "--scopes", "cluster:read,cluster:write", "--output", "json"]),
    );
    expect(updated.permissions.sort()).toEqual(["cluster:read", "cluster:write"]);
    expect(
      json<{ disabled: boolean }>(await tessera(["user", "disable", u.id, "--output", "json"])).disabled,
    ).toBe(true);
    const refused = await tessera(
      ["login", "-u", "carol", "--password-stdin", "--profile", "carol"],
      {},
      "carol's first password\n",
    );
    expect(refused.code).toBe(EXIT.unauthenticated);
    expect(
      json<{ disabled: boolean }>(await tessera(["user", "enable", u.id, "--output", "json"])).disabled,
    ).toBe(false);
    const reset = await tessera(
      ["user", "reset-password", u.id, "--password-stdin"],
      {},
      "carol's second password\n",
    );
    expect(reset.code, reset.stderr).toBe(0);
    const old = await tessera(
      ["login", "-u", "carol", "--password-stdin", "--profile", "carol"],
      {},
      "carol's first password\n",
    );
    expect(old.code).toBe(EXIT.unauthenticated);
    const fresh = await tessera(
      ["login", "-u", "carol", "--password-stdin", "--profile", "carol"],
      {},
      "carol's second password\n",
    );
    expect(fresh.code, fresh.stderr).toBe(0);
    expect((await tessera(["user", "delete", u.id])).code).toBe(0);
    expect((await tessera(["user", "get", u.id])).code).toBe(EXIT.notFound);
  }, 600_000);

  it("treats an empty or malformed id as a usage error, creating nothing", async () => {
    for (const args of [
      ["app", "create", "stray", "--tenant", ""],
      ["app", "create", "stray", "--tenant", "a b"],
      ["user", "get", ""],
      ["machine-user", "list", "--tenant", " "],
    ]) {
      const r = await tessera(args);
      expect(r.code, args.join(" ")).toBe(EXIT.usage);
      expect(r.stderr).toMatch(/must not be empty|malformed/);
    }
    const apps = json<{ applications: { name: string }[] }>(
      await tessera(["app", "list", "--output", "json"]),
    );
    expect(apps.applications.map((a) => a.name)).not.toContain("stray");
  });

  it("reports an existing name with its own exit code", async () => {
    expect((await tessera(["tenant", "create", "dup-tenant"])).code).toBe(0);
    expect((await tessera(["tenant", "create", "dup-tenant"])).code).toBe(EXIT.alreadyExists);
  });

  it("names the CLI flag, not the SDK option, when the server's certificate cannot be verified", async () => {
    const r = await tessera(["whoami"], { TESSERA_CA_FILE: "", TESSERA_TOKEN: ADMIN_TOKEN });
    expect(r.code).toBe(EXIT.unavailable);
    expect(r.stderr).toContain("--ca-file");
    expect(r.stderr).not.toMatch(/\bcaFile\b/);
  });

  it("maps a rate-limited call to exit 7 and shows its Retry-After", () => {
    const err = new RateLimitedError("Too many requests", {
      code: Code.ResourceExhausted,
      reason: "RATE_LIMITED",
      retryAfter: 17,
    });
    const d = describeClientError(err, EXIT)!;
    expect(d.code).toBe(7);
    expect(d.message).toContain("Retry-After: 17");
  });

  it("refuses to overwrite a client key unless --force", async () => {
    const out = mkdtempSync(join(tmpdir(), "tessera-cli-certs-"));
    const certEnv = { TESSERA_CERT_DIR: ts.certs.dir };
    expect((await tessera(["certs", "client", "one", "--out", out], certEnv)).code).toBe(0);
    const key = readFileSync(join(out, "client.key"), "utf8");
    const again = await tessera(["certs", "client", "one", "--out", out], certEnv);
    expect(again.code).toBe(EXIT.usage);
    expect(again.stderr).toContain("--force");
    expect(readFileSync(join(out, "client.key"), "utf8")).toBe(key);
    expect((await tessera(["certs", "client", "one", "--out", out, "--force"], certEnv)).code).toBe(0);
    expect(readFileSync(join(out, "client.key"), "utf8")).not.toBe(key);
  });

  it("exits 2 (usage), not 1, for a bad certs client argument or a cert folder without a CA", async () => {
    const out = mkdtempSync(join(tmpdir(), "tessera-cli-certs-"));
    const certEnv = { TESSERA_CERT_DIR: ts.certs.dir };
    for (const [args, says] of [
      [["certs", "client", "", "--out", join(out, "a")], "client name must be"],
      [
        ["certs", "client", "b", "--out", join(out, "b"), "--san-uri", "not a uri"],
        "not an absolute ASCII URI",
      ],
      [["certs", "client", "c", "--out", join(out, "c"), "--san-uri", ""], "not an absolute ASCII URI"],
      [["certs", "client", "d", "--out", join(out, "d"), "--cert-dir", out], "ca.key not found"],
    ] as const) {
      const r = await tessera([...args], certEnv);
      expect(r.code, args.join(" ")).toBe(EXIT.usage);
      expect(r.stderr).toContain(says);
    }
    expect(readdirSync(out)).toEqual([]);
  });

  it("prints completion scripts for bash, zsh and fish from the command tree", async () => {
    const bash = await tessera(["completion", "bash"]);
    expect(bash.code).toBe(0);
    const file = join(env.HOME!, "completion.bash");
    writeFileSync(file, bash.stdout);
    execFileSync("bash", ["-n", file], { timeout: 30_000 });
    // Completing `tessera user re` offers reset-password.
    const offered = execFileSync(
      "bash",
      [
        "-c",
        `source ${file}; COMP_WORDS=(tessera user re); COMP_CWORD=2; _tessera_complete; echo "\${COMPREPLY[@]}"`,
      ],
      { timeout: 30_000 },
    )
      .toString()
      .trim();
    expect(offered).toBe("reset-password");
    expect((await tessera(["completion", "zsh"])).stdout).toContain("bashcompinit");
    expect((await tessera(["completion", "fish"])).stdout).toContain("-a reset-password");
    expect((await tessera(["completion", "tcsh"])).code).toBe(EXIT.usage);
  });

  it("says an API key, not a API key, in its help", async () => {
    const help = (await tessera(["api-key", "--help"])).stdout;
    expect(help).toContain("create an API key acting as you");
    expect(help).toContain("revoke an API key;");
    expect(help).not.toMatch(/\ba API\b/);
  });

  it("names the SDK's client environment variables in --help", async () => {
    const help = (await tessera(["--help"])).stdout;
    for (const name of [
      CLIENT_ENV.token,
      CLIENT_ENV.server,
      CLIENT_ENV.certFolder,
      CLIENT_ENV.caFile,
      CLIENT_ENV.profile,
    ])
      expect(help).toContain(name);
  });

  it("bundles the command line into one script, the runtimes inlined, no server module", async () => {
    const result = await build({ ...cliBundleOptions(ROOT, join(env.HOME!, "bundle-check")), write: false });
    const meta = result.metafile!;
    const inputs = Object.keys(meta.inputs);
    // What makes it worth a bundle: commander, the SDK, the generated code and the Connect runtime are in it.
    for (const wanted of [
      "src/cli/program.ts",
      "src/cli/actions/session.ts",
      "src/cli/actions/audit.ts",
      "src/sdk/user-api-core.ts",
      "gen/tessera/v1/user_service_pb.ts",
      "node_modules/commander/",
      "node_modules/@connectrpc/connect-node/",
      "node_modules/@bufbuild/protobuf/",
    ])
      expect(
        inputs.some((i) => i.includes(wanted)),
        wanted,
      ).toBe(true);
    expect(serverInputs(meta)).toEqual([]);
    expect(result.outputFiles!.map((f) => f.path)).toEqual([join(env.HOME!, "bundle-check", "tessera.cjs")]);
    // A script node:vm runs (no `import`, which a vm script cannot do without a flag): it
    // requires Node's built-ins only, and the server commands get the compiled server
    // modules beside it through the loader's import function.
    const text = result.outputFiles![0]!.text;
    // ASCII only: one other character and V8 holds all ~900 kB as a two-byte string.
    expect([...text].filter((c) => c.charCodeAt(0) > 0x7f)).toEqual([]);
    expect(text).not.toMatch(/\bimport\(\s*["'`]/);
    const required = [...text.matchAll(/\brequire\("([^"]+)"\)/g)].map((m) => m[1]!);
    expect(required.filter((r) => !isBuiltin(r))).toEqual([]);
    const serverImports = [...text.matchAll(/__tesseraImport\("([^"]+)"\)/g)].map((m) => m[1]!);
    expect(serverImports).toContain("../server.js");
    for (const spec of serverImports)
      expect(existsSync(join(ROOT, "src", "cli", spec.replace(/\.js$/, ".ts"))), spec).toBe(true);
  });

  it("keys the code cache by the command, not by option values", () => {
    expect(commandKey(["whoami"])).toBe("whoami");
    expect(commandKey(["--profile", "prod", "--output", "json", "token", "list"])).toBe("token");
    expect(commandKey(["--help"])).toBe("help");
    expect(commandKey([])).toBe("help");
    expect(commandKey(["../../etc/passwd"])).toBe("other");
  });

  it("runs compiled from the bundle with a private code cache: whoami loads no package module nor Node's undici, a cache it cannot trust is not used, and a failure keeps its exit code", async () => {
    // The layout of a build: dist/src/main.js and its loader (compiled alone: they only
    // find and run the bundle) and dist/cli/.
    const dir = mkdtempSync(join(tmpdir(), "tessera-cli-bundle-"));
    writeFileSync(join(dir, "package.json"), JSON.stringify({ type: "module" }));
    await bundleCli(ROOT, join(dir, "dist", "cli"));
    await build({
      absWorkingDir: ROOT,
      entryPoints: ["src/main.ts", "src/cli/bundle-loader.ts"],
      outbase: "src",
      outdir: join(dir, "dist", "src"),
      format: "esm",
      platform: "node",
      logLevel: "warning",
    });
    const home = mkdtempSync(join(tmpdir(), "tessera-cli-cache-"));
    const run = (args: string[], extra: Record<string, string> = {}) => {
      const out = join(dir, `probe-${args.join("-")}.txt`);
      return new Promise<{ code: number; stdout: string; stderr: string; loaded: string[] }>((resolve) => {
        execFile(
          process.execPath,
          ["--import", PROBE, join(dir, "dist", "src", "main.js"), ...args],
          {
            env: {
              PATH: process.env.PATH ?? "/usr/bin",
              ...env,
              XDG_CACHE_HOME: home,
              ...extra,
              MODULE_PROBE_OUT: out,
            },
          },
          (err, stdout, stderr) =>
            resolve({
              code: err ? Number((err as { code?: unknown }).code) : 0,
              stdout,
              stderr,
              loaded: readFileSync(out, "utf8").split("\n"),
            }),
        );
      });
    };
    const whoami = async () => {
      const me = await run(["whoami", "--output", "json"], { TESSERA_TOKEN: ADMIN_TOKEN });
      expect(me.code, me.stderr).toBe(0);
      expect((JSON.parse(me.stdout) as { id: string }).id).toBe("admin-token");
      return me;
    };
    const me = await whoami();
    const files = me.loaded.filter((l) => l.startsWith("file:"));
    expect(files.sort()).toEqual([
      `file://${dir}/dist/src/cli/bundle-loader.js`,
      `file://${dir}/dist/src/main.js`,
    ]);
    expect(me.loaded.filter((l) => l.includes("undici"))).toEqual([]);

    // The first run wrote whoami's cache, private to the user; the second one used it (a
    // cache that is used is not written again).
    const cacheDir = join(home, "tessera", "cli");
    expect(statSync(cacheDir).mode & 0o777).toBe(0o700);
    const [cacheName, ...others] = readdirSync(cacheDir);
    expect(others).toEqual([]);
    expect(cacheName).toMatch(new RegExp(`^[0-9a-f]{32}-${process.version}-${process.arch}-whoami\\.bin$`));
    const cacheFile = join(cacheDir, cacheName!);
    const first = statSync(cacheFile);
    expect(first.mode & 0o777).toBe(0o600);
    await whoami();
    expect(statSync(cacheFile).ino).toBe(first.ino);
    // A cache others could have written is not run, and is replaced by a private one.
    chmodSync(cacheFile, 0o666);
    await whoami();
    expect(statSync(cacheFile).mode & 0o777).toBe(0o600);
    expect(statSync(cacheFile).ino).not.toBe(first.ino);
    // Another build's cache of the same command is removed when this one's is written.
    const stale = join(cacheDir, cacheName!.replace(/^[0-9a-f]{32}/, "0".repeat(32)));
    writeFileSync(stale, "an older build's", { mode: 0o600 });
    // Garbage in its place is rejected by V8 and replaced too.
    writeFileSync(cacheFile, "not a code cache", { mode: 0o600 });
    await whoami();
    expect(statSync(cacheFile).size).toBeGreaterThan(1000);
    expect(existsSync(stale)).toBe(false);
    // Off means neither read nor written.
    const off = mkdtempSync(join(tmpdir(), "tessera-cli-nocache-"));
    const r = await run(["whoami"], {
      TESSERA_TOKEN: ADMIN_TOKEN,
      XDG_CACHE_HOME: off,
      TESSERA_CLI_CODE_CACHE: "off",
    });
    expect(r.code, r.stderr).toBe(0);
    expect(readdirSync(off)).toEqual([]);

    const tokens = await run(["token", "list", "--output", "json"]);
    expect(tokens.code, tokens.stderr).toBe(0);
    expect(JSON.parse(tokens.stdout)).toHaveProperty("tokens");
    const missing = await run(["user", "get", "00000000-0000-4000-8000-000000000000"]);
    expect(missing.code, missing.stderr).toBe(EXIT.notFound);
    expect(missing.stderr).toMatch(/NOT_FOUND/);
    const help = await run(["--help"]);
    expect(help.code).toBe(0);
    expect(help.stdout).toContain("whoami");
    // A failed command leaves no cache behind (it would hold its parsing only).
    expect(readdirSync(cacheDir).some((f) => f.endsWith("-user.bin"))).toBe(false);
  });

  it("stops silently with 141, as git and gh do, when stdout is closed early", async () => {
    for (const args of [["--help"], ["completion", "bash"]]) {
      const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, [join(ROOT, "bin", "tessera.js"), ...args], {
          env: { PATH: process.env.PATH ?? "/usr/bin", ...env },
          stdio: ["ignore", "pipe", "pipe"],
        });
        // The reader leaves before the first line is written (`tessera --help | head -0`).
        child.stdout.destroy();
        let stderr = "";
        child.stderr.on("data", (d: Buffer) => {
          stderr += d.toString();
        });
        child.on("close", (code) => resolve({ code, stderr }));
      });
      expect(r, args.join(" ")).toEqual({ code: EXIT.brokenPipe, stderr: "" });
    }
    expect(EXIT.brokenPipe).toBe(141);
  });

  it("loads no server module for --help, whoami and token list", async () => {
    for (const args of [["--help"], ["whoami"], ["token", "list"]]) {
      const out = join(env.HOME!, `probe-${args.join("-")}.txt`);
      // Asynchronously: the test server runs in this process and must answer meanwhile.
      const r = await new Promise<{ code: number; stderr: string }>((resolve) => {
        execFile(
          process.execPath,
          ["--import", PROBE, join(ROOT, "bin", "tessera.js"), ...args],
          { env: { PATH: process.env.PATH ?? "/usr/bin", ...env, MODULE_PROBE_OUT: out } },
          (err, _stdout, stderr) => resolve({ code: err ? 1 : 0, stderr }),
        );
      });
      expect(r.code, r.stderr).toBe(0);
      const loaded = readFileSync(out, "utf8");
      expect(loaded, args.join(" ")).toContain("src/main.ts");
      for (const re of SERVER_MODULES) expect(loaded, `${args.join(" ")} loaded ${re}`).not.toMatch(re);
    }
  });
});
