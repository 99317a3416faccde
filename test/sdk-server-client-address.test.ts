import { readFileSync } from "node:fs";
import { request } from "node:https";
import { join } from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { WorkflowService } from "../examples/workflows/gen/workflows/v1/workflow_service_pb.js";
import { startWorkflowServer, type WorkflowServer } from "../examples/workflows/service.js";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { generateToken } from "../src/auth/token-format.js";
import { createTesseraAuthMiddleware, type TesseraMiddlewareRequest } from "../src/sdk/server/index.js";
import { AuditEventRepository } from "../src/storage/repositories/audit.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * The availability attack on a downstream service, end to end over TLS: an anonymous client
 * of the example workflows service (examples/workflows) floods it with made-up personal
 * access tokens, which it passes on to Tessera's VerifyCredential. The SDK names each
 * client's address there, so the flood spends the attacker's budget alone: a genuine new
 * token from another address is still verified, through the interceptor (Connect, gRPC) and
 * through the Node middleware (the JSON route). Clients are told apart by the loopback
 * address they connect from (127.0.0.x).
 */
const PER_CLIENT = 3;

describe.each(DATABASES)("a downstream flooded with bogus tokens on $name", (db) => {
  let ts: TestServer;
  let workflows: WorkflowServer;
  let root: string;

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { enabled: true, authFailuresPerIpPerMinute: PER_CLIENT, perIpPerMinute: 10_000 },
    });
    root = await adminLogin(ts.connect());
    const verifier = await clients(ts.connect(), root).machines.createMachineUser({
      name: `workflows-service-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    workflows = await startWorkflowServer({
      cert: readFileSync(join(ts.certs.dir, "server.crt")),
      key: readFileSync(join(ts.certs.dir, "server.key")),
      tessera: {
        server: ts.server.url,
        caFile: join(ts.certs.dir, "ca.crt"),
        credential: verifier.token,
        watch: false,
      },
    });
  }, 60_000);

  afterAll(async () => {
    await workflows?.close();
    await ts?.close();
  });

  /** A new token with the workflows scopes, never verified yet (its first use needs PBKDF2). */
  async function newPat(): Promise<string> {
    return (
      await clientFor(TokenService, ts.connect(), root).createPersonalAccessToken({
        name: short(),
        scopes: ["workflows:read"],
      })
    ).token;
  }

  /** listWorkflows from `localAddress` over Connect or gRPC; the error code, or "ok". */
  async function list(token: string, localAddress: string, grpc = false): Promise<string> {
    const nodeOptions = { ca: ts.certs.ca, localAddress };
    const transport = grpc
      ? createGrpcTransport({ baseUrl: workflows.url, nodeOptions })
      : createConnectTransport({ baseUrl: workflows.url, httpVersion: "2", nodeOptions });
    return createClient(WorkflowService, transport)
      .listWorkflows({}, { headers: { authorization: `Bearer ${token}` } })
      .then(
        () => "ok",
        (e: unknown) => Code[ConnectError.from(e).code],
      );
  }

  /** GET the JSON route (the Node middleware) from `localAddress`; the status. */
  function getJson(token: string, localAddress: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const req = request(
        `${workflows.url}/v1/workflows`,
        { ca: ts.certs.ca, agent: false, localAddress, headers: { authorization: `Bearer ${token}` } },
        (res) => {
          res.resume();
          res.on("end", () => resolve(res.statusCode ?? 0));
        },
      );
      req.on("error", reject);
      req.end();
    });
  }

  const bogus = () => generateToken("tsr_pat_").token;

  it("still admits a genuine new token through the interceptor while an attacker's flood is refused", async () => {
    const attacker = "127.0.0.2";
    const answers: string[] = [];
    for (let i = 0; i < PER_CLIENT + 3; i++) answers.push(await list(bogus(), attacker, i % 2 === 1));
    expect(answers.slice(0, PER_CLIENT)).toEqual(Array(PER_CLIENT).fill("Unauthenticated"));
    expect(answers.slice(PER_CLIENT)).toEqual(Array(3).fill("ResourceExhausted"));
    // A genuine client of the same service, from another address: first use of a new token.
    expect(await list(await newPat(), "127.0.0.3")).toBe("ok");
    expect(await list(await newPat(), "127.0.0.3", true)).toBe("ok");
    // The attacker stays refused at Tessera, even with a genuine token.
    expect(await list(await newPat(), attacker)).toBe("ResourceExhausted");
    // Tessera's audit names each client's address.
    await ts.app.audit.flush();
    const rows = await new AuditEventRepository(ts.app.sql).list({ action: "credential.verify" }, 500);
    expect(rows.some((r) => r.ip === attacker && r.reason === "NOT_FOUND")).toBe(true);
    expect(rows.some((r) => r.ip === "127.0.0.3" && r.reason === "VALID")).toBe(true);
  });

  it("still admits a genuine new token through the Node middleware while an attacker's flood is refused", async () => {
    const attacker = "127.0.0.4";
    const statuses: number[] = [];
    for (let i = 0; i < PER_CLIENT + 2; i++) statuses.push(await getJson(bogus(), attacker));
    expect(statuses).toEqual([...Array(PER_CLIENT).fill(401), 429, 429]);
    expect(await getJson(await newPat(), "127.0.0.5")).toBe(200);
  });

  it("budgets by the middleware's clientAddress option, and sends nothing that is not an IP address", async () => {
    /** The status the middleware answers (200: it called next) for a token sent from `address`. */
    const status = (address: string, token: string) => {
      const middleware = createTesseraAuthMiddleware<TesseraMiddlewareRequest>(workflows.auth!, {
        rule: { scopes: ["workflows:read"] },
        // As behind a proxy of the service's own: the address it forwards, not the socket's.
        clientAddress: () => address,
      });
      return new Promise<number>((resolve) => {
        const res = {
          headersSent: false,
          writeHead: (code: number) => {
            resolve(code);
            return res;
          },
          end: () => res,
        };
        middleware({ headers: { authorization: `Bearer ${token}` } } as never, res as never, () =>
          resolve(200),
        );
      });
    };
    const statuses: number[] = [];
    for (let i = 0; i < PER_CLIENT + 1; i++) statuses.push(await status("198.51.100.9", bogus()));
    expect(statuses).toEqual([...Array(PER_CLIENT).fill(401), 429]);
    expect(await status("198.51.100.10", await newPat())).toBe(200);
    // Not an address: not sent (Tessera would refuse the call), so the service's own budget is spent.
    expect(await status("unknown", await newPat())).toBe(200);
  });
});
