import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeEach } from "vitest";
import { createJwtService, type JwtService } from "../../src/auth/jwt.js";
import { type MasterKey, sealStoredSigningKeys } from "../../src/auth/master-key.js";
import { initORM, type Storage } from "../../src/storage/orm.js";
import { testConfig } from "../helpers.js";

/**
 * Key-ring instances sharing one SQLite database, each test with a fresh one (the master-key
 * rotation tests). `clock` is read on every call, so a test may move its time.
 */
export function keyRingInstances(prefix: string, clock: () => number) {
  const made: JwtService[] = [];
  const dir = mkdtempSync(join(tmpdir(), `tessera-${prefix}-`));
  let storage: Storage | undefined;
  beforeEach(async () => {
    for (const s of made.splice(0)) s.close();
    await storage?.close();
    storage = await initORM({ url: `sqlite:${join(dir, `${prefix}-${randomBytes(4).toString("hex")}.db`)}` });
  });
  afterAll(async () => {
    for (const s of made) s.close();
    await storage?.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return {
    /** This test's database. */
    storage: (): Storage => storage!,
    /** An instance on `mk` (with `previous`), as app.ts starts one: the stored keys resealed first. */
    async instance(mk: MasterKey, previous: MasterKey[] = []): Promise<JwtService> {
      await sealStoredSigningKeys(storage!, mk, previous);
      const config = testConfig("sqlite::memory:", {
        auth: { jwt: { keyRotationInterval: 1000, keyPrePublication: 60 }, maxTokenTtl: 600 },
      });
      const s = await createJwtService({
        config: config.auth.jwt,
        storage: storage!,
        masterKey: mk,
        previousMasterKeys: previous,
        maxTokenTtlSeconds: 600,
        clock,
        refreshIntervalMs: 0,
        unknownKidGapMs: 0,
      });
      made.push(s);
      return s;
    },
  };
}
