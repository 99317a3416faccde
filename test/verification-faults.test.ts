import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { VerificationService } from "../gen/tessera/v1/verification_service_pb.js";
import { generateToken } from "../src/auth/token-format.js";
import { startServer, type TesseraServer } from "../src/server.js";
import {
  clientFor,
  createTestCerts,
  DATABASES,
  memoryTransport,
  type TestCerts,
  withHeaders,
} from "./helpers.js";
import { adminLogin, basic, clients, short } from "./machine-fixtures.js";
import { type OutageApp, startOutageApp } from "./outage-helpers.js";

/**
 * VerifyCredential (Connect and gRPC), /oauth2/introspect, /oauth2/token and /oauth2/revoke
 * while the database is away (test/outage-helpers.ts: PostgreSQL behind a proxy that resets
 * every connection; SQLite made read-only). PostgreSQL gone: every one of them is a fault to
 * retry (Unavailable with Retry-After; HTTP 503 `temporarily_unavailable` with Retry-After),
 * never an answer about the credential, least of all `valid`/`active` for one not seen
 * before, and never a 500 or a logged failure. A read-only SQLite still reads exactly:
 * verifications are answered as they would be, and whatever needs a write is a fault.
 */
describe.each(DATABASES.map((d) => d.name))("verification and OAuth with the database away (%s)", (kind) => {
  let env: OutageApp;
  let server: TesseraServer;
  let certs: TestCerts;
  let agent: Agent;
  const transports: Record<string, Transport> = {};

  beforeAll(async () => {
    certs = await createTestCerts();
    env = await startOutageApp(kind, { server: { certDir: certs.dir } });
    server = await startServer(env.app);
    const nodeOptions = { ca: certs.ca };
    transports.connect = createConnectTransport({ baseUrl: server.url, httpVersion: "2", nodeOptions });
    transports.grpc = createGrpcTransport({ baseUrl: server.url, nodeOptions });
    agent = new Agent({ connect: { ca: certs.ca } });
  }, 60_000);
  afterAll(async () => {
    await agent?.close();
    await server?.close(0);
    await env?.close();
  });

  async function post(path: string, body: Record<string, string>, headers: Record<string, string>) {
    const res = await request(`${server.url}${path}`, {
      method: "POST",
      dispatcher: agent,
      headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
      body: new URLSearchParams(body).toString(),
    });
    const text = await res.body.text();
    return {
      status: res.statusCode,
      retryAfter: res.headers["retry-after"],
      json: (text ? JSON.parse(text) : {}) as Record<string, unknown>,
    };
  }

  it("answers faults with Retry-After, never valid or active for a credential not seen before, and serves again once back", async () => {
    const mem = memoryTransport(env.app);
    const root = await adminLogin(mem);
    const admin = clients(mem, root);
    const verifier = await admin.machines.createMachineUser({
      name: `verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    const client = await admin.machines.createMachineUser({
      name: `client-${short()}`,
      authType: MachineAuthType.BASIC,
      scopes: ["cluster:read"],
    });
    const bearer = { authorization: `Bearer ${verifier.token}` };
    const verify = (protocol: string, credential: string) =>
      createClient(VerificationService, withHeaders(transports[protocol]!, bearer))
        .verifyCredential({ credential })
        .then(
          (res) => ({ valid: res.valid }),
          (err: unknown) => ConnectError.from(err),
        );
    const tokens = clientFor(TokenService, mem, root);
    const seen = (await tokens.createPersonalAccessToken({ name: `seen-${short()}` })).token;
    // Seen while up (the caller's own token with it), so that a cached positive is not mistaken for a fault.
    expect(await verify("connect", seen)).toEqual({ valid: true });
    const fresh = (await tokens.createPersonalAccessToken({ name: `fresh-${short()}` })).token;
    const unknown = generateToken("tsr_pat_").token;

    await env.cut();
    try {
      for (const protocol of Object.keys(transports)) {
        for (const credential of [fresh, unknown]) {
          const outcome = await verify(protocol, credential);
          if (kind === "postgres") {
            expect(outcome, protocol).toBeInstanceOf(ConnectError);
            const err = outcome as ConnectError;
            expect(err.code, `${protocol}: ${err.message}`).toBe(Code.Unavailable);
            expect(Number(err.metadata.get("retry-after")), protocol).toBeGreaterThan(0);
          } else {
            // A read-only SQLite reads exactly: the answer is the true one, or a fault.
            const expected = credential === fresh ? { valid: true } : { valid: false };
            if (outcome instanceof ConnectError) expect(outcome.code).toBe(Code.Unavailable);
            else expect(outcome).toEqual(expected);
          }
        }
      }
      for (const token of [fresh, unknown]) {
        const res = await post("/oauth2/introspect", { token }, bearer);
        if (kind === "postgres" || res.status !== 200) {
          expect(res.status).toBe(503);
          expect(res.json).toMatchObject({ error: "temporarily_unavailable" });
          expect(res.json.active).toBeUndefined();
          expect(Number(res.retryAfter)).toBeGreaterThan(0);
        } else
          expect(res.json).toEqual(
            token === fresh ? expect.objectContaining({ active: true }) : { active: false },
          );
      }
      if (kind === "postgres") {
        const issued = await post(
          "/oauth2/token",
          { grant_type: "client_credentials" },
          basic(client.username, client.password),
        );
        const revoked = await post("/oauth2/revoke", { token: unknown }, bearer);
        for (const res of [issued, revoked]) {
          expect(res.status).toBe(503);
          expect(res.json.error).toBe("temporarily_unavailable");
          expect(Number(res.retryAfter)).toBeGreaterThan(0);
        }
      }
      expect(env.log.count("request failed")).toBe(0);
      expect(env.log.count("introspection failed")).toBe(0);
    } finally {
      await env.restore();
    }

    // Back: the credential that was never accepted meanwhile verifies now.
    let answer: { valid: boolean } | ConnectError = await verify("connect", fresh);
    for (let i = 0; i < 50 && !(!(answer instanceof ConnectError) && answer.valid); i++) {
      await new Promise((r) => setTimeout(r, 200));
      answer = await verify("connect", fresh);
    }
    expect(answer).toEqual({ valid: true });
    expect((await post("/oauth2/introspect", { token: fresh }, bearer)).json).toMatchObject({ active: true });
  });
});
