import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { createRouterTransport } from "@connectrpc/connect";
import { afterEach, describe, expect, it } from "vitest";
import {
  VerificationCode,
  VerificationService,
  VerifiedPrincipalKind,
  type VerifyCredentialResponseSchema,
  type WatchRevocationsResponse,
  WatchRevocationsResponseSchema,
} from "../gen/tessera/v1/verification_service_pb.js";
import { createTesseraAuth, type TesseraAuth, TesseraAuthError } from "../src/sdk/server/index.js";
import type { TesseraPrincipal } from "../src/sdk/server/principal.js";
import { VerifiedCache } from "../src/sdk/server/verified-cache.js";

/**
 * The bounds of the downstream positive cache (issue 22 item 5), on a manual clock: at most
 * `cache.max` answers (least recently used out first), none older than `ttlSeconds`, none
 * past its credential's own `expiresAt`, and none at all with `cache: false`. First on the
 * cache itself, then through the core against an in-memory Tessera whose VerifyCredential
 * calls are counted (test/sdk-server-cache-e2e.test.ts does the same against a real one).
 */

const T0 = 1_800_000_000_000;

const principal = (id: string, expiresAt?: number): TesseraPrincipal => ({
  id: `user-${id}`,
  kind: "user",
  tenantId: "tenant-1",
  scopes: ["workflows:read"],
  credentialKind: "pat",
  credentialId: `cred-${id}`,
  applicationIds: [],
  expiresAt: expiresAt === undefined ? undefined : new Date(expiresAt),
});

describe("VerifiedCache", () => {
  function cache(max: number, ttlMs = 300_000) {
    const clock = { t: T0 };
    return { clock, c: new VerifiedCache({ max, ttlMs, now: () => clock.t }) };
  }

  it("holds at most max answers, the least recently used out first", () => {
    const { c } = cache(3);
    for (const id of ["a", "b", "c"]) c.set(id, principal(id));
    expect(c.get("a")?.id).toBe("user-a"); // a is now the most recently used: b goes first
    c.set("d", principal("d"));
    expect(c.size).toBe(3);
    expect(c.get("b")).toBeUndefined();
    expect(c.get("a")?.id).toBe("user-a");
    for (let i = 0; i < 100; i++) c.set(`x${i}`, principal(`x${i}`));
    expect(c.size).toBe(3);
    expect(["x97", "x98", "x99"].map((k) => c.get(k)?.id)).toEqual(["user-x97", "user-x98", "user-x99"]);
    expect(c.get("a")).toBeUndefined();
    // Storing a credential again replaces its answer, it does not take a second place.
    c.set("x99", principal("y"));
    expect(c.size).toBe(3);
    expect(c.get("x99")?.id).toBe("user-y");
  });

  it("serves an answer for ttl at most", () => {
    const { c, clock } = cache(10, 5000);
    c.set("a", principal("a"));
    clock.t += 4999;
    expect(c.get("a")?.id).toBe("user-a");
    // Being served does not extend its life.
    clock.t += 1;
    expect(c.get("a")).toBeUndefined();
    expect(c.size).toBe(0);
  });

  it("never serves an answer past its credential's own expiry, however long the ttl", () => {
    const { c, clock } = cache(10, 300_000);
    c.set("a", principal("a", T0 + 10_000));
    c.set("b", principal("b")); // no expiry: the ttl alone
    clock.t += 9_999;
    expect(c.get("a")?.id).toBe("user-a");
    clock.t += 1;
    expect(c.get("a")).toBeUndefined();
    expect(c.get("b")?.id).toBe("user-b");
    // An answer whose credential has already expired is not stored at all.
    c.set("c", principal("c", clock.t));
    c.set("d", principal("d", clock.t - 1));
    expect(c.get("c")).toBeUndefined();
    expect(c.get("d")).toBeUndefined();
    expect(c.size).toBe(1);
  });

  it("stores nothing with max 0 (cache: false)", () => {
    const { c } = cache(0);
    c.set("a", principal("a"));
    expect(c.size).toBe(0);
    expect(c.get("a")).toBeUndefined();
  });
});

type Answer = MessageInitShape<typeof VerifyCredentialResponseSchema>;

/** An in-memory Tessera: VerifyCredential answers from a table and counts; one WatchRevocations stream that only beats. */
function fakeTessera() {
  const state = { verifyCalls: 0, answers: new Map<string, Answer>(), streams: 0 };
  const transport = createRouterTransport(({ service }) =>
    service(VerificationService, {
      verifyCredential(req) {
        state.verifyCalls++;
        return state.answers.get(req.credential) ?? { valid: false, code: VerificationCode.NOT_FOUND };
      },
      async *watchRevocations(_req, ctx): AsyncGenerator<WatchRevocationsResponse> {
        state.streams++;
        // A heartbeat of an hour: the manual clock can move minutes without the stream
        // being found silent (which would empty the cache for another reason).
        yield create(WatchRevocationsResponseSchema, { cursor: "c1", heartbeatSeconds: 3600 });
        await new Promise<void>((resolve) => ctx.signal.addEventListener("abort", () => resolve()));
      },
    }),
  );
  return { state, transport };
}

