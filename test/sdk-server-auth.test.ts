import { generateKeyPairSync, type KeyObject, sign } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { afterEach, describe, expect, it } from "vitest";
import {
  RevocationKind,
  VerificationCode,
  VerificationService,
  VerifiedPrincipalKind,
  type VerifyCredentialResponseSchema,
} from "../gen/tessera/v1/verification_service_pb.js";
import {
  createTesseraAuth,
  type JwtVerifyMode,
  type TesseraAuth,
  TesseraAuthError,
  type TesseraPrincipal,
} from "../src/sdk/server/index.js";
import { FakeStream } from "./sdk-fake-watch.js";

/**
 * The interceptor's core against an in-memory VerificationService whose WatchRevocations
 * stream the test drives message by message, on a manual clock: the cache is used only
 * while the stream vouches for it, each event drops what it names, and an access token is
 * checked offline against Tessera's keys and the revocations heard.
 */

type Answer = MessageInitShape<typeof VerifyCredentialResponseSchema>;

interface Fake {
  verifyCalls: number;
  /** VerifyCredential calls not answered yet, and the most there were at once. */
  inFlight: number;
  peakInFlight: number;
  /** While set, VerifyCredential waits for it before answering. */
  hold?: Promise<void> | undefined;
  answers: Map<string, Answer>;
  down: boolean;
  watchRefused: boolean;
  streams: FakeStream[];
  cursors: string[];
}

function fakeTessera(): { fake: Fake; transport: ReturnType<typeof createRouterTransport> } {
  const fake: Fake = {
    verifyCalls: 0,
    inFlight: 0,
    peakInFlight: 0,
    answers: new Map(),
    down: false,
    watchRefused: false,
    streams: [],
    cursors: [],
  };
  const transport = createRouterTransport(({ service }) =>
    service(VerificationService, {
      async verifyCredential(req) {
        fake.verifyCalls++;
        fake.peakInFlight = Math.max(fake.peakInFlight, ++fake.inFlight);
        try {
          // Decided when asked; `hold` delays only its arrival.
          const answer = fake.answers.get(req.credential) ?? {
            valid: false,
            code: VerificationCode.NOT_FOUND,
          };
          if (fake.hold) await fake.hold;
          if (fake.down) throw new ConnectError("storage down", Code.Unavailable);
          return answer;
        } finally {
          fake.inFlight--;
        }
      },
      async *watchRevocations(req, ctx) {
        if (fake.watchRefused) throw new ConnectError("not implemented", Code.Unimplemented);
        fake.cursors.push(req.cursor);
        const stream = new FakeStream();
        fake.streams.push(stream);
        yield* stream.messages(ctx.signal);
      },
    }),
  );
  return { fake, transport };
}

const valid = (over: Answer = {}): Answer => ({
  valid: true,
  code: VerificationCode.VALID,
  principalId: "user-1",
  principalKind: VerifiedPrincipalKind.USER,
  tenantId: "tenant-1",
  scopes: ["workflows:read"],
  credentialId: "cred-1",
  credentialKind: "pat",
  ...over,
});

const PAT = "tsr_pat_abcdefghijklmnopqrstuvwxyz0123456789";

/** Signs access tokens the way Tessera does (EdDSA, typ at+jwt). */
function signer(alg: "EdDSA" | "ES256" = "EdDSA") {
  const pair =
    alg === "EdDSA" ? generateKeyPairSync("ed25519") : generateKeyPairSync("ec", { namedCurve: "P-256" });
  const kid = `kid-${alg}`;
  const jwk = { ...pair.publicKey.export({ format: "jwk" }), kid, alg, use: "sig" };
  const token = (
    claims: Record<string, unknown>,
    header: Record<string, unknown> = {},
    key: KeyObject = pair.privateKey,
  ): string => {
    const h = Buffer.from(JSON.stringify({ alg, kid, typ: "at+jwt", ...header })).toString("base64url");
    const p = Buffer.from(JSON.stringify(claims)).toString("base64url");
    const input = Buffer.from(`${h}.${p}`);
    const sig =
      alg === "EdDSA" ? sign(null, input, key) : sign("sha256", input, { key, dsaEncoding: "ieee-p1363" });
    return `${h}.${p}.${sig.toString("base64url")}`;
  };
  return { jwk, token, kid };
}

