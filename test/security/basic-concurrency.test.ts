import { randomUUID } from "node:crypto";
import { createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import { DATABASES, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { adminLogin, basic, basicMachine, clients, tenantWithAdmin } from "../machine-fixtures.js";
import { freshIps, LIMITS_ON } from "./fixtures.js";

/**
 * A client sending its correct HTTP Basic credential on many connections at once is not a
 * guesser: the per-username-at-an-IP failure budget (5 by default) must not refuse it, cold
 * (nothing verified yet) or warm (verified before), with the memory or the Redis limiter.
 */
const LIMITS = LIMITS_ON;
const CONCURRENT = 30;
const PASSWORD = "service password one";

/** A client address no other test uses (Redis keeps its counts across runs). */
const freshIp = freshIps("100.64");

async function settle(calls: Array<Promise<unknown>>): Promise<{ accepted: number; refused: string[] }> {
  const results = await Promise.allSettled(calls);
  const refused = results
    .filter((r): r is PromiseRejectedResult => r.status === "rejected")
    .map((r) => String((r.reason as { rawMessage?: string }).rawMessage ?? r.reason));
  return { accepted: results.length - refused.length, refused };
}

describe.each(DATABASES)("concurrent correct HTTP Basic on $name", (db) => {
  describe.each([
    { limiter: "memory", redisUrl: undefined },
    { limiter: "redis", redisUrl: "redis://127.0.0.1:6379" },
  ])("with the $limiter limiter", ({ redisUrl }) => {
    let ts: TestServer;
    let transport: Transport;
    let adminToken: string;
    const from = (ip: string, headers: Record<string, string>) =>
      withHeaders(transport, { ...headers, "x-forwarded-for": ip });

    beforeAll(async () => {
      ts = await startTestServer(db, {
        rateLimit: { ...LIMITS, ...(redisUrl ? { redisUrl, redisTimeoutMs: 2000 } : {}) },
        server: { trustedProxies: ["127.0.0.1"] },
        // Hashing slow enough that the first uses overlap; a queue that never refuses here.
        auth: { passwordIterations: 50_000, hashConcurrency: 1, hashQueue: 1000 },
      });
      transport = ts.connect();
      adminToken = await adminLogin(from(freshIp(), {}));
    });
    afterAll(async () => {
      await ts.close();
    });

    async function newUser(): Promise<string> {
      const username = `svc-${randomUUID().slice(0, 8)}`;
      await clients(transport, adminToken).users.createUser({ username, password: PASSWORD, scopes: [] });
      return username;
    }

    it("accepts 30 concurrent first uses of a user's password, with one PBKDF2 run", async () => {
      const username = await newUser();
      const users = createClient(UserService, from(freshIp(), basic(username, PASSWORD)));
      const before = hashPool().stats().started;
      const { accepted, refused } = await settle(
        Array.from({ length: CONCURRENT }, () => users.getCurrentUser({})),
      );
      expect(refused).toEqual([]);
      expect(accepted).toBe(CONCURRENT);
      expect(hashPool().stats().started - before).toBe(1);
    });

    it("accepts 30 concurrent uses of a user's password verified before, with no PBKDF2 run", async () => {
      const username = await newUser();
      const users = createClient(UserService, from(freshIp(), basic(username, PASSWORD)));
      await users.getCurrentUser({});
      for (let burst = 0; burst < 3; burst++) {
        const before = hashPool().stats().started;
        const { refused } = await settle(Array.from({ length: CONCURRENT }, () => users.getCurrentUser({})));
        expect(refused).toEqual([]);
        expect(hashPool().stats().started - before).toBe(0);
      }
    });

    it("accepts 30 concurrent uses of a machine user's Basic credential, cold and warm", async () => {
      const tenant = await tenantWithAdmin(transport, adminToken);
      const m = await basicMachine(transport, tenant.token, [tenant.application.id]);
      const machines = clients(from(freshIp(), basic(m.username, m.password))).machines;
      for (const phase of ["cold", "warm"]) {
        const { refused } = await settle(
          Array.from({ length: CONCURRENT }, () => machines.checkAuthentication({})),
        );
        expect({ phase, refused }).toEqual({ phase, refused: [] });
      }
    });

    it("still refuses concurrent distinct wrong passwords from one address past the per-username budget", async () => {
      const username = await newUser();
      const ip = freshIp();
      // Distinct guesses: identical ones share one verdict (and one reservation).
      const results = await Promise.allSettled(
        Array.from({ length: 10 }, (_, i) =>
          createClient(UserService, from(ip, basic(username, `wrong ${i}`))).getCurrentUser({}),
        ),
      );
      const reasons = results.map((r) =>
        r.status === "rejected" ? (r.reason as { rawMessage: string }).rawMessage : "accepted",
      );
      expect(reasons.filter((r) => r === "invalid username or password")).toHaveLength(5);
      expect(reasons.filter((r) => /too many failed authentication attempts/.test(r))).toHaveLength(5);
    });
  });
});
