import { execFile, execFileSync } from "node:child_process";
import {
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType, MachineUserService } from "../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { createClientCertificate } from "../src/certs/dev-ca.js";
import { ADMIN_PASSWORD, DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { PACKAGE_WALKTHROUGHS } from "./walkthroughs.js";

const exec = promisify(execFile);
const REPO = fileURLToPath(new URL("..", import.meta.url));
const PACKAGE = join(REPO, "packages", "sdk");
const BIG = { maxBuffer: 32 * 1024 * 1024 };

/** What installing @tessera/sdk may bring: the Connect and protobuf runtimes, and yaml for profiles. */
const ALLOWED = ["@bufbuild/protobuf", "@connectrpc/connect", "@connectrpc/connect-node", "yaml"];

/** Where each walkthrough goes in the consumer project: examples/a/b.cjs → a-b.cjs. */
const copyName = (w: string) => w.replace(/^examples\//, "").replace("/", "-");
/** The TypeScript quick start again, in a folder that is an ES module project ("type": "module"). */
const TS_QUICK_START = "examples/sdk-ts/quick-start.ts";
const TSX = join(REPO, "node_modules", "tsx", "dist", "cli.mjs");

/** The Python walkthrough and the module it imports, copied beside each other (their names in the project). */
const PYTHON_FILES = {
  "python/walkthrough.py": "python-walkthrough.py",
  "python/tessera_user_api.py": "tessera_user_api.py",
};

/** Debian's interpreter, where python3-grpcio and python3-protobuf install (not a pyenv or venv one on PATH). */
const PYTHON = "/usr/bin/python3";

/** Why PYTHON cannot run the Python walkthrough, or undefined when it can. */
function pythonGrpcMissing(): string | undefined {
  try {
    execFileSync(PYTHON, ["-c", "import grpc, google.protobuf"], { stdio: "pipe", timeout: 60_000 });
    return undefined;
  } catch (err) {
    const why = (err as { stderr?: Buffer }).stderr?.toString().trim().split("\n").at(-1) ?? String(err);
    return `${PYTHON} cannot import grpc and google.protobuf (${why}): apt-get install python3-grpcio python3-protobuf (.ci/run does)`;
  }
}

const rootManifest = JSON.parse(readFileSync(join(REPO, "package.json"), "utf8")) as {
  version: string;
  dependencies: Record<string, string>;
};
const manifest = JSON.parse(readFileSync(join(PACKAGE, "package.json"), "utf8")) as {
  version: string;
  license: string;
  dependencies: Record<string, string>;
};

/** Every package name in `npm ls --all --json` output, at any depth. */
function treeNames(node: { dependencies?: Record<string, unknown> }, out = new Set<string>()): Set<string> {
  for (const [name, child] of Object.entries(node.dependencies ?? {})) {
    out.add(name);
    treeNames(child as { dependencies?: Record<string, unknown> }, out);
  }
  return out;
}

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name));
}

async function npmInstall(project: string, specs: string[]): Promise<void> {
  const args = ["install", ...specs, "--no-audit", "--no-fund", "--ignore-scripts", "--no-update-notifier"];
  try {
    // `npm ci` of this repository filled the npm cache with every runtime the package needs.
    await exec("npm", [...args, "--offline"], { cwd: project, ...BIG });
  } catch {
    await exec("npm", [...args, "--prefer-offline"], { cwd: project, ...BIG });
  }
}

/**
 * @tessera/sdk as a user gets it: packed from packages/sdk (which builds it from src/sdk
 * and gen/), installed into an empty project outside the repository, checked for what it
 * pulls in, then used from an ES module, from CommonJS, (its shipped protos) from grpc-js
 * and (its shipped descriptor set) from Python grpcio, by the README's walkthroughs under
 * examples/, against a real server over TLS.
 */
