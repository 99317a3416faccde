import { crc32 } from "node:zlib";
import { createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  DATABASES,
  startTestServer,
  type TestServer,
  withHeaders,
} from "../helpers.js";
import { freshIps, LIMITS_ON } from "./fixtures.js";

/**
 * The adversarial review of 2026-12-11 (the semantic side: credentials, revocation, OAuth,
 * SDK, several instances), against a real server over TLS: each test is a finding of that
 * review, failing on the main it was found on, and holds with its fix.
 */
const BUDGET = 20;
const PAT_PREFIX = "tsr_pat_";
const ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/** A well-formed token (valid checksum) with a real token's id and a secret of our choosing. */
function withSecret(token: string, secret: string): string {
  const head = `${token.slice(0, PAT_PREFIX.length + 16)}${secret}`;
  let v = crc32(head) >>> 0;
  let sum = "";
  do {
    sum = ALPHABET[v % 62] + sum;
    v = Math.floor(v / 62);
  } while (v > 0);
  return `${head}${sum.padStart(6, "0")}`;
}

const freshIp = freshIps("198.19");

describe.each(DATABASES)("review 2026-12-11 (semantic) on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let admin: string;
  let pat: string;
  const apiKeyFrom = (ip: string, token: string) =>
    createClient(UserService, withHeaders(transport, { "x-forwarded-for": ip, "x-api-key": token }));

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { ...LIMITS_ON, authFailuresPerIpPerMinute: BUDGET },
      server: { trustedProxies: ["127.0.0.1"] },
      auth: { passwordIterations: 20_000, hashConcurrency: 2, hashQueue: 1000 },
    });
    transport = ts.connect();
    admin = (
      await createClient(UserService, withHeaders(transport, { "x-forwarded-for": freshIp() })).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    pat = (
      await clientFor(TokenService, transport, admin).createPersonalAccessToken({ name: "real", scopes: [] })
    ).token;
  });
  afterAll(async () => {
    await ts.close();
  });

  it("X-API-Key: 40 concurrent guesses at a token's secret from one IP get at most its budget of verdicts and PBKDF2 runs (as Bearer)", async () => {
    const ip = freshIp();
    const before = hashPool().stats().started;
    const results = await Promise.allSettled(
      Array.from({ length: 2 * BUDGET }, (_, i) =>
        apiKeyFrom(ip, withSecret(pat, `${"k".repeat(30)}${ALPHABET[i]!}${ALPHABET[i + 1]!}`)).getCurrentUser(
          {},
        ),
      ),
    );
    const messages = results.map((r) =>
      r.status === "rejected" ? (r.reason as { rawMessage: string }).rawMessage : "accepted",
    );
    expect(messages.filter((m) => m === "token is not recognised")).toHaveLength(BUDGET);
    expect(messages.filter((m) => /too many failed authentication attempts/.test(m))).toHaveLength(BUDGET);
    expect(hashPool().stats().started - before).toBeLessThanOrEqual(BUDGET);
    // Over budget: a further guess costs no PBKDF2 at all.
    const after = hashPool().stats().started;
    await expect(apiKeyFrom(ip, withSecret(pat, `${"z".repeat(30)}zz`)).getCurrentUser({})).rejects.toThrow(
      /too many failed authentication attempts/,
    );
    expect(hashPool().stats().started).toBe(after);
  });
});
