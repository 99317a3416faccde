import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { TenantService } from "../gen/tessera/v1/tenant_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import {
  ADMIN_PASSWORD,
  createTestCerts,
  startTestServer,
  type TestDatabase,
  withHeaders,
} from "./helpers.js";

/** The sqlite3 shell the README's backup commands use (Debian: apt-get install sqlite3). */
const hasSqlite3 = spawnSync("sqlite3", ["-version"]).status === 0;

const fileDb = (path: string): TestDatabase => ({ name: "sqlite", url: () => `sqlite:${path}` });

/** The README's "Backups (SQLite)" commands, run as written against a running server. */
describe.skipIf(!hasSqlite3 && process.env.CI !== "true")(
  "an SQLite backup as the README takes and restores it",
  () => {
    it("copies a running server's database whole and a server on the restored copy serves it", async () => {
      const dir = mkdtempSync(join(tmpdir(), "tessera-backup-"));
      const data = join(dir, "data");
      const db = join(data, "tessera.db");
      const certs = await createTestCerts();
      const sh = (script: string) => execFileSync("sh", ["-c", script], { cwd: dir, timeout: 30_000 });

      const first = await startTestServer(fileDb(db), {}, certs);
      let kept: string;
      let undone: string;
      try {
        const { accessToken } = await createClient(UserService, first.connect()).login({
          username: "admin",
          password: ADMIN_PASSWORD,
        });
        const tenants = createClient(
          TenantService,
          withHeaders(first.connect(), { authorization: `Bearer ${accessToken}` }),
        );
        kept = (await tenants.createTenant({ name: "before-the-backup" })).tenant!.id;
        sh(`(umask 077; sqlite3 data/tessera.db ".backup 'tessera-backup.db'")`);
        undone = (await tenants.createTenant({ name: "after-the-backup" })).tenant!.id;
      } finally {
        await first.server.close(0);
        await first.app.close();
      }
      // Only its owner may read it: it holds the password hashes and the sealed signing keys.
      expect(statSync(join(dir, "tessera-backup.db")).mode & 0o077).toBe(0);
      const feedId = () => sh(`sqlite3 data/tessera.db "select database_id from revocation_feed"`).toString();
      const before = feedId();

      sh(`cp tessera-backup.db data/tessera.db && rm -f data/tessera.db-wal data/tessera.db-shm`);
      sh(
        `sqlite3 data/tessera.db "update revocation_feed set database_id = lower(hex(randomblob(16))) where id = 1"`,
      );
      expect(feedId()).not.toBe(before);
      expect(existsSync(join(data, "master.key"))).toBe(true);

      const restored = await startTestServer(fileDb(db), {}, certs);
      try {
        const { accessToken } = await createClient(UserService, restored.connect()).login({
          username: "admin",
          password: ADMIN_PASSWORD,
        });
        const tenants = createClient(
          TenantService,
          withHeaders(restored.connect(), { authorization: `Bearer ${accessToken}` }),
        );
        const ids = (await tenants.listTenants({})).tenants.map((t) => t.id);
        expect(ids).toContain(kept);
        expect(ids).not.toContain(undone);
      } finally {
        await restored.server.close(0);
        await restored.app.close();
      }
    });
  },
);
