import { generateKeyPairSync, sign } from "node:crypto";
import { describe, expect, it } from "vitest";
import { createOfflineJwtVerifier } from "../src/sdk/server/offline-jwt.js";

/**
 * Calls that arrive while the key set is being fetched wait for that fetch: the first burst
 * of a cold start, and the first calls signed by a key just rotated in, are answered with the
 * keys it brings, not refused UNAVAILABLE or TOKEN_INVALID because a fetch was already going.
 */

const T0 = 1_800_000_000_000;

function keyPair(kid: string) {
  const pair = generateKeyPairSync("ed25519");
  const jwk = { ...pair.publicKey.export({ format: "jwk" }), kid, alg: "EdDSA", use: "sig" };
  const token = (jti: string): string => {
    const s = Math.floor(T0 / 1000);
    const h = Buffer.from(JSON.stringify({ alg: "EdDSA", kid, typ: "at+jwt" })).toString("base64url");
    const claims = { iss: "tessera", aud: "tessera", sub: "m-1", tid: "t-1", scope: "", pk: "machine", jti };
    const p = Buffer.from(JSON.stringify({ ...claims, iat: s, nbf: s, exp: s + 900 })).toString("base64url");
    return `${h}.${p}.${sign(null, Buffer.from(`${h}.${p}`), pair.privateKey).toString("base64url")}`;
  };
  return { jwk, token };
}

/** A verifier whose every fetch waits for `release()`, serving `keys()` at that moment. */
function gatedVerifier(keys: () => object[]) {
  const clock = { t: T0 };
  let fetches = 0;
  let release: () => void = () => undefined;
  const verifier = createOfflineJwtVerifier({
    fetchJwks: () => {
      fetches++;
      return new Promise((resolve) => {
        release = () => resolve({ keys: keys() });
      });
    },
    issuer: "tessera",
    audience: "tessera",
    algorithms: ["EdDSA"],
    clockSkewSeconds: 1,
    refetchGapMs: 30_000,
    maxAgeMs: 300_000,
    now: () => clock.t,
  });
  return { verifier, clock, release: () => release(), fetches: () => fetches };
}

describe("the offline JWT verifier while a key set fetch is in flight", () => {
  it("answers every call of a cold start's burst with the first fetch's keys (one fetch)", async () => {
    const a = keyPair("kid-a");
    const g = gatedVerifier(() => [a.jwk]);
    const calls = Array.from({ length: 20 }, (_, i) => g.verifier.verify(a.token(`jti-${i}`)));
    await new Promise((r) => setTimeout(r, 10));
    g.release();
    const settled = await Promise.allSettled(calls);
    expect(settled.filter((s) => s.status === "rejected").map((s) => String(s.reason))).toEqual([]);
    expect(g.fetches()).toBe(1);
  });

  it("answers the calls of a new kid that arrive during its refetch with the keys it brings", async () => {
    const a = keyPair("kid-a");
    const b = keyPair("kid-b");
    let served = [a.jwk];
    const g = gatedVerifier(() => served);
    const first = g.verifier.verify(a.token("warm"));
    g.release();
    await first;
    // kid-b is published past the refetch gap; its first call starts the refetch, the others
    // arrive meanwhile.
    served = [a.jwk, b.jwk];
    g.clock.t += 30_000;
    const calls = Array.from({ length: 10 }, (_, i) => g.verifier.verify(b.token(`jti-${i}`)));
    await new Promise((r) => setTimeout(r, 10));
    g.release();
    const settled = await Promise.allSettled(calls);
    expect(settled.filter((s) => s.status === "rejected").map((s) => String(s.reason))).toEqual([]);
    expect(g.fetches()).toBe(2);
  });
});
