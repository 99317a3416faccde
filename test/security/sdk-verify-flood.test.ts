import { randomBytes } from "node:crypto";
import type { Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { createTesseraAuth, TesseraAuthError } from "../../src/sdk/server/index.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * The SDK's core asks Tessera about every credential it does not know, and the protected
 * service's callers choose the credentials: each new one was one more VerifyCredential held
 * in memory (queued behind the connection's stream limit) for as long as they kept sending.
 */
const FLOOD = 300;
const MAX = 20;

describe.each(DATABASES)("SDK: VerifyCredential calls in flight ($name)", (db) => {
  let ts: TestServer;
  let verifier: string;
  beforeAll(async () => {
    ts = await startTestServer(db);
    const admin = clients(ts.connect(), await adminLogin(ts.connect()));
    verifier = (
      await admin.machines.createMachineUser({
        name: `verifier-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
  });
  afterAll(async () => ts?.close());

  it("are bounded by maxConcurrentVerifications: a flood of made-up credentials past it is refused 503 at once, and counted", async () => {
    // The real gRPC transport over TLS, counting the calls it has in flight.
    const inner = createGrpcTransport({ baseUrl: ts.server.url, nodeOptions: { ca: ts.certs.ca } });
    let inFlight = 0;
    let peak = 0;
    const counted = {
      async unary(...args: Parameters<Transport["unary"]>) {
        peak = Math.max(peak, ++inFlight);
        try {
          return await inner.unary(...args);
        } finally {
          inFlight--;
        }
      },
      stream: inner.stream.bind(inner),
    } as unknown as Transport;
    const auth = createTesseraAuth({
      server: ts.server.url,
      transport: counted,
      credential: verifier,
      watch: false,
      maxConcurrentVerifications: MAX,
    });
    try {
      const outcomes = await Promise.allSettled(
        Array.from({ length: FLOOD }, () =>
          auth.authenticate(`Bearer made-up-${randomBytes(16).toString("hex")}`),
        ),
      );
      const reasons = outcomes.map((o) =>
        o.status === "rejected" ? (o.reason as TesseraAuthError) : undefined,
      );
      expect(reasons.every((r) => r instanceof TesseraAuthError)).toBe(true);
      expect(peak).toBeLessThanOrEqual(MAX);
      const refused = reasons.filter((r) => r?.reason === "UNAVAILABLE");
      expect(refused.length).toBeGreaterThanOrEqual(FLOOD - MAX);
      expect(refused.every((r) => r!.retryAfterSeconds === 1)).toBe(true);
      expect(auth.stats().verifyRefused).toBe(refused.length);
      // The ones asked were answered by Tessera: unknown credentials, not a fault.
      expect(reasons.filter((r) => r?.reason !== "UNAVAILABLE").length).toBe(FLOOD - refused.length);
      // Once the flood has passed, a credential is asked again.
      await expect(auth.authenticate(`Bearer made-up-${short()}`)).rejects.not.toMatchObject({
        reason: "UNAVAILABLE",
      });
    } finally {
      auth.close();
    }
  });
});