describe("the downstream auth core", () => {
  let auth: TesseraAuth | undefined;
  let last: { fake: Fake } | undefined;
  afterEach(() => auth?.close());

  function setup(
    extra: { jwks?: object[]; watch?: boolean; jwksDown?: { down: boolean }; verify?: JwtVerifyMode } = {},
  ) {
    const { fake, transport } = fakeTessera();
    const clock = { t: 1_800_000_000_000 };
    const fetches: string[] = [];
    auth = createTesseraAuth({
      server: "https://tessera.invalid",
      transport,
      now: () => clock.t,
      clockSkewSeconds: 1,
      watchBackoffMs: { min: 5, max: 20 },
      ...(extra.watch === false ? { watch: false } : {}),
      ...(extra.verify ? { jwt: { verify: extra.verify } } : {}),
      fetchJson: async (url) => {
        fetches.push(url);
        if (extra.jwksDown?.down) throw new Error("connect ECONNREFUSED");
        if (url.endsWith("oauth-authorization-server")) return { jwks_uri: "https://tessera.invalid/jwks" };
        return { keys: extra.jwks ?? [] };
      },
    });
    last = { fake };
    return { fake, clock, fetches, auth };
  }

  async function refusal(p: Promise<unknown>): Promise<TesseraAuthError> {
    const err = await p.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(TesseraAuthError);
    return err as TesseraAuthError;
  }

  /** Bring the stream up (its first message: a heartbeat with a cursor). */
  async function up(fake: Fake, a: TesseraAuth, heartbeatSeconds = 10) {
    await expect.poll(() => fake.streams.length).toBeGreaterThan(0);
    fake.streams.at(-1)!.push({ cursor: "c1", heartbeatSeconds });
    expect(await a.ready(2000)).toBe(true);
  }

  it("verifies every call through Tessera while the stream is not connected, and caches nothing", async () => {
    const { fake, auth: a } = setup();
    fake.answers.set(PAT, valid());
    for (let i = 0; i < 3; i++) expect((await a.authenticate(`Bearer ${PAT}`)).id).toBe("user-1");
    expect(fake.verifyCalls).toBe(3);
    expect(a.stats().cacheSize).toBe(0);
  });

  it("serves a credential seen before from the cache while the stream is up, until an event names it", async () => {
    const { fake, auth: a } = setup();
    fake.answers.set(PAT, valid());
    await up(fake, a);
    await a.authenticate(`Bearer ${PAT}`);
    await a.authenticate(`Bearer ${PAT}`);
    expect(fake.verifyCalls).toBe(1);
    // Revoked on Tessera: the event drops the answer, the next call asks and is refused.
    fake.answers.set(PAT, { valid: false, code: VerificationCode.REVOKED });
    fake.streams[0]!.push({
      cursor: "c2",
      events: [{ kind: RevocationKind.CREDENTIAL, id: "cred-1", tenantId: "tenant-1" } as never],
    });
    await expect.poll(() => a.stats().cacheSize).toBe(0);
    expect((await refusal(a.authenticate(`Bearer ${PAT}`))).reason).toBe("TOKEN_REVOKED");
  });

  it.each([
    [RevocationKind.SUBJECT, "user-1"],
    [RevocationKind.TENANT, "tenant-1"],
  ])("drops the answers of a subject or tenant named by an event (%s)", async (kind, id) => {
    const { fake, auth: a } = setup();
    fake.answers.set(PAT, valid());
    fake.answers.set(
      "tsr_key_other",
      valid({ principalId: "user-2", tenantId: "tenant-2", credentialId: "c9" }),
    );
    await up(fake, a);
    await a.authenticate(`Bearer ${PAT}`);
    await a.authenticate("Bearer tsr_key_other");
    expect(a.stats().cacheSize).toBe(2);
    fake.streams[0]!.push({ cursor: "c2", events: [{ kind, id, tenantId: "tenant-1" } as never] });
    await expect.poll(() => a.stats().cacheSize).toBe(1);
    await a.authenticate("Bearer tsr_key_other");
    expect(fake.verifyCalls).toBe(2);
  });

  it("empties and bypasses the cache when the stream falls silent past twice its heartbeat, and on reset", async () => {
    const { fake, clock, auth: a } = setup();
    fake.answers.set(PAT, valid());
    await up(fake, a, 1);
    await a.authenticate(`Bearer ${PAT}`);
    expect(a.stats().cacheSize).toBe(1);
    clock.t += 2001;
    expect(a.watching()).toBe(false);
    expect(a.stats().cacheSize).toBe(0);
    await a.authenticate(`Bearer ${PAT}`);
    await a.authenticate(`Bearer ${PAT}`);
    expect(fake.verifyCalls).toBe(3);
    // It reconnects from its cursor; a reset empties whatever was cached since.
    await expect.poll(() => fake.streams.length).toBe(2);
    expect(fake.cursors[1]).toBe("c1");
    fake.streams[1]!.push({ cursor: "c5", heartbeatSeconds: 1 });
    expect(await a.ready(2000)).toBe(true);
    await a.authenticate(`Bearer ${PAT}`);
    expect(a.stats().cacheSize).toBe(1);
    fake.streams[1]!.push({ cursor: "c9", reset: true });
    await expect.poll(() => a.stats().watch?.resets).toBe(1);
    expect(a.stats().cacheSize).toBe(0);
  });

  it("does not store an answer when an event arrived while Tessera was answering", async () => {
    const { fake, auth: a } = setup();
    await up(fake, a);
    fake.answers.set(PAT, valid());
    let release: () => void = () => {};
    fake.hold = new Promise<void>((r) => {
      release = r;
    });
    const pending = a.authenticate(`Bearer ${PAT}`);
    await expect.poll(() => fake.verifyCalls).toBe(1);
    fake.streams[0]!.push({
      cursor: "c2",
      events: [{ kind: RevocationKind.SUBJECT, id: "someone-else", tenantId: "t" } as never],
    });
    await expect.poll(() => a.stats().watch?.events).toBe(1);
    fake.hold = undefined;
    release();
    expect((await pending).id).toBe("user-1");
    expect(a.stats().cacheSize).toBe(0);
    // Asked again with no event in between, the answer is kept.
    await a.authenticate(`Bearer ${PAT}`);
    expect(a.stats().cacheSize).toBe(1);
    expect(fake.verifyCalls).toBe(2);
  });

  it("does not join a call asked before an event: its answer is neither admitted nor cached after the event", async () => {
    const { fake, auth: a } = setup();
    await up(fake, a);
    fake.answers.set(PAT, valid());
    let release: () => void = () => {};
    fake.hold = new Promise<void>((r) => {
      release = r;
    });
    // Tessera answers VALID; the answer is on its way when the credential is revoked.
    const before = a.authenticate(`Bearer ${PAT}`);
    await expect.poll(() => fake.verifyCalls).toBe(1);
    fake.answers.set(PAT, { valid: false, code: VerificationCode.REVOKED });
    fake.streams[0]!.push({
      cursor: "c2",
      events: [{ kind: RevocationKind.CREDENTIAL, id: "cred-1", tenantId: "tenant-1" } as never],
    });
    await expect.poll(() => a.stats().watch?.events).toBe(1);
    // A call after the event is Tessera's to answer afresh, not the answer asked before it.
    const after = a.authenticate(`Bearer ${PAT}`);
    fake.hold = undefined;
    release();
    expect((await before).id).toBe("user-1");
    expect((await refusal(after)).reason).toBe("TOKEN_REVOKED");
    expect(a.stats().cacheSize).toBe(0);
    expect((await refusal(a.authenticate(`Bearer ${PAT}`))).reason).toBe("TOKEN_REVOKED");
    expect(fake.verifyCalls).toBe(3);
  });

  it("does not cache an answer asked before the stream first came up: revocations before it are never sent", async () => {
    const { fake, auth: a } = setup();
    fake.answers.set(PAT, valid());
    let release: () => void = () => {};
    fake.hold = new Promise<void>((r) => {
      release = r;
    });
    // Asked while the stream is not up yet; the credential is revoked before it comes up,
    // so the stream (starting from now) never names it.
    const before = a.authenticate(`Bearer ${PAT}`);
    await expect.poll(() => fake.verifyCalls).toBe(1);
    fake.answers.set(PAT, { valid: false, code: VerificationCode.REVOKED });
    await up(fake, a);
    const after = a.authenticate(`Bearer ${PAT}`);
    fake.hold = undefined;
    release();
    expect((await before).id).toBe("user-1");
    expect((await refusal(after)).reason).toBe("TOKEN_REVOKED");
    expect(a.stats().cacheSize).toBe(0);
    expect((await refusal(a.authenticate(`Bearer ${PAT}`))).reason).toBe("TOKEN_REVOKED");
  });

  it("answers UNAVAILABLE with Retry-After when Tessera cannot verify, cache or not", async () => {
    const { fake, auth: a } = setup();
    fake.down = true;
    const err = await refusal(a.authenticate(`Bearer ${PAT}`));
    expect(err.reason).toBe("UNAVAILABLE");
    expect(err.status).toBe(503);
    expect(err.headers()["retry-after"]).toBe("1");
  });

  it("maps each refusal code of VerifyCredential to Tessera's reason", async () => {
    const { fake, auth: a } = setup();
    const cases: [VerificationCode, string][] = [
      [VerificationCode.NOT_FOUND, "CREDENTIALS_INVALID"],
      [VerificationCode.EXPIRED, "TOKEN_EXPIRED"],
      [VerificationCode.REVOKED, "TOKEN_REVOKED"],
      [VerificationCode.DISABLED, "PRINCIPAL_DISABLED"],
      [VerificationCode.TENANT_DISABLED, "PRINCIPAL_DISABLED"],
      [VerificationCode.MALFORMED, "TOKEN_INVALID"],
      [VerificationCode.RATE_LIMITED, "RATE_LIMITED"],
    ];
    for (const [code, reason] of cases) {
      fake.answers.set(PAT, { valid: false, code, retryAfterSeconds: 7 });
      const err = await refusal(a.authenticate(`Bearer ${PAT}`));
      expect(err.reason, VerificationCode[code]).toBe(reason);
    }
    expect((await refusal(a.authenticate(undefined))).reason).toBe("AUTH_REQUIRED");
    expect((await refusal(a.authenticate("Token abc"))).reason).toBe("AUTH_HEADER_MALFORMED");
    expect((await refusal(a.authenticate("Bearer a b"))).reason).toBe("AUTH_HEADER_MALFORMED");
  });

  it("refuses a credential bound to a client certificate on a call without that certificate", async () => {
    const { fake, auth: a } = setup({ watch: false });
    fake.answers.set(PAT, valid({ certificateThumbprint: "thumb-1" }));
    expect((await refusal(a.authenticate(`Bearer ${PAT}`))).reason).toBe("TOKEN_NOT_BOUND");
    expect((await refusal(a.authenticate(`Bearer ${PAT}`, "thumb-2"))).reason).toBe("TOKEN_NOT_BOUND");
    expect((await a.authenticate(`Bearer ${PAT}`, "thumb-1")).id).toBe("user-1");
  });

  it("authorizes by scopes with wildcards, and by principal kind", () => {
    const { auth: a } = setup({ watch: false });
    const principal = {
      id: "u",
      kind: "user" as const,
      tenantId: "t",
      scopes: ["workflows:*"],
      credentialKind: "pat",
      credentialId: "c",
      applicationIds: [],
    };
    a.authorize(principal, { scopes: ["workflows:run"] });
    expect(() =>
      a.authorize({ ...principal, scopes: ["workflows:read"] }, { scopes: ["workflows:run"] }),
    ).toThrow(expect.objectContaining({ reason: "ACCESS_DENIED" }));
    expect(() => a.authorize(principal, { principals: [2] })).toThrow(
      expect.objectContaining({ reason: "PRINCIPAL_NOT_ALLOWED" }),
    );
  });

  describe("access tokens", () => {
    const claimsAt = (t: number, over: Record<string, unknown> = {}) => ({
      iss: "tessera",
      aud: "tessera",
      sub: "user-1",
      tid: "tenant-1",
      scope: "workflows:read workflows:run",
      pk: "user",
      sid: "session-1",
      jti: "jti-1",
      iat: Math.floor(t / 1000),
      nbf: Math.floor(t / 1000),
      exp: Math.floor(t / 1000) + 900,
      ...over,
    });

    /**
     * One credential of tenant-1 verified by Tessera: the core then knows its stream carries
     * tenant-1's revocations (the same wall as VerifyCredential's), and admits tenant-1's
     * access tokens offline. One call to Tessera.
     */
    async function learnWall(fake: Fake, a: TesseraAuth) {
      fake.answers.set(PAT, valid());
      await a.authenticate(`Bearer ${PAT}`);
      expect(fake.verifyCalls).toBe(1);
    }

    it("verifies a token offline once the stream is up, with no call to Tessera", async () => {
      const s = signer();
      const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
      await up(fake, a);
      await learnWall(fake, a);
      clock.t += 2000; // issued after the stream's coverage began (skew 1 s)
      const p = await a.authenticate(`Bearer ${s.token(claimsAt(clock.t))}`);
      expect(p).toMatchObject({ id: "user-1", kind: "user", tenantId: "tenant-1", sessionId: "session-1" });
      expect(p.scopes).toEqual(["workflows:read", "workflows:run"]);
      expect(fake.verifyCalls).toBe(1);
      expect(a.stats().offlineJwts).toBe(1);
    });

    it("asks Tessera about a token of a tenant none of its answers named, whose revocations its stream may not carry", async () => {
      const s = signer();
      const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
      await up(fake, a);
      await learnWall(fake, a);
      clock.t += 2000;
      const other = s.token(claimsAt(clock.t, { tid: "tenant-2", sub: "user-9" }));
      // Behind this service's wall: Tessera answers it as unknown.
      fake.answers.set(other, { valid: false, code: VerificationCode.NOT_FOUND });
      expect((await refusal(a.authenticate(`Bearer ${other}`))).reason).toBe("CREDENTIALS_INVALID");
      expect(fake.verifyCalls).toBe(2);
      expect(a.stats().offlineJwts).toBe(0);
    });

    it("asks Tessera about a token while the stream is down, and about one issued before it connected", async () => {
      const s = signer("ES256");
      const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
      const early = s.token(claimsAt(clock.t));
      fake.answers.set(early, valid({ credentialKind: "jwt", credentialId: "jti-1" }));
      await a.authenticate(`Bearer ${early}`);
      expect(fake.verifyCalls).toBe(1);
      await up(fake, a);
      await a.authenticate(`Bearer ${early}`); // issued before coverage: asked, then cached
      await a.authenticate(`Bearer ${early}`);
      expect(fake.verifyCalls).toBe(2);
      // The session ends: the cached answer goes with it.
      fake.answers.set(early, { valid: false, code: VerificationCode.REVOKED });
      fake.streams[0]!.push({
        cursor: "c2",
        events: [
          {
            kind: RevocationKind.SESSION,
            id: "session-1",
            tenantId: "tenant-1",
            occurredAt: timestampFromMs(clock.t),
          } as never,
        ],
      });
      await expect.poll(() => a.stats().cacheSize).toBe(0);
      expect((await refusal(a.authenticate(`Bearer ${early}`))).reason).toBe("TOKEN_REVOKED");
    });

    it("refuses offline a token issued before its session ended, and asks Tessera about one whose subject changed", async () => {
      const s = signer();
      const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
      await up(fake, a);
      await learnWall(fake, a);
      clock.t += 2000;
      const token = s.token(claimsAt(clock.t));
      const other = s.token(claimsAt(clock.t, { sub: "user-2", sid: "session-2", jti: "jti-9" }));
      await a.authenticate(`Bearer ${token}`);
      await a.authenticate(`Bearer ${other}`);
      clock.t += 5000;
      const event = (kind: RevocationKind, id: string) =>
        ({ kind, id, tenantId: "tenant-1", occurredAt: timestampFromMs(clock.t) }) as never;
      fake.streams[0]!.push({
        cursor: "c2",
        events: [event(RevocationKind.SESSION, "session-1"), event(RevocationKind.SUBJECT, "user-2")],
      });
      await expect.poll(() => a.stats().watch?.events).toBe(2);
      expect((await refusal(a.authenticate(`Bearer ${token}`))).reason).toBe("TOKEN_REVOKED");
      expect(fake.verifyCalls).toBe(1);
      // The subject changed (its scopes, say): Tessera's answer stands, and is cached.
      fake.answers.set(
        other,
        valid({ principalId: "user-2", credentialKind: "jwt", scopes: ["workflows:read"] }),
      );
      expect((await a.authenticate(`Bearer ${other}`)).scopes).toEqual(["workflows:read"]);
      await a.authenticate(`Bearer ${other}`);
      expect(fake.verifyCalls).toBe(2);
      // A token issued well after the events verifies offline again.
      clock.t += 5000;
      await a.authenticate(`Bearer ${s.token(claimsAt(clock.t, { jti: "jti-2" }))}`);
      expect(fake.verifyCalls).toBe(2);
    });

    it('refuses alg none, HMAC (jwt.verify "offline"), a key of another type, a tampered signature, wrong iss/aud/typ and expired tokens', async () => {
      const ed = signer();
      const ec = signer("ES256");
      const { clock, auth: a } = setup({ jwks: [ed.jwk, ec.jwk], verify: "offline" });
      const good = claimsAt(clock.t);
      const unsigned = `${Buffer.from(JSON.stringify({ alg: "none", typ: "at+jwt", kid: ed.kid })).toString("base64url")}.${Buffer.from(JSON.stringify(good)).toString("base64url")}.AAAA`;
      const hs = ed.token(good, { alg: "HS256" });
      // The EdDSA key named by an ES256 header (and the reverse): refused whatever the signature.
      const confused = ec.token(good, { kid: ed.kid });
      const t = ed.token(good);
      const [h, p, sig] = t.split(".") as [string, string, string];
      const mid = Math.floor(sig.length / 2);
      const tampered = `${h}.${p}.${sig.slice(0, mid)}${sig[mid] === "A" ? "B" : "A"}${sig.slice(mid + 1)}`;
      const cases: [string, string][] = [
        [unsigned, "TOKEN_INVALID"],
        [hs, "TOKEN_INVALID"],
        [confused, "TOKEN_INVALID"],
        [tampered, "TOKEN_INVALID"],
        [ed.token({ ...good, iss: "someone-else" }), "TOKEN_INVALID"],
        [ed.token({ ...good, aud: "other" }), "TOKEN_INVALID"],
        [ed.token(good, { typ: "JWT" }), "TOKEN_INVALID"],
        [ed.token({ ...good, exp: Math.floor(clock.t / 1000) }), "TOKEN_EXPIRED"],
        [ed.token({ ...good, nbf: Math.floor(clock.t / 1000) + 60 }), "TOKEN_INVALID"],
      ];
      for (const [token, reason] of cases) {
        expect((await refusal(a.authenticate(`Bearer ${token}`))).reason, token.slice(0, 40)).toBe(reason);
      }
      // The genuine token passes the offline checks (and, the stream down, Tessera's).
      const { fake } = last!;
      fake.answers.set(t, valid({ credentialKind: "jwt" }));
      expect((await a.authenticate(`Bearer ${t}`)).id).toBe("user-1");
      expect(fake.verifyCalls).toBe(1);
    });

    it("asks Tessera about an HS256 token by default on a deployment publishing no key, cached and dropped by its session's event, but never about an algorithm Tessera does not sign", async () => {
      const ed = signer();
      // An HS256 Tessera: its JWKS is empty.
      const { fake, clock, fetches, auth: a } = setup({ jwks: [] });
      await up(fake, a);
      const good = claimsAt(clock.t);
      const hs = ed.token(good, { alg: "HS256", kid: "hs256" });
      fake.answers.set(hs, valid({ credentialKind: "jwt", credentialId: "jti-1" }));
      // The session comes from the payload Tessera vouched for, keying its revocations.
      expect(await a.authenticate(`Bearer ${hs}`)).toMatchObject({ id: "user-1", sessionId: "session-1" });
      await a.authenticate(`Bearer ${hs}`);
      expect(fake.verifyCalls).toBe(1);
      // The key set fetched once (discovery, then the JWKS) to learn there is none.
      expect(fetches).toEqual([
        "https://tessera.invalid/.well-known/oauth-authorization-server",
        "https://tessera.invalid/jwks",
      ]);
      fake.streams[0]!.push({
        cursor: "c2",
        events: [{ kind: RevocationKind.SESSION, id: "session-1", tenantId: "tenant-1" } as never],
      });
      await expect.poll(() => a.stats().watch?.events).toBe(1);
      fake.answers.set(hs, { valid: false, code: VerificationCode.REVOKED });
      expect((await refusal(a.authenticate(`Bearer ${hs}`))).reason).toBe("TOKEN_REVOKED");
      expect(fake.verifyCalls).toBe(2);
      // No Tessera token is signed so: refused offline, no VerifyCredential spent on it.
      for (const alg of ["none", "RS256", "HS512"])
        expect((await refusal(a.authenticate(`Bearer ${ed.token(good, { alg })}`))).reason, alg).toBe(
          "TOKEN_INVALID",
        );
      expect(fake.verifyCalls).toBe(2);
    });

    it("refuses an HS256 token by default without asking Tessera when the JWKS holds a key, whatever its kid", async () => {
      const ed = signer();
      const { fake, clock, auth: a } = setup({ jwks: [ed.jwk] });
      await up(fake, a);
      const good = claimsAt(clock.t);
      for (const kid of ["hs256", ed.kid, "made-up"]) {
        const hs = ed.token(good, { alg: "HS256", kid });
        fake.answers.set(hs, valid({ credentialKind: "jwt" }));
        expect((await refusal(a.authenticate(`Bearer ${hs}`))).reason, kid).toBe("TOKEN_INVALID");
      }
      expect(fake.verifyCalls).toBe(0);
      expect(a.stats().jwksFetches).toBe(1);
    });

    it("answers UNAVAILABLE for an HS256 token while the key set was never fetched, retrying the fetch at most once a second", async () => {
      const ed = signer();
      const jwksDown = { down: true };
      const { fake, clock, auth: a } = setup({ jwks: [], jwksDown });
      const hs = ed.token(claimsAt(clock.t), { alg: "HS256", kid: "hs256" });
      fake.answers.set(hs, valid({ credentialKind: "jwt" }));
      for (let i = 0; i < 5; i++) {
        const err = await refusal(a.authenticate(`Bearer ${hs}`));
        expect(err.reason).toBe("UNAVAILABLE");
        expect(err.retryAfterSeconds).toBe(1);
      }
      expect(a.stats().jwksFetches).toBe(1);
      clock.t += 999;
      expect((await refusal(a.authenticate(`Bearer ${hs}`))).reason).toBe("UNAVAILABLE");
      expect(a.stats().jwksFetches).toBe(1);
      clock.t += 1;
      jwksDown.down = false;
      expect((await a.authenticate(`Bearer ${hs}`)).id).toBe("user-1");
      expect(a.stats().jwksFetches).toBe(2);
      expect(fake.verifyCalls).toBe(1);
    });

    it("follows a deployment switching algorithm: its keys learnt from a token's unknown kid, or once the key set ages", async () => {
      const ed = signer();
      const jwks: object[] = [];
      const { fake, clock, auth: a } = setup({ jwks });
      const hs = ed.token(claimsAt(clock.t), { alg: "HS256", kid: "hs256" });
      fake.answers.set(hs, valid({ credentialKind: "jwt" }));
      expect((await a.authenticate(`Bearer ${hs}`)).id).toBe("user-1");
      expect(fake.verifyCalls).toBe(1);
      // HS256 to EdDSA: the first EdDSA token names a kid the empty set lacks, fetched again.
      jwks.push(ed.jwk);
      clock.t += 30_000;
      const t = ed.token(claimsAt(clock.t));
      fake.answers.set(t, valid({ credentialKind: "jwt" }));
      expect((await a.authenticate(`Bearer ${t}`)).id).toBe("user-1");
      expect(a.stats().jwksFetches).toBe(2);
      // Keys published: an HS256 token is refused offline from now on.
      const calls = fake.verifyCalls;
      const hs2 = ed.token(claimsAt(clock.t, { jti: "jti-2" }), { alg: "HS256", kid: "hs256" });
      fake.answers.set(hs2, valid({ credentialKind: "jwt" }));
      expect((await refusal(a.authenticate(`Bearer ${hs2}`))).reason).toBe("TOKEN_INVALID");
      expect(fake.verifyCalls).toBe(calls);
      // Back to HS256: refused until the key set ages (jwksMaxAgeMs) and is found empty.
      jwks.splice(0);
      clock.t += 300_001;
      const hs3 = ed.token(claimsAt(clock.t, { jti: "jti-3" }), { alg: "HS256", kid: "hs256" });
      fake.answers.set(hs3, valid({ credentialKind: "jwt" }));
      expect((await a.authenticate(`Bearer ${hs3}`)).id).toBe("user-1");
      expect(fake.verifyCalls).toBe(calls + 1);
    });

    it('asks Tessera about every JWT with jwt.verify "online", and never fetches the key set', async () => {
      const ed = signer();
      const { fake, clock, fetches, auth: a } = setup({ jwks: [ed.jwk], verify: "online" });
      await up(fake, a);
      const t = ed.token(claimsAt(clock.t));
      fake.answers.set(t, valid({ credentialKind: "jwt" }));
      await a.authenticate(`Bearer ${t}`);
      await a.authenticate(`Bearer ${t}`);
      expect(a.stats()).toMatchObject({ verifyCalls: 1, cacheHits: 1, offlineJwts: 0, jwksFetches: 0 });
      // Its claims are not read before Tessera answers: another tenant's, or forged, is its call.
      const forged = ed.token(
        claimsAt(clock.t, { jti: "jti-2" }),
        {},
        generateKeyPairSync("ed25519").privateKey,
      );
      expect((await refusal(a.authenticate(`Bearer ${forged}`))).reason).toBe("CREDENTIALS_INVALID");
      expect(fake.verifyCalls).toBe(2);
      expect(fetches).toEqual([]);
    });

    it("admits a header seen before from memory only until its token expires or its key leaves the key set", async () => {
      const s = signer();
      const t = signer("ES256");
      const jwks: object[] = [s.jwk];
      const { fake, clock, auth: a } = setup({ jwks });
      await up(fake, a, 3600);
      await learnWall(fake, a);
      clock.t += 2000;
      const token = s.token(claimsAt(clock.t, { exp: Math.floor(clock.t / 1000) + 60 }));
      for (let i = 0; i < 3; i++) expect((await a.authenticate(`Bearer ${token}`)).id).toBe("user-1");
      expect(a.stats().offlineJwts).toBe(3);
      clock.t += 60_000;
      expect((await refusal(a.authenticate(`Bearer ${token}`))).reason).toBe("TOKEN_EXPIRED");
      // Admitted twice, then its key is replaced (fetched again for a token of the new kid).
      const fresh = s.token(claimsAt(clock.t));
      await a.authenticate(`Bearer ${fresh}`);
      await a.authenticate(`Bearer ${fresh}`);
      jwks.splice(0, 1, t.jwk);
      clock.t += 30_001;
      await a.authenticate(`Bearer ${t.token(claimsAt(clock.t))}`);
      expect((await refusal(a.authenticate(`Bearer ${fresh}`))).reason).toBe("TOKEN_INVALID");
      expect(fake.verifyCalls).toBe(1);
    });

    it.each([
      [RevocationKind.SESSION, "session-1", "offline"],
      [RevocationKind.CREDENTIAL, "jti-1", "offline"],
      [RevocationKind.SUBJECT, "user-1", "asked"],
      [RevocationKind.TENANT, "tenant-1", "asked"],
    ] as const)(
      "refuses the next call of a token admitted from memory once an event names its %s",
      async (kind, id, how) => {
        const s = signer();
        const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
        await up(fake, a, 3600);
        await learnWall(fake, a);
        clock.t += 2000;
        const token = s.token(claimsAt(clock.t));
        // Remembered (the first call fetched the key set, so from the second): the later calls
        // are answered synchronously, without the verifier.
        await a.authenticate(`Bearer ${token}`);
        await a.authenticate(`Bearer ${token}`);
        expect(a.admitted(`Bearer ${token}`)?.id).toBe("user-1");
        expect(a.admitted(`Bearer ${token} `)).toBeUndefined();
        expect(a.stats().offlineJwts).toBe(3);
        clock.t += 5000;
        // Revoked (or disabled) on Tessera after the token was issued.
        fake.answers.set(token, { valid: false, code: VerificationCode.DISABLED });
        fake.streams[0]!.push({
          cursor: "c2",
          events: [{ kind, id, tenantId: "tenant-1", occurredAt: timestampFromMs(clock.t) } as never],
        });
        await expect.poll(() => a.stats().watch?.events).toBe(1);
        expect(a.admitted(`Bearer ${token}`)).toBeUndefined();
        const err = await refusal(a.authenticate(`Bearer ${token}`));
        // A session or the token itself ended: final, refused offline; a subject or tenant
        // changed: Tessera decides, and refuses.
        expect(err.reason).toBe(how === "offline" ? "TOKEN_REVOKED" : "PRINCIPAL_DISABLED");
        expect(fake.verifyCalls).toBe(how === "offline" ? 1 : 2);
        expect(a.admitted(`Bearer ${token}`)).toBeUndefined();
      },
    );

    it("does not answer from memory a bound token on a call without its certificate", async () => {
      const s = signer();
      const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
      await up(fake, a, 3600);
      await learnWall(fake, a);
      clock.t += 2000;
      const token = s.token(claimsAt(clock.t, { cnf: { "x5t#S256": "thumb-1" } }));
      expect((await a.authenticate(`Bearer ${token}`, "thumb-1")).certificateThumbprint).toBe("thumb-1");
      await a.authenticate(`Bearer ${token}`, "thumb-1");
      expect(a.admitted(`Bearer ${token}`, "thumb-1")?.id).toBe("user-1");
      expect(a.admitted(`Bearer ${token}`, "thumb-2")).toBeUndefined();
      expect((await refusal(a.authenticate(`Bearer ${token}`))).reason).toBe("TOKEN_NOT_BOUND");
    });

    it("while the key set cannot be fetched, tries again at most once a second, not on every call", async () => {
      const s = signer();
      const jwksDown = { down: false };
      const { clock, fetches, auth: a } = setup({ jwks: [s.jwk], jwksDown });
      const jwksFetches = () => fetches.filter((u) => u.endsWith("/jwks")).length;
      await a.authenticate(`Bearer ${s.token(claimsAt(clock.t))}`).catch(() => undefined);
      expect(jwksFetches()).toBe(1);
      // The key set is stale and Tessera is down: its last keys still verify, and one
      // attempt is made, not one per call.
      clock.t += 300_001;
      jwksDown.down = true;
      for (let i = 0; i < 20; i++)
        await a
          .authenticate(`Bearer ${s.token(claimsAt(clock.t, { jti: `jti-${i}` }))}`)
          .catch((e: unknown) => {
            expect((e as TesseraAuthError).reason).not.toBe("TOKEN_INVALID");
          });
      expect(jwksFetches()).toBe(2);
      clock.t += 1000;
      await a.authenticate(`Bearer ${s.token(claimsAt(clock.t, { jti: "jti-a" }))}`).catch(() => undefined);
      expect(jwksFetches()).toBe(3);
      // Back: fetched, and fresh again.
      jwksDown.down = false;
      clock.t += 1000;
      await a.authenticate(`Bearer ${s.token(claimsAt(clock.t, { jti: "jti-b" }))}`).catch(() => undefined);
      await a.authenticate(`Bearer ${s.token(claimsAt(clock.t, { jti: "jti-c" }))}`).catch(() => undefined);
      expect(jwksFetches()).toBe(4);
    });

    it("answers UNAVAILABLE, not TOKEN_INVALID, between attempts while no key set was ever fetched", async () => {
      const s = signer();
      const { clock, fetches, auth: a } = setup({ jwks: [s.jwk], jwksDown: { down: true } });
      for (let i = 0; i < 5; i++)
        expect(
          (await refusal(a.authenticate(`Bearer ${s.token(claimsAt(clock.t, { jti: `jti-${i}` }))}`))).reason,
        ).toBe("UNAVAILABLE");
      // The discovery document, then the default key set's address: one attempt.
      expect(fetches.length).toBe(2);
    });

    describe("a machine token whose authority came from a client certificate (amr mtls)", () => {
      /**
       * What Tessera issues a machine user that authenticated by its certificate: Tessera
       * refuses it once the certificate resolves to another machine user, with no event
       * naming this one, so the SDK asks Tessera on every call rather than trust the JWKS,
       * its cache or a verification asked before the call began.
       */
      const machineAt = (t: number, over: Record<string, unknown> = {}) =>
        claimsAt(t, {
          sub: "mu-1",
          pk: "machine",
          sid: undefined,
          jti: "jti-mu",
          cnf: { "x5t#S256": "thumb-1" },
          amr: ["mtls"],
          cert_san_uris: ["spiffe://example.test/worker"],
          ...over,
        });
      const machineValid = valid({
        principalId: "mu-1",
        principalKind: VerifiedPrincipalKind.MACHINE_USER,
        credentialKind: "jwt",
        credentialId: "jti-mu",
        certificateThumbprint: "thumb-1",
      });
      const revoked: Answer = { valid: false, code: VerificationCode.REVOKED };

      it("is asked of Tessera on every call while the stream vouches for offline tokens, never cached, and refused once Tessera refuses it", async () => {
        const s = signer();
        const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
        await up(fake, a, 3600);
        await learnWall(fake, a);
        clock.t += 2000;
        const marked = s.token(machineAt(clock.t));
        fake.answers.set(marked, machineValid);
        for (let i = 0; i < 3; i++) {
          const p = await a.authenticate(`Bearer ${marked}`, "thumb-1");
          expect(p).toMatchObject({ id: "mu-1", kind: "machine_user", certificateThumbprint: "thumb-1" });
          expect(a.admitted(`Bearer ${marked}`, "thumb-1")).toBeUndefined();
        }
        expect(fake.verifyCalls).toBe(4);
        // Another binding took the certificate: no event, Tessera refuses the token.
        fake.answers.set(marked, revoked);
        expect((await refusal(a.authenticate(`Bearer ${marked}`, "thumb-1"))).reason).toBe("TOKEN_REVOKED");
        expect(fake.verifyCalls).toBe(5);
        expect(a.stats()).toMatchObject({ offlineJwts: 0, cacheHits: 0, cacheSize: 1 });

        // The same machine user's token without the marker (a secret's, or an older Tessera's),
        // bound or not, and a user's token: offline, and from memory, as before.
        const before = a.stats().offlineJwts;
        const unmarked = s.token(machineAt(clock.t, { amr: undefined, cert_san_uris: undefined }));
        const secret = s.token(
          machineAt(clock.t, { amr: ["pwd"], cnf: undefined, cert_san_uris: undefined }),
        );
        const user = s.token(claimsAt(clock.t));
        for (let i = 0; i < 2; i++) {
          expect((await a.authenticate(`Bearer ${unmarked}`, "thumb-1")).id).toBe("mu-1");
          expect((await a.authenticate(`Bearer ${secret}`)).id).toBe("mu-1");
          expect((await a.authenticate(`Bearer ${user}`)).id).toBe("user-1");
        }
        expect(a.admitted(`Bearer ${unmarked}`, "thumb-1")?.id).toBe("mu-1");
        expect(a.admitted(`Bearer ${user}`)?.id).toBe("user-1");
        expect(a.stats().offlineJwts).toBe(before + 8);
        expect(fake.verifyCalls).toBe(5);
      });

      it('is asked of Tessera on every call with jwt.verify "online", never cached, while an unmarked token is', async () => {
        const s = signer();
        const { fake, clock, auth: a } = setup({ jwks: [s.jwk], verify: "online" });
        await up(fake, a, 3600);
        const marked = s.token(machineAt(clock.t));
        const unmarked = s.token(machineAt(clock.t, { amr: undefined, jti: "jti-2" }));
        fake.answers.set(marked, machineValid);
        fake.answers.set(unmarked, machineValid);
        await a.authenticate(`Bearer ${marked}`, "thumb-1");
        await a.authenticate(`Bearer ${marked}`, "thumb-1");
        expect(fake.verifyCalls).toBe(2);
        fake.answers.set(marked, revoked);
        expect((await refusal(a.authenticate(`Bearer ${marked}`, "thumb-1"))).reason).toBe("TOKEN_REVOKED");
        expect(fake.verifyCalls).toBe(3);
        await a.authenticate(`Bearer ${unmarked}`, "thumb-1");
        await a.authenticate(`Bearer ${unmarked}`, "thumb-1");
        expect(fake.verifyCalls).toBe(4);
        expect(a.stats()).toMatchObject({ cacheHits: 1, cacheSize: 1 });
      });

      /** Hold Tessera's answers until the returned function is called. */
      function holdAnswers(fake: Fake): () => void {
        let release: () => void = () => {};
        fake.hold = new Promise<void>((r) => {
          release = r;
        });
        return () => {
          fake.hold = undefined;
          release();
        };
      }

      it.each([
        ["down", false],
        ["up", true],
      ])(
        "is not answered by a verification of it asked before the call began (the stream %s): it waits for the next, asked once that one answers",
        async (_state, streamUp) => {
          const s = signer();
          const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
          if (streamUp) {
            // No event comes in the meantime: the epoch every other credential's calls share stays.
            await up(fake, a, 3600);
            await learnWall(fake, a);
            clock.t += 2000;
          }
          const before = fake.verifyCalls;
          const marked = s.token(machineAt(clock.t));
          fake.answers.set(marked, machineValid);
          const release = holdAnswers(fake);
          const first = a.authenticate(`Bearer ${marked}`, "thumb-1");
          await expect.poll(() => fake.verifyCalls).toBe(before + 1);
          // The certificate changes hands while that answer is on its way.
          fake.answers.set(marked, revoked);
          const later = a.authenticate(`Bearer ${marked}`, "thumb-1");
          await new Promise((r) => setTimeout(r, 20));
          expect(fake.verifyCalls).toBe(before + 1);
          release();
          expect((await first).id).toBe("mu-1");
          expect((await refusal(later)).reason).toBe("TOKEN_REVOKED");
          expect(fake.verifyCalls).toBe(before + 2);
          expect(fake.peakInFlight).toBe(1);
          if (streamUp) return;
          // An unmarked token's calls still share one verification.
          const unmarked = s.token(machineAt(clock.t, { amr: undefined, jti: "jti-2" }));
          fake.answers.set(unmarked, machineValid);
          const go = holdAnswers(fake);
          const shared = [1, 2, 3].map(() => a.authenticate(`Bearer ${unmarked}`, "thumb-1"));
          await expect.poll(() => fake.verifyCalls).toBe(3);
          go();
          for (const p of await Promise.all(shared)) expect(p.id).toBe("mu-1");
          expect(fake.verifyCalls).toBe(3);
        },
      );

      it("is asked of Tessera one verification at a time, however many calls of it come at once: those during one share the next", async () => {
        const s = signer();
        const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
        await up(fake, a, 3600);
        await learnWall(fake, a);
        clock.t += 2000;
        const marked = s.token(machineAt(clock.t));
        fake.answers.set(marked, machineValid);
        // The key set fetched: calls during its first fetch are refused 503 without waiting for it.
        await a.authenticate(`Bearer ${marked}`, "thumb-1");
        const release = holdAnswers(fake);
        const outcome = (p: Promise<TesseraPrincipal>) =>
          p.then(
            (principal) => principal.id,
            (e: unknown) => (e as TesseraAuthError).reason,
          );
        const before = fake.verifyCalls;
        const calls = Array.from({ length: 200 }, () =>
          outcome(a.authenticate(`Bearer ${marked}`, "thumb-1")),
        );
        await expect.poll(() => fake.verifyCalls).toBe(before + 1);
        await new Promise((r) => setTimeout(r, 50));
        expect(fake.verifyCalls).toBe(before + 1);
        // Another binding takes the certificate while the first is asked: each later call is refused.
        fake.answers.set(marked, revoked);
        const after = outcome(a.authenticate(`Bearer ${marked}`, "thumb-1"));
        release();
        const results = await Promise.all(calls);
        expect(results.filter((r) => r === "mu-1")).toHaveLength(1);
        expect(results.filter((r) => r === "TOKEN_REVOKED")).toHaveLength(199);
        expect(await after).toBe("TOKEN_REVOKED");
        expect(fake.verifyCalls).toBe(before + 2);
        expect(fake.peakInFlight).toBe(1);
        expect(a.stats().verifyRefused).toBe(0);
      });

      it('keeps a forged one (jwt.verify "online") to one verification at a time at Tessera, however many calls send it', async () => {
        const s = signer();
        const { fake, clock, auth: a } = setup({ verify: "online" });
        const [header, payload] = s.token(machineAt(clock.t)).split(".");
        const forged = `${header}.${payload}.${"A".repeat(86)}`;
        const release = holdAnswers(fake);
        const calls = Array.from({ length: 300 }, () => refusal(a.authenticate(`Bearer ${forged}`)));
        await expect.poll(() => fake.verifyCalls).toBe(1);
        await new Promise((r) => setTimeout(r, 50));
        expect(fake.verifyCalls).toBe(1);
        release();
        for (const err of await Promise.all(calls)) expect(err.reason).not.toBe("UNAVAILABLE");
        expect(fake.verifyCalls).toBe(2);
        expect(fake.peakInFlight).toBe(1);
      });

      it("ends a held stream once Tessera refuses its token, with no event and the watch up; an unmarked token's stream is not asked again", async () => {
        const s = signer();
        const { fake, clock, auth: a } = setup({ jwks: [s.jwk] });
        await up(fake, a, 3600);
        await learnWall(fake, a);
        clock.t += 2000;
        const marked = s.token(machineAt(clock.t));
        const unmarked = s.token(machineAt(clock.t, { amr: undefined, jti: "jti-2" }));
        fake.answers.set(marked, machineValid);
        const rule = { scopes: ["workflows:read"] };
        const held = await a.holdStream(`Bearer ${marked}`, "thumb-1", rule);
        const other = await a.holdStream(`Bearer ${unmarked}`, "thumb-1", rule);
        expect(fake.verifyCalls).toBe(2);
        // Another binding took the certificate: Tessera refuses the token, and sends no event.
        fake.answers.set(marked, revoked);
        await expect
          .poll(() => (held.signal.reason as TesseraAuthError | undefined)?.reason, { timeout: 15_000 })
          .toBe("TOKEN_REVOKED");
        expect(fake.verifyCalls).toBe(3);
        expect(a.watching()).toBe(true);
        expect(other.signal.aborted).toBe(false);
        other.release();
      }, 20_000);
    });

    it("refetches the key set once for an unknown kid, and not again for every made-up kid", async () => {
      const s = signer();
      const { clock, fetches, auth: a } = setup({ jwks: [s.jwk] });
      await a.authenticate(`Bearer ${s.token(claimsAt(clock.t))}`).catch(() => undefined);
      const after = fetches.filter((u) => u.endsWith("/jwks")).length;
      expect(after).toBe(1);
      for (let i = 0; i < 20; i++) {
        const err = await refusal(
          a.authenticate(`Bearer ${s.token(claimsAt(clock.t), { kid: `made-up-${i}` })}`),
        );
        expect(err.reason).toBe("TOKEN_INVALID");
      }
      expect(fetches.filter((u) => u.endsWith("/jwks")).length).toBe(after);
      clock.t += 30_001;
      await refusal(a.authenticate(`Bearer ${s.token(claimsAt(clock.t), { kid: "another" })}`));
      expect(fetches.filter((u) => u.endsWith("/jwks")).length).toBe(after + 1);
    });
  });
});
