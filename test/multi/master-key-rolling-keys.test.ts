import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import type { JwtService } from "../../src/auth/jwt.js";
import { openPrivateJwk, parseMasterKey } from "../../src/auth/master-key.js";
import { TesseraError } from "../../src/errors.js";
import { readSigningKeys } from "../../src/storage/repositories/signing-keys.js";
import { TEST_MASTER_KEY } from "../helpers.js";
import { keyRingInstances } from "./key-ring-instances.js";

/**
 * The key ring's side of a rolling master-key rotation (README, "master key"): instances
 * still on the old key (A) and instances restarted with the new one and the old one as
 * previous (B) share one database; every key either kind creates must sign on both, and
 * the start that drops the previous key must open every stored key.
 */

const OLD = parseMasterKey(TEST_MASTER_KEY, "old");
const NEW = parseMasterKey(randomBytes(32).toString("base64"), "new");
const claims = { subject: "u1", tenantId: "t1", scopes: ["a"], kind: "user" as const };
let t = Date.parse("2026-12-04T00:00:00Z");
const { storage, instance } = keyRingInstances("rolling-keys", () => t);

const signs = (s: JwtService) =>
  s.issue(claims).then(
    () => "signed",
    (e) => (e instanceof TesseraError ? `${e.reason}: ${e.message}` : String(e)),
  );

describe("a rolling master-key rotation", () => {
  it("keeps an instance on the old key signing once a key an instance on the new key created activates", async () => {
    const a = await instance(OLD);
    const b = await instance(NEW, [OLD]);
    await a.refresh();
    expect(await signs(a)).toBe("signed");
    // A scheduled rotation (pre-published), then an immediate one, both won by B.
    const next = await b.rotate();
    t = next!.activatesAt.getTime() + 1;
    await a.refresh();
    await b.refresh();
    expect(await signs(b)).toBe("signed");
    expect(await signs(a)).toBe("signed");
    await b.rotate({ immediate: true });
    await a.refresh();
    expect(await signs(a)).toBe("signed");
    expect(await signs(b)).toBe("signed");
  });

  it("lets an instance on the old key restart while the rotation is under way", async () => {
    await instance(OLD);
    const b = await instance(NEW, [OLD]);
    await b.rotate({ immediate: true });
    const again = await instance(OLD);
    expect(await signs(again)).toBe("signed");
  });

  it("opens, at the start that drops the previous key, a key an old instance created after the last new start", async () => {
    const a = await instance(OLD);
    const b = await instance(NEW, [OLD]);
    await a.refresh();
    await a.rotate(); // A, still running beside its replacement, wins a rotation: sealed under the old key only
    a.close();
    await b.refresh(); // B's next read (its poll, or the change notification) reseals it
    const started = await instance(NEW).then(
      () => "started",
      (e) => String(e),
    );
    expect(started).toBe("started");
    // That start leaves every key sealed under the new key alone.
    for (const row of await readSigningKeys(storage())) {
      expect(row.privateJwk.split(",")).toHaveLength(1);
      expect(() => openPrivateJwk(OLD, row.kid, row.privateJwk)).toThrow(/not the configured one/);
      expect(openPrivateJwk(NEW, row.kid, row.privateJwk)).toContain('"d"');
    }
  });
});
