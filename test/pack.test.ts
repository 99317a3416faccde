import { execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { expect, it } from "vitest";
import { ADMIN_PASSWORD, SQLITE, startTestServer } from "./helpers.js";

const exec = promisify(execFile);
const REPO = fileURLToPath(new URL("..", import.meta.url));

const CONSUMER = `
import { NotFoundError, UserAPI } from "tessera/sdk";
import { UserService } from "tessera/gen/tessera/v1/user_service_pb.js";

// Server, cert folder and HOME come from the environment (TESSERA_SERVER, TESSERA_CERT_FOLDER).
const api = UserAPI.fromEnvironment();
const available = await api.isAvailable();
const login = await api.login("admin", process.env.ADMIN_PASSWORD);
const me = await api.getUser();
const users = api.client(UserService);
const listed = (await users.listUsers({})).users.map((u) => u.username);
let notFound = "";
try {
  await users.getUser({ id: "00000000-0000-4000-8000-000000000000" });
} catch (err) {
  notFound = err instanceof NotFoundError ? err.reason : String(err);
}
api.close();
console.log(JSON.stringify({ available, username: me.username, listed, notFound, token: login.accessToken }));
`;

const CONSUMER_TS = `
import { UserAPI, type CurrentUser } from "tessera/sdk";
import { UserService, type User } from "tessera/gen/tessera/v1/user_service_pb.js";
const api = new UserAPI({ host: "localhost", port: 50052, protocol: "connect" });
export const me: Promise<CurrentUser> = api.getUser();
export const users: Promise<User[]> = api.client(UserService).listUsers({}).then((r) => r.users);
// @ts-expect-error the port is a number
new UserAPI({ port: "50052" });
`;

/**
 * The package as a user gets it: `npm pack` (which builds dist/ with declarations),
 * installed into a throwaway project outside the repository from the npm cache, then
 * imported by an ES module that calls a running server through the SDK and a generated
 * service, type-checked as TypeScript, and its `tessera` binary run from dist/.
 */
it("installs the packed tarball in a project outside the repo, which calls a running server", {
  timeout: 240_000,
}, async () => {
  const ts = await startTestServer(SQLITE);
  const work = mkdtempSync(join(tmpdir(), "tessera-pack-"));
  try {
    const packed = await exec("npm", ["pack", "--json", "--pack-destination", work], {
      cwd: REPO,
      maxBuffer: 32 * 1024 * 1024,
    });
    const [{ filename, files }] = JSON.parse(packed.stdout.slice(packed.stdout.indexOf("["))) as [
      { filename: string; files: { path: string }[] },
    ];
    const paths = files.map((f) => f.path);
    expect(paths).toContain("dist/src/sdk/index.js");
    expect(paths).toContain("dist/src/sdk/index.d.ts");
    expect(paths).toContain("dist/gen/tessera/v1/user_service_pb.d.ts");
    expect(paths).toContain("proto/tessera/v1/user_service.proto");
    expect(paths).toContain("dist/cli/tessera.cjs");
    expect(paths.some((p) => p.startsWith("src/") || p.startsWith("test/"))).toBe(false);

    const project = join(work, "consumer");
    mkdirSync(project);
    writeFileSync(
      join(project, "package.json"),
      JSON.stringify({ name: "consumer", private: true, type: "module" }),
    );
    const install = [
      "install",
      join(work, filename),
      "--no-audit",
      "--no-fund",
      "--no-package-lock",
      "--ignore-scripts",
    ];
    try {
      // Every dependency is in the npm cache of a machine that installed this repository.
      await exec("npm", [...install, "--offline"], { cwd: project, maxBuffer: 32 * 1024 * 1024 });
    } catch {
      await exec("npm", [...install, "--prefer-offline"], { cwd: project, maxBuffer: 32 * 1024 * 1024 });
    }
    expect(existsSync(join(project, "node_modules", "tessera", "src"))).toBe(false);

    writeFileSync(join(project, "consumer.mjs"), CONSUMER);
    const home = join(work, "home");
    mkdirSync(home);
    const env = {
      PATH: process.env.PATH ?? "/usr/bin:/bin",
      HOME: home,
      TESSERA_SERVER: `127.0.0.1:${ts.server.port}`,
      TESSERA_CERT_FOLDER: ts.certs.clientDir,
      ADMIN_PASSWORD,
    };
    const run = await exec(process.execPath, ["consumer.mjs"], { cwd: project, env });
    const result = JSON.parse(run.stdout) as {
      available: boolean;
      username: string;
      listed: string[];
      notFound: string;
      token: string;
    };
    expect(result).toMatchObject({ available: true, username: "admin", notFound: "NOT_FOUND" });
    expect(result.listed).toContain("admin");

    // The installed binary runs the compiled dist/ (the package has no sources), and the
    // command line from the bundle (one script run through node:vm, so no module load)
    // rather than the SDK's and runtimes' modules.
    const probeOut = join(work, "whoami-modules.txt");
    const cli = await exec(
      process.execPath,
      [
        "--import",
        join(REPO, "test", "module-probe.mjs"),
        join(project, "node_modules", ".bin", "tessera"),
        "whoami",
        "--output",
        "json",
      ],
      { cwd: project, env: { ...env, TESSERA_TOKEN: result.token, MODULE_PROBE_OUT: probeOut } },
    );
    expect((JSON.parse(cli.stdout) as { username: string }).username).toBe("admin");
    const loaded = readFileSync(probeOut, "utf8").split("\n");
    expect(loaded).toContain(
      `file://${join(project, "node_modules", "tessera", "dist", "src", "cli", "bundle-loader.js")}`,
    );
    expect(
      loaded.filter((url) => /\/(@connectrpc|@bufbuild|yaml)\/|\/dist\/(src\/sdk|gen)\//.test(url)),
    ).toEqual([]);

    // The type declarations resolve through the package's "exports".
    writeFileSync(join(project, "consumer.ts"), CONSUMER_TS);
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
          types: [],
        },
        files: ["consumer.ts"],
      }),
    );
    const tsc = join(REPO, "node_modules", "typescript", "bin", "tsc");
    await exec(process.execPath, [tsc, "-p", "tsconfig.json"], { cwd: project });
  } finally {
    await ts.close();
    rmSync(work, { recursive: true, force: true });
  }
});
