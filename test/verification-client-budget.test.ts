import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { VerificationCode, VerificationService } from "../gen/tessera/v1/verification_service_pb.js";
import { generateToken } from "../src/auth/token-format.js";
import { AuditEventRepository } from "../src/storage/repositories/audit.js";
import { clientFor, DATABASES, startTestServer, type TestServer, withHeaders } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";
import { grpcVerifier, grpcVerify } from "./verification-fixtures.js";

/**
 * VerifyCredential's `client_address` against a real server over TLS, as a downstream
 * service's anonymous attacker would use it: bad credentials sent through the downstream
 * spend a budget of that client's, not the downstream's whole one, while the downstream's
 * own budget (across all its clients) still bounds the PBKDF2 work it can cause.
 */
const PER_CLIENT = 3;
const PER_CALLER = 7;

describe.each(DATABASES)("failed verifications per client address on $name", (db) => {
  describe.each([
    { limiter: "memory", redisUrl: undefined },
    { limiter: "redis", redisUrl: "redis://127.0.0.1:6379" },
  ])("with the $limiter limiter", ({ redisUrl }) => {
    let ts: TestServer;
    let root: string;

    beforeAll(async () => {
      ts = await startTestServer(db, {
        rateLimit: {
          enabled: true,
          authFailuresPerIpPerMinute: PER_CLIENT,
          verifyFailuresPerCallerPerMinute: PER_CALLER,
          perIpPerMinute: 10_000,
          ...(redisUrl ? { redisUrl, redisTimeoutMs: 2000 } : {}),
        },
      });
      root = await adminLogin(ts.connect());
    });
    afterAll(async () => {
      await ts?.close();
    });

    /** A new verifying caller (a machine user holding auth:verify): budgets of its own. */
    async function newVerifier() {
      const token = (
        await clients(ts.connect(), root).machines.createMachineUser({
          name: `verifier-${short()}`,
          authType: MachineAuthType.BEARER,
          scopes: ["auth:verify"],
        })
      ).token;
      const client = createClient(
        VerificationService,
        withHeaders(ts.connect(), { authorization: `Bearer ${token}` }),
      );
      const code = async (credential: string, clientAddress?: string) =>
        VerificationCode[(await client.verifyCredential({ credential, clientAddress })).code];
      return { token, client, code };
    }

    /** A personal access token never verified yet: its first use needs PBKDF2, so a reservation. */
    async function newPat(): Promise<string> {
      return (await clientFor(TokenService, ts.connect(), root).createPersonalAccessToken({ name: short() }))
        .token;
    }

    const bogus = () => generateToken("tsr_pat_").token;

    it("lets a second client address verify first uses after a first one spent its budget", async () => {
      const v = await newVerifier();
      const attacker = "203.0.113.66";
      const codes: string[] = [];
      for (let i = 0; i < PER_CLIENT + 2; i++) codes.push(await v.code(bogus(), attacker));
      expect(codes).toEqual([...Array(PER_CLIENT).fill("NOT_FOUND"), "RATE_LIMITED", "RATE_LIMITED"]);
      // A genuine client of the same downstream: its new token's first use is verified.
      expect(await v.code(await newPat(), "198.51.100.7")).toBe("VALID");
      expect(await v.code(bogus(), "198.51.100.7")).toBe("NOT_FOUND");
      // The attacker's address stays refused, also for a genuine token sent from it.
      expect(await v.code(await newPat(), attacker)).toBe("RATE_LIMITED");
      // Another caller naming the same address has its own budget at it.
      const other = await newVerifier();
      expect(await other.code(bogus(), attacker)).toBe("NOT_FOUND");
    });

    it("counts an IPv6 client's whole /64 as one address", async () => {
      const v = await newVerifier();
      for (let i = 0; i < PER_CLIENT; i++)
        expect(await v.code(bogus(), `2001:db8:0:7::${i + 1}`)).toBe("NOT_FOUND");
      expect(await v.code(bogus(), "2001:db8:0:7:ffff::9")).toBe("RATE_LIMITED");
      expect(await v.code(bogus(), "2001:db8:0:8::1")).toBe("NOT_FOUND");
    });

    it("stops a caller spraying bad credentials from many addresses with its own budget", async () => {
      const v = await newVerifier();
      const known = await newPat();
      expect(await v.code(known, "192.0.2.200")).toBe("VALID");
      const codes: string[] = [];
      for (let i = 0; i < PER_CALLER + 2; i++) codes.push(await v.code(bogus(), `192.0.2.${i + 1}`));
      expect(codes).toEqual([...Array(PER_CALLER).fill("NOT_FOUND"), "RATE_LIMITED", "RATE_LIMITED"]);
      // A first use needs PBKDF2, which the caller's spent budget no longer allows from any address.
      expect(await v.code(await newPat(), "192.0.2.150")).toBe("RATE_LIMITED");
      const limited = await v.client.verifyCredential({ credential: bogus(), clientAddress: "192.0.2.151" });
      expect(limited.retryAfterSeconds).toBeGreaterThan(0);
      // A credential verified before costs no hash: still answered.
      expect(await v.code(known, "192.0.2.152")).toBe("VALID");
    });

    it("keeps the caller's one budget without client_address, apart from its clients' budgets", async () => {
      const v = await newVerifier();
      const codes: string[] = [];
      for (let i = 0; i < PER_CLIENT + 1; i++) codes.push(await v.code(bogus()));
      expect(codes).toEqual([...Array(PER_CLIENT).fill("NOT_FOUND"), "RATE_LIMITED"]);
      expect(await v.code(await newPat())).toBe("RATE_LIMITED");
      // The failures without an address spent neither a client's budget nor the caller-wide one.
      const named: string[] = [];
      for (let i = 0; i < PER_CALLER; i++) named.push(await v.code(bogus(), `198.18.0.${i + 1}`));
      expect(named).toEqual(Array(PER_CALLER).fill("NOT_FOUND"));
    });

    it("refuses a client_address that is not an IP address with INVALID_ARGUMENT, over Connect and gRPC", async () => {
      const v = await newVerifier();
      const pat = await newPat();
      for (const clientAddress of [
        "verify:machine:someone-else",
        "localhost",
        "203.0.113.7:443",
        " 203.0.113.7",
        "1.2.3.4/24",
        `2001:db8::1%${"x".repeat(64)}`,
      ]) {
        const err = await v.client.verifyCredential({ credential: pat, clientAddress }).then(
          () => undefined,
          (e: unknown) => ConnectError.from(e),
        );
        expect(err?.code, clientAddress).toBe(Code.InvalidArgument);
      }
      const grpc = grpcVerifier(ts.server.port, ts.certs.ca);
      try {
        await expect(
          grpcVerify(grpc, pat, { client_address: "not an address" }, v.token),
        ).rejects.toMatchObject({
          code: 3,
        });
        expect((await grpcVerify(grpc, pat, { client_address: "::ffff:203.0.113.7" }, v.token)).code).toBe(
          "VALID",
        );
      } finally {
        grpc.close();
      }
    });

    it("audits the verification with the client's address as its ip", async () => {
      const v = await newVerifier();
      const answer = await v.client.verifyCredential({
        credential: bogus(),
        clientAddress: "::ffff:203.0.113.99",
      });
      await ts.app.audit.flush();
      const rows = await new AuditEventRepository(ts.app.sql).list(
        { action: "credential.verify", outcome: "failure" },
        500,
      );
      expect(VerificationCode[answer.code]).toBe("NOT_FOUND");
      const row = rows.find((r) => r.ip === "203.0.113.99");
      expect(row).toMatchObject({ actorKind: "machine", reason: "NOT_FOUND" });
    });
  });
});
