import type { ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_PASSWORD, dropSchema, POSTGRES, TEST_MASTER_KEY } from "../helpers.js";
import { killAll, serve, stop } from "./processes.js";

/**
 * Shared verification between two `tessera serve` processes on one PostgreSQL schema: a
 * personal access token PBKDF2-verified by A is accepted by B with no PBKDF2 of B's own
 * (B's /metrics: its hash pool started nothing, one shared-digest hit), and refused by B
 * once A revoked it, though its digest stays stored.
 */

interface Instance {
  url: string;
  child: ChildProcess;
  metricsUrl: string;
}

describe("shared verification across tessera processes (postgres)", () => {
  const url = POSTGRES.url();
  let a: Instance;
  let b: Instance;
  let ca: Buffer;

  beforeAll(async () => {
    const certDir = join(mkdtempSync(join(tmpdir(), "tessera-shared-multi-")), "certs");
    const env = {
      ...(process.env as Record<string, string>),
      TESSERA_DATABASE_URL: url,
      TESSERA_CERT_DIR: certDir,
      TESSERA_HOST: "127.0.0.1",
      TESSERA_PORT: "0",
      TESSERA_ADMIN_PASSWORD: ADMIN_PASSWORD,
      TESSERA_PASSWORD_ITERATIONS: "1000",
      TESSERA_RATE_LIMIT: "false",
      TESSERA_MASTER_KEY: TEST_MASTER_KEY,
      TESSERA_METRICS_LISTEN: "127.0.0.1:0",
      TESSERA_LOG_LEVEL: "info",
    };
    // One after the other: the first migrates and makes the development certificates.
    const started: Instance[] = [];
    for (let i = 0; i < 2; i++) {
      const s = await serve(env);
      if (!s.metricsUrl) throw new Error("no metrics endpoint");
      started.push({ url: s.url, child: s.child, metricsUrl: s.metricsUrl });
    }
    [a, b] = started as [Instance, Instance];
    ca = readFileSync(join(certDir, "ca.crt"));
  }, 180_000);
  afterAll(async () => {
    await Promise.all([a, b].filter(Boolean).map((i) => stop(i.child)));
    killAll();
    await dropSchema(url);
  });

  /** One Connect JSON call over HTTPS (HTTP/1.1, the instance's development CA). */
  async function call(i: Instance, method: string, body: object, token?: string) {
    const { Agent, fetch } = await import("undici");
    const dispatcher = new Agent({ connect: { ca } });
    try {
      const res = await fetch(`${i.url}/tessera.v1.${method}`, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          ...(token ? { authorization: `Bearer ${token}` } : {}),
        },
        body: JSON.stringify(body),
        dispatcher,
      });
      return { status: res.status, body: (await res.json()) as Record<string, unknown> };
    } finally {
      await dispatcher.close();
    }
  }

  async function counter(i: Instance, name: string): Promise<number> {
    const text = await (await fetch(i.metricsUrl)).text();
    const m = new RegExp(`^${name} (\\S+)$`, "m").exec(text);
    return m ? Number(m[1]) : Number.NaN;
  }

  it("accepts on B without PBKDF2 a token A verified, and refuses it on B once A revoked it", async () => {
    const admin = await call(a, "UserService/Login", { username: "admin", password: ADMIN_PASSWORD });
    const adminJwt = admin.body.accessToken as string;
    const pat = await call(a, "TokenService/CreatePersonalAccessToken", { name: "multi" }, adminJwt);
    expect(pat.status).toBe(200);
    const token = pat.body.token as string;

    const hashesA = await counter(a, "tessera_hash_pool_started_total");
    expect((await call(a, "UserService/GetCurrentUser", {}, token)).status).toBe(200);
    expect((await counter(a, "tessera_hash_pool_started_total")) - hashesA).toBe(1);
    // Stored after the answer, by another process: a deadline for a loaded machine, not a count of tries.
    for (
      const end = Date.now() + 20_000;
      (await counter(a, "tessera_secret_cache_shared_writes_total")) < 1 && Date.now() < end;
    )
      await new Promise((r) => setTimeout(r, 25));
    expect(await counter(a, "tessera_secret_cache_shared_writes_total")).toBe(1);

    const hashesB = await counter(b, "tessera_hash_pool_started_total");
    for (let i = 0; i < 3; i++)
      expect((await call(b, "UserService/GetCurrentUser", {}, token)).status).toBe(200);
    expect((await counter(b, "tessera_hash_pool_started_total")) - hashesB).toBe(0);
    expect(await counter(b, "tessera_secret_cache_shared_hits_total")).toBe(1);
    expect(await counter(b, "tessera_secret_cache_hits_total")).toBe(2);

    const revoked = await call(a, "TokenService/RevokePersonalAccessToken", { id: pat.body.id }, adminJwt);
    expect(revoked.status).toBe(200);
    const refused = await call(b, "UserService/GetCurrentUser", {}, token);
    expect(refused.status).toBe(401);
    expect(refused.body.reason).toBe("TOKEN_REVOKED");
  });
});
