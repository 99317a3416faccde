import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import {
  type MasterKey,
  openPrivateJwk,
  parseMasterKey,
  sealForFleet,
  sealPrivateJwk,
  sealStoredSigningKeys,
} from "../../src/auth/master-key.js";
import { SigningKey } from "../../src/storage/entities.js";
import { readSigningKeys } from "../../src/storage/repositories/signing-keys.js";
import { keyRingInstances } from "./key-ring-instances.js";

/**
 * Which envelopes a signing key's row keeps through master-key rotations (README, "master
 * key"): only those under the current key and the configured previous ones, trimmed by the
 * instance whose envelope is first (the newest), at its start and when it reads the keys;
 * an instance still on an older key leaves the newer envelopes alone.
 */

const key = (name: string) => parseMasterKey(randomBytes(32).toString("base64"), name);
const K1 = key("K1");
const K2 = key("K2");
const K3 = key("K3");
const t = Date.parse("2026-12-04T00:00:00Z");
const { storage, instance } = keyRingInstances("rolling-trim", () => t);

/** Of each stored key, whether `mk` opens it. */
async function opens(mk: MasterKey): Promise<boolean[]> {
  return (await readSigningKeys(storage())).map((row) => {
    try {
      return openPrivateJwk(mk, row.kid, row.privateJwk).includes('"d"');
    } catch {
      return false;
    }
  });
}

describe("the envelopes a rolling master-key rotation leaves", () => {
  it("drops a key rotated out two rotations ago (K1→K2→K3 with K2 as previous)", async () => {
    await instance(K1);
    const second = await instance(K2, [K1]);
    await second.rotate({ immediate: true });
    expect(await opens(K1)).toEqual([true, true]);
    await instance(K3, [K2]);
    expect(await opens(K1)).toEqual([false, false]);
    expect(await opens(K2)).toEqual([true, true]);
    expect(await opens(K3)).toEqual([true, true]);
  });

  it("counts a previous list holding only the current key as none", async () => {
    await instance(K1);
    await instance(K2, [K1]);
    await instance(K2, [K2]);
    expect(await opens(K1)).toEqual([false]);
    expect(await opens(K2)).toEqual([true]);
  });

  it("trims, when read, a key an instance not yet restarted sealed under the dropped key too", async () => {
    await instance(K1);
    const during = await instance(K2, [K1]);
    const after = await instance(K2); // the second pass of the roll: K1 dropped here first
    await during.rotate({ immediate: true }); // sealed [K2, K1] by the instance not yet restarted
    expect(await opens(K1)).toEqual([false, true]);
    await after.refresh();
    expect(await opens(K1)).toEqual([false, false]);
    expect(await opens(K2)).toEqual([true, true]);
  });

  it("leaves the new key's envelopes to an instance on the old key that restarts during the roll", async () => {
    await instance(K1);
    const renewed = await instance(K2, [K1]);
    await renewed.rotate({ immediate: true });
    const old = await instance(K1);
    await old.refresh();
    expect(await opens(K2)).toEqual([true, true]);
    expect(await opens(K1)).toEqual([true, true]);
  });

  it("leaves every row untouched when a start refuses a row no configured key opens", async () => {
    const em = storage().em.fork();
    const jwk = JSON.stringify({ kty: "OKP", crv: "Ed25519", d: "secret", x: "public" });
    const base = { alg: "EdDSA", publicJwk: "{}", createdAt: new Date(t), activatesAt: new Date(t) };
    for (let i = 1; i <= 3; i++)
      await em.insert(SigningKey, {
        ...base,
        kid: `k${i}`,
        generation: i,
        privateJwk: sealForFleet(K2, [K1], `k${i}`, jwk),
      });
    await em.insert(SigningKey, {
      ...base,
      kid: "k4",
      generation: 4,
      privateJwk: sealPrivateJwk(K3, "k4", jwk),
    });
    const before = (await readSigningKeys(storage())).map((r) => r.privateJwk);
    await expect(sealStoredSigningKeys(storage(), K2)).rejects.toThrow(/not the configured one/);
    expect((await readSigningKeys(storage())).map((r) => r.privateJwk)).toEqual(before);
  });
});
