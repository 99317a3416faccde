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
 * Opaque tokens (personal access tokens, API keys, machine tokens) cost a PBKDF2 on first
 * use: one IP's concurrent guesses at a token's secret must not all reach PBKDF2 (the
 * budget was read before hashing and spent after), while a real token used on many
 * connections at once is not refused.
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

const freshIp = freshIps("198.18");

describe.each(DATABASES)("concurrent opaque tokens on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let pat: string;
  const from = (ip: string, token: string) =>
    createClient(
      UserService,
      withHeaders(transport, { "x-forwarded-for": ip, authorization: `Bearer ${token}` }),
    );

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { ...LIMITS_ON, authFailuresPerIpPerMinute: BUDGET },
      server: { trustedProxies: ["127.0.0.1"] },
      auth: { passwordIterations: 20_000, hashConcurrency: 2, hashQueue: 1000 },
    });
    transport = ts.connect();
    const admin = (
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

  it("gives 40 concurrent guesses at a token's secret from one IP at most its budget of verdicts and PBKDF2 runs", async () => {
    const ip = freshIp();
    const before = hashPool().stats().started;
    const results = await Promise.allSettled(
      Array.from({ length: 2 * BUDGET }, (_, i) =>
        from(ip, withSecret(pat, `${"g".repeat(30)}${ALPHABET[i]!}${ALPHABET[i + 1]!}`)).getCurrentUser({}),
      ),
    );
    const messages = results.map((r) =>
      r.status === "rejected" ? (r.reason as { rawMessage: string }).rawMessage : "accepted",
    );
    expect(messages.filter((m) => m === "token is not recognised")).toHaveLength(BUDGET);
    expect(messages.filter((m) => /too many failed authentication attempts/.test(m))).toHaveLength(BUDGET);
    expect(hashPool().stats().started - before).toBeLessThanOrEqual(BUDGET);
  });

  it("accepts 30 concurrent first uses of a real token from one IP, with one PBKDF2 run, and the token again once the IP is over budget", async () => {
    const admin = (
      await createClient(UserService, withHeaders(transport, { "x-forwarded-for": freshIp() })).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    const fresh = (
      await clientFor(TokenService, transport, admin).createPersonalAccessToken({ name: "fresh", scopes: [] })
    ).token;
    const ip = freshIp();
    const before = hashPool().stats().started;
    const results = await Promise.allSettled(
      Array.from({ length: 30 }, () => from(ip, fresh).getCurrentUser({})),
    );
    expect(results.filter((r) => r.status === "rejected")).toEqual([]);
    expect(hashPool().stats().started - before).toBe(1);
    // The IP spends its budget on guesses; the token verified before is still accepted.
    for (let i = 0; i < BUDGET + 1; i++)
      await from(ip, withSecret(pat, `${"h".repeat(30)}${ALPHABET[i]!}x`))
        .getCurrentUser({})
        .catch(() => undefined);
    await expect(from(ip, fresh).getCurrentUser({})).resolves.toBeDefined();
  });
});