describe("the @tessera/sdk package", () => {
  let work: string;
  let project: string;
  let files: string[];
  let installMs: number;

  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), "tessera-sdk-pack-"));
    const packed = await exec("npm", ["pack", "--json", "--pack-destination", work], {
      cwd: PACKAGE,
      ...BIG,
    });
    const [result] = JSON.parse(packed.stdout.slice(packed.stdout.indexOf("["))) as [
      { filename: string; files: { path: string }[] },
    ];
    files = result.files.map((f) => f.path);

    project = join(work, "consumer");
    mkdirSync(project);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "consumer", private: true }));
    const started = performance.now();
    await npmInstall(project, [join(work, result.filename)]);
    installMs = performance.now() - started;
    console.log(`@tessera/sdk: npm install of the tarball took ${Math.round(installMs)} ms`);
  }, 300_000);

  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it("has the root package's version and licence, and its runtimes at the root's versions", () => {
    expect(manifest.version).toBe(rootManifest.version);
    expect(manifest.license).toBe("Apache-2.0");
    expect(Object.keys(manifest.dependencies).sort()).toEqual(ALLOWED);
    for (const [name, range] of Object.entries(manifest.dependencies))
      expect(range, name).toBe(rootManifest.dependencies[name]);
  });

  it("ships an ES module build, a CommonJS build, declarations, the protos and the licence, and no server module", () => {
    for (const f of [
      "dist/esm/src/sdk/index.js",
      "dist/esm/src/sdk/index.d.ts",
      "dist/cjs/src/sdk/index.js",
      "dist/cjs/src/sdk/index.d.ts",
      "dist/esm/src/sdk/server/index.js",
      "dist/cjs/src/sdk/server/index.js",
      "dist/cjs/package.json",
      "dist/esm/gen/tessera/v1/user_service_pb.js",
      "dist/cjs/gen/tessera/v1/user_service_pb.js",
      "proto/tessera/v1/user_service.proto",
      "proto/tessera/v1/options.proto",
      "proto/grpc/health/v1/health.proto",
      "proto/tessera.binpb",
      "LICENSE",
    ])
      expect(files, f).toContain(f);
    // Besides the SDK only src/auth/scopes and src/auth/repeated-authorization (no imports of
    // their own, shared so that the SDK and the server decide alike) are compiled in.
    const modules = files.filter((f) => /^dist\/(esm|cjs)\/src\/.*\.js$/.test(f));
    const outside = modules.filter(
      (f) =>
        !/^dist\/(esm|cjs)\/src\/(sdk\/(server\/)?[\w-]+|auth\/(scopes|repeated-authorization))\.js$/.test(f),
    );
    expect(outside).toEqual([]);
    expect(files.some((f) => f.endsWith(".ts") && !f.endsWith(".d.ts"))).toBe(false);
    expect(readFileSync(join(project, "node_modules", "@tessera", "sdk", "LICENSE"), "utf8")).toContain(
      "Apache License",
    );
  });

  it("installs quickly with only the client runtime: no ORM, driver, Redis client, native addon or tsx", async () => {
    expect(installMs).toBeLessThan(40_000); // the target is 20 s; the machine is shared and loaded
    const ls = await exec("npm", ["ls", "--all", "--json"], { cwd: project, ...BIG });
    const names = [...treeNames(JSON.parse(ls.stdout) as { dependencies?: Record<string, unknown> })].sort();
    expect(names).toEqual(["@tessera/sdk", ...ALLOWED].sort());
    // And on disk, whatever npm ls reports: every folder in node_modules is one of them.
    const installed = readdirSync(join(project, "node_modules")).flatMap((d) =>
      d.startsWith("@") ? readdirSync(join(project, "node_modules", d)).map((s) => `${d}/${s}`) : [d],
    );
    expect(installed.filter((d) => d !== ".package-lock.json" && d !== ".bin").sort()).toEqual(names);
    expect(filesUnder(join(project, "node_modules")).filter((f) => f.endsWith(".node"))).toEqual([]);
  });

  it("resolves its types from an ES module and from a CommonJS TypeScript project", async () => {
    writeFileSync(
      join(project, "esm.mts"),
      `import { TesseraClientError, UserAPI, type CurrentUser } from "@tessera/sdk";
import { UserService, type User } from "@tessera/sdk/gen/tessera/v1/user_service_pb.js";
const api = new UserAPI({ host: "localhost", verifySsl: true });
export const me: Promise<CurrentUser> = api.getUser();
export const users: Promise<User[]> = api.client(UserService).listUsers({}).then((r) => r.users);
export const isBase = (e: unknown): boolean => e instanceof TesseraClientError;
import { createTesseraAuthInterceptor, type TesseraPrincipal, tesseraPrincipalKey } from "@tessera/sdk/server";
export const interceptor = createTesseraAuthInterceptor({ server: "https://localhost:50052", watch: false });
export const principalKey: typeof tesseraPrincipalKey = tesseraPrincipalKey;
export type Who = TesseraPrincipal["tenantId"];
// @ts-expect-error the port is a number
new UserAPI({ port: "50052" });
`,
    );
    writeFileSync(
      join(project, "cjs.cts"),
      `import { ClientConfigError, UserAPI } from "@tessera/sdk";
import { TenantService } from "@tessera/sdk/gen/tessera/v1/tenant_service_pb.js";
export const code: number = new ClientConfigError("x").code;
export const list = new UserAPI({}).client(TenantService).listTenants({});
import { createTesseraAuthMiddleware } from "@tessera/sdk/server";
export const middleware = createTesseraAuthMiddleware({ server: "https://localhost:50052", watch: false }, { rule: { scopes: ["workflows:read"] } });
// @ts-expect-error insecure is a boolean
new UserAPI({ insecure: "yes" });
`,
    );
    // The README's TypeScript quick start, as it is, type-checked as an ES module and as CommonJS.
    const quickStart = readFileSync(join(REPO, TS_QUICK_START), "utf8");
    writeFileSync(join(project, "quick-start.mts"), quickStart);
    writeFileSync(join(project, "quick-start.cts"), quickStart);
    writeFileSync(
      join(project, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          module: "NodeNext",
          moduleResolution: "NodeNext",
          target: "ES2022",
          strict: true,
          noEmit: true,
          skipLibCheck: true,
          types: ["node"],
          typeRoots: [join(REPO, "node_modules", "@types")],
        },
        files: ["esm.mts", "cjs.cts", "quick-start.mts", "quick-start.cts"],
      }),
    );
    const tsc = join(REPO, "node_modules", "typescript", "bin", "tsc");
    await exec(process.execPath, [tsc, "-p", "tsconfig.json"], { cwd: project, ...BIG });
  });

  it("offers @tessera/sdk/server to ES modules and to CommonJS, with nothing more installed", async () => {
    const esm = await exec(
      process.execPath,
      [
        "--input-type=module",
        "-e",
        'const s = await import("@tessera/sdk/server"); console.log(typeof s.createTesseraAuthInterceptor, typeof s.createTesseraAuthMiddleware)',
      ],
      { cwd: project, ...BIG },
    );
    expect(esm.stdout.trim()).toBe("function function");
    const cjs = await exec(
      process.execPath,
      [
        "-e",
        'const s = require("@tessera/sdk/server"); console.log(typeof s.createTesseraAuthInterceptor, typeof s.tesseraPrincipalKey)',
      ],
      { cwd: project, ...BIG },
    );
    expect(cjs.stdout.trim()).toBe("function object");
  });

  it("ships every shipped .proto compiled, imports included, as a FileDescriptorSet for runtimes without a .proto parser", () => {
    const set = fromBinary(
      FileDescriptorSetSchema,
      readFileSync(join(project, "node_modules", "@tessera", "sdk", "proto", "tessera.binpb")),
    );
    const names = set.file.map((f) => f.name);
    const shipped = files.filter((f) => f.endsWith(".proto")).map((f) => f.slice("proto/".length));
    expect(shipped.length).toBeGreaterThan(10);
    for (const proto of shipped) expect(names, proto).toContain(proto);
    for (const wkt of ["google/protobuf/timestamp.proto", "google/protobuf/descriptor.proto"])
      expect(names).toContain(wkt);
    // Each file after the files it imports: a descriptor pool adds them in this order.
    for (const [i, f] of set.file.entries())
      for (const dep of f.dependency) expect(names.indexOf(dep), `${f.name} imports ${dep}`).toBeLessThan(i);
    const users = set.file.find((f) => f.name === "tessera/v1/user_service.proto");
    expect(users?.service[0]?.method.map((m) => m.name)).toContain("GetCurrentUser");
    // No comments (source info): the runtime does not need them.
    expect(users?.sourceCodeInfo).toBeUndefined();
  });

  it("copies the walkthroughs unchanged", () => {
    mkdirSync(join(project, "esm"));
    writeFileSync(join(project, "esm", "package.json"), JSON.stringify({ type: "module" }));
    const targets = PACKAGE_WALKTHROUGHS.map((w) => [w, join(project, copyName(w))]);
    targets.push([TS_QUICK_START, join(project, "esm", copyName(TS_QUICK_START))]);
    for (const [w, target] of targets) {
      copyFileSync(join(REPO, w!), target!);
      expect(readFileSync(target!, "utf8")).toBe(readFileSync(join(REPO, w!), "utf8"));
    }
    for (const [w, name] of Object.entries(PYTHON_FILES)) {
      const target = join(project, name);
      copyFileSync(join(REPO, "examples", w), target);
      expect(readFileSync(target, "utf8")).toBe(readFileSync(join(REPO, "examples", w), "utf8"));
    }
  });

  describe.each(DATABASES)("walkthroughs against a real server on $name", (db) => {
    let ts: TestServer;
    let env: Record<string, string>;
    let secrets: string;

    beforeAll(async () => {
      ts = await startTestServer(db);
      secrets = mkdtempSync(join(work, `secrets-${db.name}-`));
      const home = mkdtempSync(join(work, "home-"));
      env = {
        PATH: process.env.PATH ?? "/usr/bin:/bin",
        HOME: home,
        TESSERA_SERVER: `localhost:${ts.server.port}`,
        TESSERA_CERT_FOLDER: ts.certs.clientDir,
        TESSERA_ADMIN_PASSWORD: ADMIN_PASSWORD,
        TESSERA_SECRETS_DIR: secrets,
      };
    });
    afterAll(async () => {
      await ts?.close();
    });

    const run = async (
      file: string,
      runner: string[] = [],
      extraEnv: Record<string, string> = {},
      command = process.execPath,
    ) => {
      const r = await exec(command, [...runner, file], {
        cwd: project,
        env: { ...env, ...extraEnv },
        ...BIG,
      }).catch((err: { stdout: string; stderr: string; code: number }) => err);
      expect(r.stdout, `${file}\n${r.stdout}\n${r.stderr}`).toMatch(/walkthrough done\n$/);
      expect(r.stdout + r.stderr).not.toContain(ADMIN_PASSWORD);
      return r.stdout;
    };
    const kept = (name: string, dir = secrets): string[] =>
      readdirSync(dir, { recursive: true, withFileTypes: true })
        .filter((e) => e.isFile() && e.name === name)
        .map((e) => join(e.parentPath, e.name));

    it("runs the TypeScript quick start (tsx) from a CommonJS project and from an ES module project", async () => {
      // The consumer project is CommonJS (no "type"): tsx compiles to CommonJS there, where a
      // top-level await is refused; the quick start has none.
      writeFileSync(join(project, "tla.ts"), "await Promise.resolve();\nexport {};\n");
      const tla = await exec(process.execPath, [TSX, "tla.ts"], { cwd: project, env, ...BIG }).catch(
        (err: { stderr: string }) => err,
      );
      expect(tla.stderr).toMatch(/Top-level await is currently not supported with the "cjs" output format/);
      for (const file of [copyName(TS_QUICK_START), join("esm", copyName(TS_QUICK_START))]) {
        const out = await run(file, [TSX]);
        expect(out).toMatch(/^logged in as admin$/m);
        expect(out).toMatch(/^may read clusters$/m);
        expect(out).toMatch(/^tenants: default\b/m);
      }
    });

    it("runs the ES module walkthrough twice (its names do not collide)", async () => {
      for (let i = 0; i < 2; i++) {
        const out = await run("sdk-esm-walkthrough.mjs");
        expect(out).toMatch(/^logged in as admin$/m);
        expect(out).toMatch(/^reader may read clusters: true$/m);
        expect(out).toMatch(/^denied: \S+ needs admin:users$/m);
        expect(out).toMatch(/^the token belongs to reader$/m);
      }
      const pats = kept("reader-pat.txt");
      expect(pats).toHaveLength(2);
      for (const p of pats) {
        expect(statSync(p).mode & 0o777).toBe(0o600);
        const token = readFileSync(p, "utf8");
        expect(token).toMatch(/^tsr_pat_/);
      }
    });

    it("runs the CommonJS walkthrough", async () => {
      const out = await run("sdk-cjs-walkthrough.cjs");
      expect(out).toMatch(/^tenant sdk-cjs-\S+ created$/m);
      expect(out).toMatch(/^not found: NOT_FOUND request \S+$/m);
      const [key] = kept("api-key.txt");
      expect(statSync(key!).mode & 0o777).toBe(0o600);
      expect(out).not.toContain(readFileSync(key!, "utf8"));
    });

    it("runs the grpc-js walkthrough on the shipped protos", async () => {
      const version = (name: string) =>
        (
          JSON.parse(readFileSync(join(REPO, "node_modules", name, "package.json"), "utf8")) as {
            version: string;
          }
        ).version;
      await npmInstall(project, [
        `@grpc/grpc-js@${version("@grpc/grpc-js")}`,
        `@grpc/proto-loader@${version("@grpc/proto-loader")}`,
      ]);
      const out = await run("grpc-js-walkthrough.cjs");
      expect(out).toMatch(/^health: SERVING$/m);
      expect(out).toMatch(/^logged in as admin with \*$/m);
      expect(out).toMatch(/^without a token: UNAUTHENTICATED$/m);

      // The backend in another language: a machine user's certificate alone, nothing else presented.
      const login = await createClient(UserService, ts.connect()).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      const headers = { authorization: `Bearer ${login.accessToken}` };
      const machines = createClient(MachineUserService, ts.connect());
      const { machineUser } = await machines.createMachineUser(
        { name: "grpc-js-backend", authType: MachineAuthType.BEARER },
        { headers },
      );
      const backend = join(work, `grpc-js-backend-${db.name}`);
      const cert = await createClientCertificate(ts.certs.dir, "grpc-js-backend", backend);
      await machines.bindCertificate(
        {
          machineUserId: machineUser!.id,
          identity: { case: "sha256Fingerprint", value: cert.sha256Fingerprint },
        },
        { headers },
      );
      const checked = await run("grpc-js-machine-user.cjs", [], { TESSERA_CERT_FOLDER: backend });
      expect(checked).toMatch(/authenticated: true/);
      expect(checked).toContain(`machine_user_id: '${machineUser!.id}'`);
    }, 240_000);

    it("runs the Python grpcio walkthrough twice on the shipped descriptor set (its names do not collide)", async (ctx) => {
      const missing = pythonGrpcMissing();
      // CI installs the packages, so there a missing module is a failure, not a skip.
      if (missing !== undefined && process.env.CI !== "true") {
        console.warn(`Python grpcio walkthrough skipped: ${missing}`);
        ctx.skip(missing);
      }
      expect(missing, "under CI=true the Python walkthrough must run").toBeUndefined();
      const own = mkdtempSync(join(secrets, "python-"));
      for (let i = 0; i < 2; i++) {
        const out = await run("python-walkthrough.py", [], { TESSERA_SECRETS_DIR: own }, PYTHON);
        expect(out).toMatch(/^logged in as admin$/m);
        expect(out).toMatch(/^reader may read clusters: True$/m);
        expect(out).toMatch(/^denied: ACCESS_DENIED needs admin:users$/m);
        expect(out).toMatch(/^the token belongs to reader$/m);
        expect(out).toMatch(/^refreshed, still reader$/m);
        expect(out).toMatch(/^refresh token reused: TOKEN_REVOKED$/m);
        expect(out).toMatch(/^then the session is over: TOKEN_REVOKED$/m);
      }
      const pats = kept("reader-pat.txt", own);
      expect(pats).toHaveLength(2);
      for (const p of pats) {
        expect(statSync(p).mode & 0o777).toBe(0o600);
        expect(readFileSync(p, "utf8")).toMatch(/^tsr_pat_/);
      }
    }, 120_000);
  });
});
