import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { fromJson } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { GetCurrentUserResponseSchema } from "../gen/tessera/v1/user_service_pb.js";
import { userFromJson } from "../src/cli/actions/whoami.js";
import { EXIT } from "../src/cli/exit-codes.js";
import { ClientConfigError } from "../src/sdk/index.js";
import { closedPort, runCli } from "./cli-helpers.js";
import { SQLITE, startTestServer, type TestServer } from "./helpers.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const PROBE = join(ROOT, "test", "module-probe.mjs");
const ADMIN_TOKEN = "cli-whoami-static-admin-token-0123456789";

/** A failure's stderr without what differs between two calls (the request id). */
const stable = (stderr: string) => stderr.replace(/request id [0-9a-f-]{36}/g, "request id <id>");

/**
 * `tessera whoami` makes its call itself (Connect JSON over node:http2, without the Connect
 * and protobuf runtimes) when the token comes from the flags or the environment; with
 * `--protocol grpc` it takes the SDK client. Both must print the same answer and fail
 * with the same exit code and message.
 */
describe("tessera whoami: its own call and the SDK client's agree", { timeout: 300_000 }, () => {
  let ts: TestServer;
  let env: Record<string, string>;
  const both = async (extra: Record<string, string>, args: string[] = []) => {
    const own = await runCli(["whoami", ...args], { ...env, ...extra });
    const sdk = await runCli(["whoami", "--protocol", "grpc", ...args], { ...env, ...extra });
    return { own, sdk };
  };

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { admin: { token: ADMIN_TOKEN } });
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-cli-whoami-")),
      TESSERA_SERVER: `127.0.0.1:${ts.server.port}`,
      TESSERA_TOKEN: ADMIN_TOKEN,
      // ca.crt and a client certificate (mutual TLS).
      TESSERA_CERT_FOLDER: ts.certs.clientDir,
    };
  }, 300_000);
  afterAll(async () => {
    await ts?.close();
  });

  it("prints the same table and JSON", async () => {
    for (const args of [[], ["--output", "json"]]) {
      const { own, sdk } = await both({}, args);
      expect(own.code, own.stderr).toBe(0);
      expect(sdk.code, sdk.stderr).toBe(0);
      expect(own.stdout).toBe(sdk.stdout);
      expect(own.stderr).toBe("");
    }
    const me = JSON.parse((await both({}, ["--output", "json"])).own.stdout) as {
      id: string;
      permissions: string[];
    };
    expect(me.id).toBe("admin-token");
    expect(me.permissions).toContain("*");
  });

  it("fails with the same exit code and message: a token refused, no server, an unverifiable certificate, a bad flag", async () => {
    const cases: [string, Record<string, string>, string[], number][] = [
      ["refused token", { TESSERA_TOKEN: "not-a-token-the-server-knows" }, [], EXIT.unauthenticated],
      ["no server", { TESSERA_SERVER: `127.0.0.1:${await closedPort()}` }, [], EXIT.unavailable],
      // No CA: the system roots do not know the test CA.
      ["unverifiable certificate", { TESSERA_CERT_FOLDER: "" }, [], EXIT.unavailable],
      ["token with a space", { TESSERA_TOKEN: "two words" }, [], EXIT.usage],
      ["missing CA file", {}, ["--ca-file", join(ROOT, "no-such-ca.crt")], EXIT.usage],
    ];
    for (const [what, extra, args, code] of cases) {
      const { own, sdk } = await both(extra, args);
      expect(own.code, `${what}: ${own.stderr}`).toBe(code);
      expect(sdk.code, `${what}: ${sdk.stderr}`).toBe(code);
      expect(stable(own.stderr), what).toBe(stable(sdk.stderr));
      expect(own.stdout, what).toBe("");
    }
    const tls = await runCli(["whoami"], { ...env, TESSERA_CERT_FOLDER: "" });
    expect(tls.stderr).toContain("--ca-file");
  });

  it("loads neither the Connect runtime nor the generated descriptors for a call that succeeds; --protocol grpc does", async () => {
    const loaded = async (args: string[]) => {
      const out = join(env.HOME!, `probe-${args.join("-") || "default"}.txt`);
      const r = await new Promise<{ code: number; stderr: string }>((resolve) => {
        execFile(
          process.execPath,
          ["--import", PROBE, join(ROOT, "bin", "tessera.js"), "whoami", ...args],
          { env: { PATH: process.env.PATH ?? "/usr/bin", ...env, MODULE_PROBE_OUT: out } },
          (err, _stdout, stderr) => resolve({ code: err ? 1 : 0, stderr }),
        );
      });
      expect(r.code, r.stderr).toBe(0);
      return readFileSync(out, "utf8");
    };
    const own = await loaded([]);
    expect(own).toContain("src/cli/actions/whoami.ts");
    for (const heavy of [/@connectrpc\//, /@bufbuild\/protobuf/, /gen\/tessera\/v1\/user_service_pb/])
      expect(own).not.toMatch(heavy);
    expect(await loaded(["--protocol", "grpc"])).toMatch(/gen\/tessera\/v1\/user_service_pb/);
  });
});

describe("whoami's decoding of GetCurrentUserResponse", () => {
  /** What the SDK's UserAPICore.getUser returns for the same JSON. */
  const sdk = (json: Record<string, unknown>) => {
    const res = fromJson(GetCurrentUserResponseSchema, json as never);
    const cc = res.clientCertificate;
    return {
      id: res.id,
      username: res.username,
      tenantId: res.tenantId,
      permissions: [...res.permissions],
      createdAt: res.createdAt ? timestampDate(res.createdAt) : undefined,
      clientCertificate: cc
        ? { sha256Fingerprint: cc.sha256Fingerprint, commonName: cc.commonName, sanUris: [...cc.sanUris] }
        : undefined,
    };
  };
  const own = (json: Record<string, unknown>) => userFromJson(Buffer.from(JSON.stringify(json)));

  it("matches protobuf's decoding: defaults, proto field names, timestamps to the millisecond", () => {
    for (const json of [
      {},
      {
        id: "u1",
        username: "ann",
        tenantId: "t1",
        permissions: ["a:read", "b:*"],
        createdAt: "2026-12-05T10:56:28.613Z",
      },
      {
        id: "u2",
        tenant_id: "t2",
        created_at: "2026-12-05T10:56:28Z",
        client_certificate: { common_name: "cn" },
      },
      { createdAt: "2026-12-05T10:56:28.123456789Z" },
      { createdAt: "2026-12-05T10:56:28.9996Z" },
      { createdAt: "2026-12-05T11:56:28.5+01:00" },
      {
        clientCertificate: {
          sha256Fingerprint: "ab".repeat(32),
          commonName: "svc",
          sanUris: ["spiffe://x/y"],
        },
      },
    ])
      expect(own(json), JSON.stringify(json)).toEqual(sdk(json));
  });

  it("refuses a timestamp protobuf refuses", () => {
    expect(() => own({ createdAt: "yesterday" })).toThrow(/invalid timestamp/);
    expect(() => sdk({ createdAt: "yesterday" })).toThrow();
  });

  it("keeps ClientConfigError's code InvalidArgument (errors.ts names it without the Connect runtime)", () => {
    expect(new ClientConfigError("x").code).toBe(Code.InvalidArgument);
  });
});
