import { crc32 } from "node:zlib";
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from "vitest";
import type { App } from "../src/app.js";
import { generateToken, parseToken } from "../src/auth/token-format.js";
import { Code, rejection } from "./errors-util.js";
import { createTestApp, DATABASES, memoryTransport } from "./helpers.js";
import { adminLogin, basic, basicMachine, bearerMachine, clients } from "./machine-fixtures.js";

// Count every PBKDF2 verification (the verified-secret cache, the user and machine
// verifiers and the dummy hash all go through verifySecret).
const pbkdf2 = vi.hoisted(() => ({ calls: 0 }));
vi.mock("../src/auth/password.js", async (importOriginal) => {
  const real = await importOriginal<typeof import("../src/auth/password.js")>();
  return {
    ...real,
    verifySecret: async (secret: string, stored: string) => {
      pbkdf2.calls++;
      return real.verifySecret(secret, stored);
    },
  };
});

/** Count PBKDF2 runs during `fn`. */
async function pbkdf2Runs(fn: () => Promise<unknown>): Promise<number> {
  const before = pbkdf2.calls;
  await fn().catch(() => undefined);
  return pbkdf2.calls - before;
}

const ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/** A well-formed token (valid checksum) with the given id and a secret nobody issued. */
function forgeWithId(prefix: string, id: string): string {
  const head = `${prefix}${id}${"x".repeat(32)}`;
  let v = crc32(head) >>> 0;
  let sum = "";
  do {
    sum = ALPHABET[v % 62] + sum;
    v = Math.floor(v / 62);
  } while (v > 0);
  return `${head}${sum.padStart(6, "0")}`;
}

describe.each(DATABASES)("machine credential verification cost on $name", (db) => {
  let app: App;
  let root: string;
  const as = (auth?: string | Record<string, string>) => clients(memoryTransport(app), auth);

  beforeAll(async () => {
    app = await createTestApp(db);
    root = await adminLogin(memoryTransport(app));
  });
  afterAll(async () => {
    await app.close();
  });
  beforeEach(() => {
    app.secrets.clear();
  });

  it("runs PBKDF2 for a Basic password once, then recognises it from the cache", async () => {
    const m = await basicMachine(memoryTransport(app), root, []);
    const check = () => as(basic(m.username, m.password)).machines.checkAuthentication({});
    expect(await pbkdf2Runs(check)).toBe(1);
    for (let i = 0; i < 5; i++) expect(await pbkdf2Runs(check)).toBe(0);
    expect((await check()).machineUserId).toBe(m.machine.id);
  });

  it("runs PBKDF2 for a machine token once, and never for a malformed or unknown token", async () => {
    const { token } = await bearerMachine(memoryTransport(app), root, []);
    const check = (t: string) => () => as(t).machines.checkAuthentication({});
    expect(await pbkdf2Runs(check(token))).toBe(1);
    expect(await pbkdf2Runs(check(token))).toBe(0);
    expect(await pbkdf2Runs(check(`${token.slice(0, -1)}!`))).toBe(0);
    expect(await pbkdf2Runs(check(generateToken("tsr_mu_").token))).toBe(0);
  });

  it("refuses a well-formed token with a known id but the wrong secret after one PBKDF2", async () => {
    const { token } = await bearerMachine(memoryTransport(app), root, []);
    const parsed = parseToken(token, ["tsr_mu_"]);
    if (parsed === null || parsed === "malformed") throw new Error("bad token");
    const forged = forgeWithId("tsr_mu_", parsed.id);
    expect(parseToken(forged, ["tsr_mu_"])).not.toBe("malformed");
    let r: Awaited<ReturnType<typeof rejection>> | undefined;
    expect(
      await pbkdf2Runs(async () => (r = await rejection(as(forged).machines.checkAuthentication({})))),
    ).toBe(1);
    expect(r?.reason).toBe("TOKEN_INVALID");
  });

  it("costs exactly one dummy PBKDF2 for an unknown username, machine-shaped or not", async () => {
    for (const username of ["mu_nobodyhere0000", "nobody-human"]) {
      let r: Awaited<ReturnType<typeof rejection>> | undefined;
      const runs = await pbkdf2Runs(
        async () =>
          (r = await rejection(as(basic(username, "some password")).machines.checkAuthentication({}))),
      );
      expect(runs, username).toBe(1);
      expect(r?.code).toBe(Code.Unauthenticated);
      expect(r?.reason).toBe("CREDENTIALS_INVALID");
    }
  });

  it("sends machine usernames straight to the machine verifier (no user look-up, no second PBKDF2)", async () => {
    const m = await basicMachine(memoryTransport(app), root, []);
    expect(
      await pbkdf2Runs(() => as(basic(m.username, "wrong password")).machines.checkAuthentication({})),
    ).toBe(1);
  });
});

describe.each(DATABASES)("wrong Basic passwords under the authentication-failure limit on $name", (db) => {
  let app: App;

  beforeAll(async () => {
    app = await createTestApp(db, { rateLimit: { enabled: true, authFailuresPerIpPerMinute: 3 } });
  });
  afterAll(async () => {
    await app.close();
  });

  it("stops reaching PBKDF2 once the IP is over the limit, refusing even the right password with RATE_LIMITED", async () => {
    const root = await adminLogin(memoryTransport(app));
    const m = await basicMachine(memoryTransport(app), root, []);
    const as = (auth: Record<string, string>) => clients(memoryTransport(app), auth);
    for (let i = 0; i < 3; i++) {
      let r: Awaited<ReturnType<typeof rejection>> | undefined;
      const runs = await pbkdf2Runs(
        async () =>
          (r = await rejection(
            as(basic(m.username, `wrong password ${i}`)).machines.checkAuthentication({}),
          )),
      );
      expect(runs).toBe(1);
      expect(r?.reason).toBe("CREDENTIALS_INVALID");
    }
    for (const password of ["wrong password 4", m.password]) {
      let r: Awaited<ReturnType<typeof rejection>> | undefined;
      const runs = await pbkdf2Runs(
        async () => (r = await rejection(as(basic(m.username, password)).machines.checkAuthentication({}))),
      );
      expect(runs).toBe(0);
      expect(r?.code).toBe(Code.ResourceExhausted);
      expect(r?.reason).toBe("RATE_LIMITED");
      expect(Number(r?.error.metadata.get("retry-after"))).toBeGreaterThan(0);
    }
  });
});
