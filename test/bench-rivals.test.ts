import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { SignJWT } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tsxLauncher } from "../bench/build.js";
import { type ClientTls, grpcCall, JsonClient } from "../bench/client.js";
import { type ServerProcess, startServerProcess } from "../bench/processes.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { ensureDevCertificates } from "../src/certs/dev-ca.js";

/**
 * The rivals of the benchmark (issue 19) verify tokens as Tessera does: a rival that
 * answered without checking the signature, issuer, audience or expiry would be measured
 * doing less than Tessera. Each runs as the bench starts it (its own process, TLS with the
 * development CA) and is driven with the bench's own clients. The bench run itself checks
 * that a rival's answer to a real Tessera token equals Tessera's (bench/run.ts, verify).
 */

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const SECRET = "rival-test-secret-0123456789abcdef";
const CREATED_AT = "2026-01-02T03:04:05.678Z";
const USER = {
  sub: "0b9f8a52-58a3-4a57-9d52-1c7f0f6b1e2a",
  tid: "5d0c1c1e-3f0b-4c4e-9a59-0f3c7c2a9d11",
  preferred_username: "rival-user",
  scope: "bench:read users:read",
};

const work = mkdtempSync(join(tmpdir(), "tessera-bench-rivals-"));
const servers: Record<string, ServerProcess> = {};
let tls: ClientTls;

beforeAll(async () => {
  const certDir = join(work, "certs");
  await ensureDevCertificates(certDir);
  tls = { ca: readFileSync(join(certDir, "ca.crt")) };
  const launcher = tsxLauncher(ROOT);
  const start = (name: string, script: string) =>
    startServerProcess({
      name,
      command: launcher.command,
      args: [...launcher.args(script), certDir, join(ROOT, "proto")],
      cwd: launcher.cwd,
      env: { ...process.env, BENCH_PORT: "0", RIVAL_JWT_SECRET: SECRET, RIVAL_CREATED_AT: CREATED_AT },
      ready: (line) => {
        const m = /^\{"listening":(\d+)\}$/.exec(line.trim());
        return m ? `https://127.0.0.1:${m[1]}` : null;
      },
    });
  [servers.fastify, servers.grpc] = await Promise.all([
    start("rival-fastify", "bench/rival-fastify.ts"),
    start("rival-grpc-js", "bench/rival-grpc-js.ts"),
  ]);
});

afterAll(async () => {
  await Promise.all(Object.values(servers).map((s) => s.stop()));
  rmSync(work, { recursive: true, force: true });
});

interface TokenOptions {
  secret?: string;
  issuer?: string;
  audience?: string;
  expiresIn?: string | number | null;
}

function token(options: TokenOptions = {}): Promise<string> {
  const { sub, ...claims } = USER;
  let jwt = new SignJWT(claims)
    .setProtectedHeader({ alg: "HS256", kid: "hs256", typ: "at+jwt" })
    .setIssuer(options.issuer ?? "tessera")
    .setAudience(options.audience ?? "tessera")
    .setSubject(sub)
    .setIssuedAt();
  const exp = options.expiresIn === undefined ? "1h" : options.expiresIn;
  if (exp !== null) jwt = jwt.setExpirationTime(exp);
  return jwt.sign(new TextEncoder().encode(options.secret ?? SECRET));
}

const now = () => Math.floor(Date.now() / 1000);
const refusals: [string, TokenOptions][] = [
  ["signed with another secret", { secret: "another-secret-0123456789abcdefgh" }],
  ["of another issuer", { issuer: "someone-else" }],
  ["for another audience", { audience: "someone-else" }],
  ["expired", { expiresIn: now() - 60 }],
  ["without an expiry", { expiresIn: null }],
];

const path = `${UserService.typeName}/GetCurrentUser`;
const expectedUser = {
  id: USER.sub,
  username: USER.preferred_username,
  tenantId: USER.tid,
  permissions: ["bench:read", "users:read"],
};

describe("rival: fastify 5 + @fastify/jwt (Connect JSON)", () => {
  it("answers a valid token with the user built from its claims, as Tessera's JSON", async () => {
    const api = new JsonClient(servers.fastify!.url, tls);
    try {
      const answer = await api.post(path, {}, { authorization: `Bearer ${await token()}` });
      expect(answer.status).toBe(200);
      expect(answer.body).toEqual({ ...expectedUser, createdAt: CREATED_AT });
    } finally {
      await api.close();
    }
  });

  it.each(refusals)("refuses a token %s (401)", async (_what, options) => {
    const api = new JsonClient(servers.fastify!.url, tls);
    try {
      const answer = await api.post(path, {}, { authorization: `Bearer ${await token(options)}` });
      expect(answer.status).toBe(401);
      expect(answer.body).not.toHaveProperty("id");
    } finally {
      await api.close();
    }
  });

  it("refuses a call without a token (401)", async () => {
    const api = new JsonClient(servers.fastify!.url, tls);
    try {
      expect((await api.post(path, {})).status).toBe(401);
    } finally {
      await api.close();
    }
  });
});

describe("rival: @grpc/grpc-js + jose (gRPC)", () => {
  it("answers a valid token with the user built from its claims, as Tessera's message", async () => {
    const outcome = await grpcCall(
      servers.grpc!.url,
      tls,
      UserService,
      "GetCurrentUser",
      {},
      {
        authorization: `Bearer ${await token()}`,
      },
    );
    expect(outcome.ok, outcome.ok ? "" : `${outcome.code}: ${outcome.message}`).toBe(true);
    if (!outcome.ok) return;
    expect(outcome.message).toMatchObject(expectedUser);
    const createdAt = outcome.message.createdAt as { seconds: bigint; nanos: number };
    expect(new Date(Number(createdAt.seconds) * 1000 + createdAt.nanos / 1e6).toISOString()).toBe(CREATED_AT);
  });

  it.each(refusals)("refuses a token %s (Unauthenticated)", async (_what, options) => {
    const outcome = await grpcCall(
      servers.grpc!.url,
      tls,
      UserService,
      "GetCurrentUser",
      {},
      {
        authorization: `Bearer ${await token(options)}`,
      },
    );
    expect(outcome).toMatchObject({ ok: false, code: "unauthenticated" });
  });

  it("refuses a call without a token (Unauthenticated)", async () => {
    const outcome = await grpcCall(servers.grpc!.url, tls, UserService, "GetCurrentUser", {}, {});
    expect(outcome).toMatchObject({ ok: false, code: "unauthenticated" });
  });
});