const valid = (n: number, expiresAt?: number): Answer => ({
  valid: true,
  code: VerificationCode.VALID,
  principalId: `user-${n}`,
  principalKind: VerifiedPrincipalKind.USER,
  tenantId: "tenant-1",
  scopes: ["workflows:read"],
  credentialId: `cred-${n}`,
  credentialKind: "pat",
  ...(expiresAt === undefined ? {} : { expiresAt: timestampFromMs(expiresAt) }),
});

const pat = (n: number) => `tsr_pat_cache_bound_${String(n).padStart(4, "0")}`;

describe("the core's cache bounds, counted at VerifyCredential", () => {
  let auth: TesseraAuth | undefined;
  afterEach(() => auth?.close());

  async function setup(cache: { max?: number; ttlSeconds?: number } | false | undefined) {
    const { state, transport } = fakeTessera();
    const clock = { t: T0 };
    auth = createTesseraAuth({
      server: "https://tessera.invalid",
      transport,
      now: () => clock.t,
      ...(cache === undefined ? {} : { cache }),
    });
    // The stream is up: the cache is in use (while it is down nothing is cached anyway).
    expect(await auth.ready(2000)).toBe(true);
    return { state, clock, a: auth };
  }

  it("keeps at most cache.max answers: the least recently used credential is asked again", async () => {
    const { state, a } = await setup({ max: 2 });
    for (const n of [1, 2, 3]) state.answers.set(pat(n), valid(n));
    await a.authenticate(`Bearer ${pat(1)}`);
    await a.authenticate(`Bearer ${pat(2)}`);
    await a.authenticate(`Bearer ${pat(1)}`); // from the cache; 2 is now the least recently used
    expect(state.verifyCalls).toBe(2);
    await a.authenticate(`Bearer ${pat(3)}`); // evicts 2
    expect(a.stats().cacheSize).toBe(2);
    await a.authenticate(`Bearer ${pat(1)}`);
    await a.authenticate(`Bearer ${pat(3)}`);
    expect(state.verifyCalls).toBe(3);
    expect((await a.authenticate(`Bearer ${pat(2)}`)).id).toBe("user-2");
    expect(state.verifyCalls).toBe(4);
    // Many credentials: the cache stays at its bound.
    for (let n = 10; n < 60; n++) {
      state.answers.set(pat(n), valid(n));
      await a.authenticate(`Bearer ${pat(n)}`);
    }
    expect(a.stats().cacheSize).toBe(2);
    expect(state.verifyCalls).toBe(54);
  });

  it("asks Tessera again once an answer is ttlSeconds old, and not before", async () => {
    const { state, clock, a } = await setup({ ttlSeconds: 60 });
    state.answers.set(pat(1), valid(1));
    await a.authenticate(`Bearer ${pat(1)}`);
    clock.t += 59_999;
    await a.authenticate(`Bearer ${pat(1)}`);
    expect(state.verifyCalls).toBe(1);
    clock.t += 1;
    await a.authenticate(`Bearer ${pat(1)}`);
    expect(state.verifyCalls).toBe(2);
    expect(a.watching()).toBe(true); // the stream stayed up: the ttl alone sent it to Tessera
  });

  it("defaults to 300 s", async () => {
    const { state, clock, a } = await setup(undefined);
    state.answers.set(pat(1), valid(1));
    await a.authenticate(`Bearer ${pat(1)}`);
    clock.t += 299_999;
    await a.authenticate(`Bearer ${pat(1)}`);
    expect(state.verifyCalls).toBe(1);
    clock.t += 1;
    await a.authenticate(`Bearer ${pat(1)}`);
    expect(state.verifyCalls).toBe(2);
  });

  it("never admits a credential from the cache past its own expiry: Tessera is asked, and refuses it", async () => {
    const { state, clock, a } = await setup({ ttlSeconds: 3600 });
    state.answers.set(pat(1), valid(1, T0 + 5000));
    expect((await a.authenticate(`Bearer ${pat(1)}`)).expiresAt?.getTime()).toBe(T0 + 5000);
    clock.t += 4999;
    await a.authenticate(`Bearer ${pat(1)}`);
    expect(state.verifyCalls).toBe(1);
    clock.t += 1;
    state.answers.set(pat(1), { valid: false, code: VerificationCode.EXPIRED });
    const err = await a.authenticate(`Bearer ${pat(1)}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TesseraAuthError);
    expect((err as TesseraAuthError).reason).toBe("TOKEN_EXPIRED");
    expect(state.verifyCalls).toBe(2);
  });

  it("verifies every call with cache: false, the stream up or not", async () => {
    const { state, a } = await setup(false);
    state.answers.set(pat(1), valid(1));
    for (let i = 0; i < 5; i++) expect((await a.authenticate(`Bearer ${pat(1)}`)).id).toBe("user-1");
    expect(state.verifyCalls).toBe(5);
    expect(a.stats()).toMatchObject({ cacheSize: 0, cacheHits: 0, verifyCalls: 5 });
    expect(a.watching()).toBe(true);
  });
});
