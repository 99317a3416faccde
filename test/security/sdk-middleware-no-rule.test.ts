import { readFileSync } from "node:fs";
import { createServer, request, type Server } from "node:https";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { createRouterTransport } from "@connectrpc/connect";
import express from "express";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { createTesseraAuthMiddleware, type DownstreamRule } from "../../src/sdk/server/index.js";
import { createTestCerts, type TestCerts } from "../helpers.js";

/**
 * A per-request rule function written in plain JavaScript says "no rule" with `null` as often
 * as with `undefined`: the request must be refused as having no rule (403 ACCESS_DENIED, the
 * fail-closed answer), not fail inside the middleware as a server error.
 */
describe("the middleware with a rule function answering null", () => {
  let certs: TestCerts;
  let server: Server;
  let url: string;
  const reached: string[] = [];
  const tessera = createRouterTransport(({ service }) =>
    service(VerificationService, {
      verifyCredential: () => ({ valid: true, code: VerificationCode.VALID, scopes: ["*"] }),
    }),
  );
  const middleware = createTesseraAuthMiddleware(
    { server: "https://tessera.invalid", transport: tessera, watch: false },
    // The JavaScript a downstream may write: a table of rules by path, null for the rest.
    {
      rule: (req) =>
        req.url === "/v1/known" ? { scopes: ["things:read"] } : (null as unknown as DownstreamRule),
    },
  );

  beforeAll(async () => {
    certs = await createTestCerts();
    const app = express();
    app.use(middleware);
    app.get("/v1/other", (_req, res) => {
      reached.push("other");
      res.json({ ok: true });
    });
    server = createServer(
      { cert: readFileSync(join(certs.dir, "server.crt")), key: readFileSync(join(certs.dir, "server.key")) },
      app,
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    url = `https://localhost:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    middleware.auth.close();
    await new Promise((resolve) => server?.close(resolve));
  });

  it("refuses the request as having no rule", async () => {
    const answer = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = request(
        `${url}/v1/other`,
        { ca: certs.ca, agent: false, headers: { authorization: "Bearer tsr_pat_anything" } },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () =>
            resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }),
          );
        },
      );
      req.on("error", reject);
      req.end();
    });
    expect(answer.status, answer.body).toBe(403);
    expect(JSON.parse(answer.body)).toMatchObject({ ok: false, reason: "ACCESS_DENIED" });
    expect(reached).toEqual([]);
  });
});
