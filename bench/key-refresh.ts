/**
 * What one refresh of the signing keys costs (each instance runs one every
 * auth.jwt.keyRefreshMs): wall time and this process's CPU per refresh, on SQLite and
 * PostgreSQL, with a few keys stored. Run: `npx tsx bench/key-refresh.ts [postgres-url]`.
 */
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createJwtService } from "../src/auth/jwt.js";
import { parseMasterKey } from "../src/auth/master-key.js";
import { loadConfig } from "../src/config.js";
import { initORM } from "../src/storage/orm.js";

const masterKey = parseMasterKey(Buffer.alloc(32, 7).toString("base64"), "bench");
const pg = process.argv[2] ?? "postgres://postgres@127.0.0.1:5432/test";
const schema = `bench_key_refresh_${Date.now().toString(36)}`;
const urls = [
  `sqlite:${join(mkdtempSync(join(tmpdir(), "tessera-key-refresh-")), "t.db")}`,
  `${pg}?schema=${schema}`,
];
for (const url of urls) {
  const storage = await initORM({ url });
  const config = loadConfig({ env: {}, overrides: { database: { url } } });
  const jwt = await createJwtService({ config: config.auth.jwt, storage, masterKey, refreshIntervalMs: 0 });
  try {
    for (let i = 0; i < 3; i++) await jwt.rotate();
    for (let i = 0; i < 50; i++) await jwt.refresh();
    const n = 500;
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    for (let i = 0; i < n; i++) await jwt.refresh();
    const wallUs = ((performance.now() - t0) * 1000) / n;
    const cpu = process.cpuUsage(cpu0);
    console.log(
      `${url.split(":")[0]}: ${jwt.stats().keys} keys, ${wallUs.toFixed(0)} µs wall, ${((cpu.user + cpu.system) / n).toFixed(0)} µs CPU per refresh`,
    );
  } finally {
    jwt.close();
    if (url.startsWith("postgres"))
      await storage.em.getConnection().execute(`drop schema if exists "${schema}" cascade`);
    await storage.close();
  }
}
