import { describe, expect, it } from "vitest";
import { refusalOf } from "../src/sdk/server/errors.js";
import { TesseraAuthError, type TesseraPrincipal } from "../src/sdk/server/index.js";
import { StreamHolds } from "../src/sdk/server/stream-holds.js";

/**
 * The registry of held streams on its own, with a scripted authentication: bounded and
 * released, an event arriving during a verification checks again, a loss re-checks only
 * what the watch vouched for, and a credential's expiry ends its stream.
 */

function principal(over: Partial<TesseraPrincipal> = {}): TesseraPrincipal {
  return {
    id: "user-1",
    kind: "user",
    tenantId: "tenant-1",
    scopes: ["ticks:read"],
    credentialKind: "pat",
    credentialId: "pat-1",
    applicationIds: [],
    ...over,
  };
}

const rule = { scopes: ["ticks:read"] };

function deferred<T>() {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

describe("the SDK's held streams", () => {
  it("holds at most max streams, refuses one more with RATE_LIMITED, and frees a slot on release", async () => {
    const holds = new StreamHolds({
      authenticate: async () => principal(),
      watching: () => true,
      now: Date.now,
      max: 2,
    });
    const a = await holds.hold("Bearer a", undefined, rule);
    await holds.hold("Bearer b", undefined, rule);
    const err = await holds.hold("Bearer c", undefined, rule).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TesseraAuthError);
    expect(err).toMatchObject({ reason: "RATE_LIMITED", retryAfterSeconds: 1 });
    a.release();
    a.release();
    expect(holds.size).toBe(1);
    await holds.hold("Bearer c", undefined, rule);
    expect(holds.size).toBe(2);
  });

  it("counts only admitted streams against max: calls still being verified take no slot, and past max once verified are refused", async () => {
    const pending = new Map<string, ReturnType<typeof deferred<TesseraPrincipal>>>();
    const holds = new StreamHolds({
      authenticate: (authorization) => {
        if (authorization === "Bearer known") return Promise.resolve(principal());
        const answer = deferred<TesseraPrincipal>();
        pending.set(authorization!, answer);
        return answer.promise;
      },
      watching: () => true,
      now: Date.now,
      max: 1,
    });
    // Two calls whose verification has not answered yet.
    const slow = ["Bearer x", "Bearer y"].map((h) => holds.hold(h, undefined, rule).catch((e: unknown) => e));
    await new Promise((r) => setTimeout(r, 0));
    expect(pending.size).toBe(2);
    const known = await holds.hold("Bearer known", undefined, rule);
    expect(known.principal.id).toBe("user-1");
    known.release();
    // Both verified now: the first takes the one slot, the second is refused and not held.
    pending.get("Bearer x")!.resolve(principal());
    pending.get("Bearer y")!.resolve(principal());
    const [x, y] = await Promise.all(slow);
    expect(x).toMatchObject({ principal: { id: "user-1" } });
    expect(y).toMatchObject({ reason: "RATE_LIMITED", retryAfterSeconds: 1 });
    expect(holds.size).toBe(1);
    expect(await holds.hold("Bearer known", undefined, rule).catch((e: unknown) => e)).toMatchObject({
      reason: "RATE_LIMITED",
    });
  });

  it("verifies again when an event arrives during the first verification, and refuses if that one does", async () => {
    const answers = [deferred<TesseraPrincipal>(), deferred<TesseraPrincipal>()];
    let calls = 0;
    const holds = new StreamHolds({
      authenticate: () => answers[calls++]!.promise,
      watching: () => true,
      now: Date.now,
    });
    const held = holds.hold("Bearer a", undefined, rule).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 0));
    expect(calls).toBe(1);
    // Any event while the principal is not known yet may concern it.
    holds.onEvent("credential", "pat-elsewhere");
    answers[0]!.resolve(principal());
    await new Promise((r) => setTimeout(r, 0));
    expect(calls).toBe(2);
    answers[1]!.reject(new TesseraAuthError("TOKEN_REVOKED", "credential is revoked"));
    expect(await held).toMatchObject({ reason: "TOKEN_REVOKED" });
    expect(holds.size).toBe(0);
  });

  it("ends a stream an event names with the refusal, leaves the others, and re-checks on a loss only what the watch vouched for", async () => {
    const revoked = new Set<string>();
    let watching = true;
    let calls = 0;
    const holds = new StreamHolds({
      authenticate: async (authorization) => {
        calls++;
        const id = authorization!.slice("Bearer ".length);
        if (revoked.has(id)) throw new TesseraAuthError("TOKEN_REVOKED", "credential is revoked");
        return principal({ credentialId: id });
      },
      watching: () => watching,
      now: Date.now,
    });
    const a = await holds.hold("Bearer a", undefined, rule);
    const b = await holds.hold("Bearer b", undefined, rule);
    revoked.add("a");
    const before = calls;
    holds.onEvent("credential", "a");
    await expect.poll(() => a.signal.aborted).toBe(true);
    expect(a.signal.reason).toMatchObject({ reason: "TOKEN_REVOKED" });
    expect(calls).toBe(before + 1); // b was not asked again
    expect(b.signal.aborted).toBe(false);
    // The watch is lost: b, vouched for by it, is verified again (and admitted, unvouched now).
    watching = false;
    holds.onLost();
    await expect.poll(() => calls).toBe(before + 2);
    // Lost again while down: nothing new is vouched for, so nothing is asked (its timer re-checks it).
    holds.onLost();
    await new Promise((r) => setTimeout(r, 20));
    expect(calls).toBe(before + 2);
    expect(holds.size).toBe(1);
    holds.endAll(new TesseraAuthError("UNAVAILABLE", "closing"));
    expect(b.signal.reason).toMatchObject({ reason: "UNAVAILABLE" });
    expect(holds.size).toBe(0);
  });

  it("verifies again every recheckMs while nothing vouches for a stream", async () => {
    let calls = 0;
    const holds = new StreamHolds({
      authenticate: async () => {
        calls++;
        if (calls > 2) throw new TesseraAuthError("CREDENTIALS_INVALID", "credentials are invalid");
        return principal();
      },
      watching: () => false,
      now: Date.now,
      recheckMs: 30,
    });
    const h = await holds.hold("Bearer a", undefined, rule);
    await expect.poll(() => h.signal.aborted).toBe(true);
    expect(calls).toBe(3);
    expect(h.signal.reason).toMatchObject({ reason: "CREDENTIALS_INVALID" });
  });

  it("ends a stream whose re-check fails outside the check (a bug) with INTERNAL, not a retryable UNAVAILABLE", async () => {
    let calls = 0;
    const reported: unknown[] = [];
    const holds = new StreamHolds({
      authenticate: async () => {
        calls++;
        if (calls > 1) throw new TypeError("a bug");
        return principal();
      },
      watching: () => false,
      now: Date.now,
      recheckMs: 30,
      refusalOf: (err) => refusalOf(err, (e) => reported.push(e)),
    });
    const h = await holds.hold("Bearer a", undefined, rule);
    await expect.poll(() => h.signal.aborted).toBe(true);
    expect(h.signal.reason).toMatchObject({ reason: "INTERNAL", status: 500 });
    expect(reported).toHaveLength(1);
    expect(holds.size).toBe(0);
  });

  it("ends a stream at its credential's expiry with TOKEN_EXPIRED", async () => {
    const holds = new StreamHolds({
      authenticate: async () => principal({ credentialKind: "jwt", expiresAt: new Date(Date.now() + 80) }),
      watching: () => true,
      now: Date.now,
    });
    const h = await holds.hold("Bearer a", undefined, rule);
    expect(h.signal.aborted).toBe(false);
    await expect.poll(() => h.signal.aborted).toBe(true);
    expect(h.signal.reason).toMatchObject({ reason: "TOKEN_EXPIRED", message: "access token expired" });
    expect(holds.size).toBe(0);
  });

  // A timer can fire before Date.now() reaches its deadline (a loaded CI run saw it by 1 ms); the
  // lagging clock makes that happen every time.
  it.each([
    ["Date.now", Date.now],
    ["a clock 20 ms behind the timers", () => Date.now() - 20],
  ])(
    "verifies a stream again without its certificate once the certificate's notAfter has passed (%s)",
    async (_, now) => {
      const seen: Array<string | undefined> = [];
      const holds = new StreamHolds({
        authenticate: async (_authorization, thumbprint) => {
          seen.push(thumbprint);
          // A certificate-bound credential: refused on a call without its certificate.
          if (thumbprint !== "x5t")
            throw new TesseraAuthError(
              "TOKEN_NOT_BOUND",
              "credential is bound to another client certificate",
            );
          return principal({ certificateThumbprint: "x5t" });
        },
        watching: () => true,
        now,
      });
      // A margin a loaded CI machine keeps between the hold and the certificate's end (80 ms did not).
      const h = await holds.hold("Bearer a", "x5t", rule, undefined, now() + 1500);
      expect(h.signal.aborted).toBe(false);
      await expect.poll(() => h.signal.aborted, { timeout: 10_000 }).toBe(true);
      expect(h.signal.reason).toMatchObject({ reason: "TOKEN_NOT_BOUND" });
      // Verified with the certificate when held, then once without it at its end: a timer that
      // fires early waits the rest instead of verifying again with the certificate.
      expect(seen).toEqual(["x5t", undefined]);
      expect(holds.size).toBe(0);
    },
  );
});
