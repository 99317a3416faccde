import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { Agent, request } from "undici";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { MachineAuthType, MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { createApp } from "../../src/app.js";
import { HashPool } from "../../src/auth/hash-pool.js";
import type { Pbkdf2Job } from "../../src/auth/hash-workers.js";
import { parseHash } from "../../src/auth/password.js";
import { generateToken, parseToken } from "../../src/auth/token-format.js";
import {
  DATABASES,
  memoryTransport,
  silentLogger,
  startTestServer,
  type TestServer,
  testConfig,
  withHeaders,
} from "../helpers.js";
import { adminLogin, basic, clients, short } from "../machine-fixtures.js";

/** Iterations the secrets were hashed with, and those of the restarted server. */
const OLD_ITERATIONS = 1_000;
const NEW_ITERATIONS = 1_500;
const USER_PASSWORD = "a password made long ago";

interface Credential {
  id: string;
  username: string;
  password: string;
}

/**
 * A Basic pair for an unknown machine-user name is checked against a stand-in hash at the
 * current `auth.passwordIterations`; a machine user whose secret was hashed before that
 * changed took another PBKDF2 to refuse a wrong secret, telling its name apart from an
 * unknown one. Its secret is re-hashed at the current count on its next successful check,
 * wherever that is (an RPC's Basic, OAuth client authentication, VerifyCredential), and a
 * refused account's check costs the stand-in's. Made by a server at one count, served over
 * TLS by a restarted one at another, with rate limits on (admission's budget-free try first).
 * PBKDF2 work is counted by the iterations of each hash the pool runs, never by wall time.
 */
describe.each(DATABASES)("machine users' Basic secrets re-hashed on use on $name", (db) => {
  let url: string;
  let ts: TestServer;
  let agent: Agent;
  let root: string;
  /** A bearer machine user holding auth:verify (VerifyCredential's caller). */
  let verifier: string;
  const mus: Record<string, Credential> = {};
  const users: Record<string, string> = {};
  const original = HashPool.prototype.pbkdf2;
  /** Iterations of every PBKDF2 the pool ran since {@link counting} was last called. */
  let ran: number[] = [];
  /** Run once before the next hash at NEW_ITERATIONS (then called through), when set. */
  let beforeNextNew: (() => Promise<void>) | undefined;

  beforeAll(async () => {
    url =
      db.name === "sqlite"
        ? `sqlite:${join(mkdtempSync(join(tmpdir(), "tessera-mu-rehash-")), "t.db")}`
        : db.url();
    const before = await createApp(testConfig(url, { auth: { passwordIterations: OLD_ITERATIONS } }), {
      logger: silentLogger,
    });
    try {
      const mem = memoryTransport(before);
      const admin = clients(mem, await adminLogin(mem));
      const names = [
        "digested",
        "oauth",
        "post",
        "verify",
        "guessed",
        "disabled",
        "oracle",
        "gone",
        "graced",
      ];
      for (const name of names) {
        const res = await admin.machines.createMachineUser({
          name: `mu-${name}-${short()}`,
          authType: MachineAuthType.BASIC,
        });
        mus[name] = { id: res.machineUser!.id, username: res.username, password: res.password };
      }
      // Verified once here: the shared digest of its secret is stored beside the old hash, so
      // the restarted server recognises it with no PBKDF2 (where hashing is refused).
      const digested = mus.digested!;
      await clients(mem, basic(digested.username, digested.password)).machines.checkAuthentication({});
      await admin.machines.updateMachineUser({ id: mus.disabled!.id, disabled: true });
      verifier = (
        await admin.machines.createMachineUser({
          name: `mu-verifier-${short()}`,
          authType: MachineAuthType.BEARER,
          scopes: ["auth:verify"],
        })
      ).token;
      for (const name of ["disabled-user"]) {
        const { user } = await admin.users.createUser({ username: name, password: USER_PASSWORD });
        users[name] = user!.id;
        await admin.users.updateUser({ id: user!.id, disabled: true });
      }
    } finally {
      await before.close();
    }
    ts = await startTestServer(
      { name: db.name, url: () => url },
      {
        auth: { passwordIterations: NEW_ITERATIONS },
        rateLimit: { enabled: true },
        metrics: { listen: "127.0.0.1:0" },
      },
    );
    agent = new Agent({ connect: { ca: ts.certs.ca } });
    root = await adminLogin(ts.connect());
    // The stand-in hash made once, as any earlier refusal of an unknown name would have.
    await machineCheck("mu_nobody-warm-up", "wrong").catch(() => undefined);
    vi.spyOn(HashPool.prototype, "pbkdf2").mockImplementation(async function (
      this: HashPool,
      job: Pbkdf2Job,
      purpose,
    ) {
      ran.push(job.iterations);
      const hook = beforeNextNew;
      if (hook !== undefined && job.iterations === NEW_ITERATIONS) {
        beforeNextNew = undefined;
        await hook();
      }
      return original.call(this, job, purpose);
    });
  }, 120_000);

  afterEach(() => {
    beforeNextNew = undefined;
  });

  afterAll(async () => {
    vi.restoreAllMocks();
    await agent?.close();
    await ts?.close();
  });

  /** The stored row of a machine credential by its Basic username (undefined: none). */
  async function row(username: string) {
    return ts.app.sql.get<{ secret_hash: string; verified_digest: string | null; expires_at: unknown }>(
      "select secret_hash, verified_digest, expires_at from machine_credentials where public_id = ?",
      [username],
    );
  }
  /** `tessera_password_hash_upgrades_total` of machine users' secrets with `outcome`, as scraped. */
  async function upgrades(outcome: "upgraded" | "deferred" | "failed"): Promise<number> {
    const metric = await ts.app
      .metrics!.registry.getSingleMetric("tessera_password_hash_upgrades_total")!
      .get();
    return metric.values.find((v) => v.labels.kind === "machine" && v.labels.outcome === outcome)?.value ?? 0;
  }
  const iterationsOf = async (c: Credential) => parseHash((await row(c.username))!.secret_hash)!.iterations;

  /** The iterations of every PBKDF2 `call` made (settled either way). */
  async function counting(call: () => Promise<unknown>): Promise<number[]> {
    ran = [];
    await call().catch(() => undefined);
    const seen = ran;
    ran = [];
    return seen;
  }

  function machineCheck(username: string, password: string) {
    return createClient(
      MachineUserService,
      withHeaders(ts.connect(), basic(username, password)),
    ).checkAuthentication({});
  }

  async function refused(call: Promise<unknown>): Promise<ConnectError> {
    const err = await call.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ConnectError);
    return err as ConnectError;
  }

  async function tokenEndpoint(body: Record<string, string>, headers: Record<string, string> = {}) {
    const res = await request(`${ts.server.url}/oauth2/token`, {
      method: "POST",
      dispatcher: agent,
      headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
      body: new URLSearchParams(body).toString(),
    });
    return { status: res.statusCode, json: (await res.body.json()) as Record<string, string> };
  }

  it("refuses a wrong secret with the unknown name's PBKDF2 once the secret was re-hashed by a successful Basic check", async () => {
    const oracle = mus.oracle!;
    const unknown = await counting(() => machineCheck("mu_nobody-at-all", "a wrong secret"));
    expect(unknown).toEqual([NEW_ITERATIONS]);
    expect(await counting(() => machineCheck(oracle.username, "a wrong secret"))).toEqual([OLD_ITERATIONS]);
    const ok = await machineCheck(oracle.username, oracle.password);
    expect(ok.machineUserId).toBe(oracle.id);
    expect(await iterationsOf(oracle)).toBe(NEW_ITERATIONS);
    expect(await counting(() => machineCheck(oracle.username, "another wrong secret"))).toEqual(unknown);
  });

  it("re-hashes a secret the shared digest recognised with no PBKDF2, and stores the new hash's digest with it", async () => {
    const digested = mus.digested!;
    const old = await row(digested.username);
    expect(old!.verified_digest).not.toBeNull();
    expect(parseHash(old!.secret_hash)!.iterations).toBe(OLD_ITERATIONS);
    const before = await upgrades("upgraded");
    expect(await counting(() => machineCheck(digested.username, digested.password))).toEqual([
      NEW_ITERATIONS,
    ]);
    const upgraded = await row(digested.username);
    expect(parseHash(upgraded!.secret_hash)!.iterations).toBe(NEW_ITERATIONS);
    expect(upgraded!.verified_digest).not.toBeNull();
    expect(upgraded!.verified_digest).not.toBe(old!.verified_digest);
    expect(await upgrades("upgraded")).toBe(before + 1);
    // Known at once, here by the in-process cache and elsewhere by the new digest: no PBKDF2.
    expect(await counting(() => machineCheck(digested.username, digested.password))).toEqual([]);
    ts.app.secrets.clear();
    expect(await counting(() => machineCheck(digested.username, digested.password))).toEqual([]);
  });

  it("re-hashes on OAuth client authentication, client_secret_basic and client_secret_post", async () => {
    const { oauth, post } = { oauth: mus.oauth!, post: mus.post! };
    const pair = Buffer.from(`${oauth.username}:${oauth.password}`).toString("base64");
    const viaBasic = await tokenEndpoint(
      { grant_type: "client_credentials" },
      { authorization: `Basic ${pair}` },
    );
    expect(viaBasic.status).toBe(200);
    expect(await iterationsOf(oauth)).toBe(NEW_ITERATIONS);
    const viaPost = await tokenEndpoint({
      grant_type: "client_credentials",
      client_id: post.username,
      client_secret: post.password,
    });
    expect(viaPost.status).toBe(200);
    expect(await iterationsOf(post)).toBe(NEW_ITERATIONS);
  });

  it("re-hashes on VerifyCredential's Basic pair", async () => {
    const verify = mus.verify!;
    const verification = createClient(
      VerificationService,
      withHeaders(ts.connect(), { authorization: `Bearer ${verifier}` }),
    );
    const pair = Buffer.from(`${verify.username}:${verify.password}`).toString("base64");
    const answer = await verification.verifyCredential({ credential: `Basic ${pair}` });
    expect(answer.code).toBe(VerificationCode.VALID);
    expect(answer.principalId).toBe(verify.id);
    expect(await iterationsOf(verify)).toBe(NEW_ITERATIONS);
  });

  it("rewrites nothing on a wrong secret, and re-hashes at the next right one", async () => {
    const guessed = mus.guessed!;
    const old = await row(guessed.username);
    const err = await refused(machineCheck(guessed.username, `${guessed.password}x`));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(await row(guessed.username)).toEqual(old);
    await machineCheck(guessed.username, guessed.password);
    expect(await iterationsOf(guessed)).toBe(NEW_ITERATIONS);
  });

  it("checks a disabled machine user's right secret against the stand-in, and rewrites nothing", async () => {
    const disabled = mus.disabled!;
    const old = await row(disabled.username);
    const spent = await counting(() => machineCheck(disabled.username, disabled.password));
    expect(spent).toEqual([NEW_ITERATIONS]);
    const err = await refused(machineCheck(disabled.username, disabled.password));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(await row(disabled.username)).toEqual(old);
  });

  it("checks a disabled user's password against the stand-in on Login and HTTP Basic alike", async () => {
    const name = "disabled-user";
    const login = () =>
      createClient(UserService, ts.connect()).login({ username: name, password: USER_PASSWORD });
    expect(await counting(login)).toEqual([NEW_ITERATIONS]);
    const me = () =>
      createClient(UserService, withHeaders(ts.connect(), basic(name, USER_PASSWORD))).getCurrentUser({});
    expect(await counting(me)).toEqual([NEW_ITERATIONS]);
    expect((await refused(me())).code).toBe(Code.Unauthenticated);
  });

  it("never puts a re-hash over a rotation that deleted the credential meanwhile", async () => {
    const gone = mus.gone!;
    const machines = clients(ts.connect(), root).machines;
    let rotated: { username: string; password: string } | undefined;
    // The rotation commits between the check that accepted the old secret and the store of its re-hash.
    beforeNextNew = async () => {
      rotated = await machines.rotateMachineUserCredentials({ id: gone.id, gracePeriodSeconds: 0 });
    };
    const before = await upgrades("upgraded");
    expect((await machineCheck(gone.username, gone.password)).machineUserId).toBe(gone.id);
    expect(rotated).toBeDefined();
    expect(await row(gone.username)).toBeUndefined();
    // Hashed, but not stored: the row it was checked against is gone.
    expect(await upgrades("upgraded")).toBe(before);
    expect(await upgrades("failed")).toBe(0);
    // The rotation stands: the new pair works, the old one is refused.
    expect((await machineCheck(rotated!.username, rotated!.password)).machineUserId).toBe(gone.id);
    expect((await refused(machineCheck(gone.username, gone.password))).code).toBe(Code.Unauthenticated);
  });

  it("keeps the expiry a rotation gave the old credential meanwhile when its re-hash is stored", async () => {
    const graced = mus.graced!;
    const machines = clients(ts.connect(), root).machines;
    let ends: Date | undefined;
    beforeNextNew = async () => {
      const res = await machines.rotateMachineUserCredentials({ id: graced.id, gracePeriodSeconds: 3600 });
      ends = new Date(Number(res.previousCredentialsExpireAt!.seconds) * 1000);
    };
    await machineCheck(graced.username, graced.password);
    expect(ends).toBeDefined();
    const now = await row(graced.username);
    expect(parseHash(now!.secret_hash)!.iterations).toBe(NEW_ITERATIONS);
    expect(now!.expires_at).not.toBeNull();
    expect(
      Math.abs(new Date(now!.expires_at as string | number | Date).getTime() - ends!.getTime()),
    ).toBeLessThan(1_000);
    // Still within its grace period, with its re-hashed secret.
    expect((await machineCheck(graced.username, graced.password)).machineUserId).toBe(graced.id);
  });

  it("audit: a machine token is told apart by its public id before any PBKDF2, so its hash's iterations add nothing", async () => {
    const prefix = ts.app.config.auth.tokens.machinePrefix;
    const bearer = (token: string) =>
      createClient(
        MachineUserService,
        withHeaders(ts.connect(), { authorization: `Bearer ${token}` }),
      ).checkAuthentication({});
    // An unknown id: refused with no PBKDF2 at all (the id is 16 random characters found only inside the token).
    expect(await counting(() => bearer(generateToken(prefix).token))).toEqual([]);
    // Its id with a wrong secret: one PBKDF2 at the count it was made with, never re-made.
    const known = parseToken(verifier, [prefix]);
    if (known === null || known === "malformed") throw new Error("not a machine token");
    expect(await counting(() => bearer(withSecret(prefix, known.id, generateToken(prefix).secret)))).toEqual([
      OLD_ITERATIONS,
    ]);
  });
});

/** A well-formed opaque token with this id and secret (its CRC32 checksum as token-format.ts makes it). */
function withSecret(prefix: string, id: string, secret: string): string {
  const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  const head = `${prefix}${id}${secret}`;
  let v = crc32(head) >>> 0;
  let sum = "";
  do {
    sum = alphabet[v % 62] + sum;
    v = Math.floor(v / 62);
  } while (v > 0);
  return `${head}${sum.padStart(6, "0")}`;
}
