import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { createConnectTransport } from "@connectrpc/connect-node";
import { base64url, decodeProtectedHeader } from "jose";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { type App, createApp } from "../../src/app.js";
import { startServer, type TesseraServer } from "../../src/server.js";
import { initORM } from "../../src/storage/orm.js";
import { stateChannelOf } from "../../src/storage/pg-state-channel.js";
import { rejection } from "../errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestCerts,
  dropSchema,
  POSTGRES,
  silentLogger,
  TEST_MASTER_KEY,
  testConfig,
} from "../helpers.js";
import { scanChildStderr } from "../log-scan-suite.js";

const ROOT = join(import.meta.dirname, "..", "..");
const MAIN = join(ROOT, "src", "main.ts");
const PASSWORD = "multi-keys-admin-password";
/**
 * Seconds: each key signs for 6 s; the next one is published 4 s before it signs. The
 * activation is fixed when the rotation is found due, before the insert commits, so what
 * the other instances have is the pre-publication less the commit's delay: with 2 s, at
 * load 28, instances were found reading a key 26 and 182 ms after it activated (twice in a
 * row). The 1 s target on each reading after the commit is asserted as before.
 */
const INTERVAL = 6;
const PRE_PUBLICATION = 4;

const children = new Set<ChildProcess>();
afterAll(() => {
  for (const c of children) c.kill("SIGKILL");
});

/** Start `tessera serve` on `url`; resolves with its base URL once it listens. */
function serve(
  url: string,
  certDir: string,
  extra: Record<string, string> = {},
): Promise<{ url: string; child: ChildProcess; log: () => string }> {
  const env: Record<string, string> = {
    ...(process.env as Record<string, string>),
    TESSERA_DATABASE_URL: url,
    TESSERA_CERT_DIR: certDir,
    TESSERA_HOST: "127.0.0.1",
    TESSERA_PORT: "0",
    TESSERA_ADMIN_PASSWORD: PASSWORD,
    TESSERA_PASSWORD_ITERATIONS: "1000",
    TESSERA_MASTER_KEY: TEST_MASTER_KEY,
    TESSERA_RATE_LIMIT: "false",
    TESSERA_MAX_CONNECTIONS_PER_IP: "0",
    // Hashing at the event loop's priority without a deadline: at the defaults (nice 19, 900 ms)
    // a machine this loaded refuses logins 503 by design, which the load loop would count as
    // failures of what this file tests (keys), not of hashing.
    TESSERA_HASH_NICE: "0",
    TESSERA_HASH_IDLE: "false",
    TESSERA_HASH_DEADLINE_MS: "0",
    TESSERA_JWT_KEY_ROTATION_INTERVAL: String(INTERVAL),
    TESSERA_JWT_KEY_PRE_PUBLICATION: String(PRE_PUBLICATION),
    // The default refresh period (500 ms): the propagation bound measured is the shipped one.
    TESSERA_LOG_LEVEL: "info",
    ...extra,
  };
  const child = spawn(process.execPath, ["--import", "tsx", MAIN, "serve"], { cwd: ROOT, env });
  scanChildStderr(child);
  children.add(child);
  child.once("exit", () => children.delete(child));
  return new Promise((resolve, reject) => {
    let stderr = "";
    child.stdout.resume();
    child.stderr.on("data", (d) => {
      stderr += d;
      const m = /"url":"(https:\/\/[^"]+)".*"msg":"tessera listening"/.exec(stderr);
      if (m) resolve({ url: m[1]!, child, log: () => stderr });
    });
    child.once("exit", (code) => reject(new Error(`serve exited with ${code} before listening:\n${stderr}`)));
  });
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGTERM");
  await exited;
}

interface KeyRow {
  kid: string;
  generation: number;
  createdAt: number;
  activatesAt: number;
}

async function keyRows(url: string): Promise<KeyRow[]> {
  const storage = await initORM({ url, migrate: false });
  try {
    const rows = await storage.em
      .getConnection()
      .execute<{ kid: string; generation: number; created_at: Date; activates_at: Date }[]>(
        "select kid, generation, created_at, activates_at from signing_keys order by generation",
      );
    return rows.map((r) => ({
      kid: r.kid,
      generation: Number(r.generation),
      createdAt: new Date(r.created_at).getTime(),
      activatesAt: new Date(r.activates_at).getTime(),
    }));
  } finally {
    await storage.close();
  }
}

function quantile(values: number[], q: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? Number.NaN;
}

describe("signing keys across three `tessera serve` on one PostgreSQL schema", () => {
  const url = POSTGRES.url();
  afterAll(async () => {
    await dropSchema(url);
  });

  it("rotates once per interval under load: tokens of every instance verify everywhere, new keys reach all before they sign (every one within 1 s), JWKS identical", async () => {
    const certDir = join(mkdtempSync(join(tmpdir(), "tessera-keys-")), "certs");
    const instances = await Promise.all([0, 1, 2].map(() => serve(url, certDir)));
    const dispatcher = new Agent({ connect: { ca: readFileSync(join(certDir, "ca.crt")) }, connections: 8 });
    const call = async (base: string, method: string, body: unknown, token?: string) => {
      const res = await undiciFetch(`${base}/tessera.v1.UserService/${method}`, {
        method: "POST",
        dispatcher,
        headers: {
          "content-type": "application/json",
          ...(token ? { authorization: `Bearer ${token}` } : {}),
        },
        body: JSON.stringify(body),
      });
      return { status: res.status, json: (await res.json()) as Record<string, unknown> };
    };
    const jwksOf = async (base: string) =>
      (
        (await (await undiciFetch(`${base}/.well-known/jwks.json`, { dispatcher })).json()) as {
          keys: { kid: string }[];
        }
      ).keys;
    try {
      const started = Date.now();
      // Load for three intervals at least, and on until tokens of three keys were used and
      // every instance's tokens verified on every instance (a loaded machine serves few
      // calls: 9 verifications in three intervals at load 34), within twelve intervals.
      const kidsUsed = new Set<string>();
      const pairs = new Set<string>();
      const minEnd = started + 3 * INTERVAL * 1000 + 1000;
      const maxEnd = started + 12 * INTERVAL * 1000;
      const going = () => {
        const t = Date.now();
        return t < minEnd || (t < maxEnd && (kidsUsed.size < 3 || pairs.size < 9));
      };
      // When each instance's JWKS first showed each kid: the request's send and receive
      // times (the instance learned it before the receive time), one sampler per instance.
      const firstSeen = new Map<string, { sent: number; received: number }[]>();
      const samples: { sent: number; kids: string[] }[] = [];
      const samplers = instances.map(async (instance, n) => {
        while (going()) {
          const sent = Date.now();
          const kids = (await jwksOf(instance.url)).map((k) => k.kid);
          const received = Date.now();
          samples.push({ sent, kids });
          for (const kid of kids) {
            const seen = firstSeen.get(kid) ?? [];
            seen[n] ??= { sent, received };
            firstSeen.set(kid, seen);
          }
          await sleep(25);
        }
      });
      // Load: each instance logs in in a loop; every token is used on every instance at once.
      const failures: string[] = [];
      let verified = 0;
      const load = instances.map(async (issuer, n) => {
        while (going()) {
          const login = await call(issuer.url, "Login", { username: "admin", password: PASSWORD });
          if (login.status !== 200) {
            failures.push(`login on ${n}: ${login.status} ${JSON.stringify(login.json)}`);
            continue;
          }
          const token = login.json.accessToken as string;
          kidsUsed.add(decodeProtectedHeader(token).kid!);
          const results = await Promise.all(instances.map((i) => call(i.url, "GetCurrentUser", {}, token)));
          results.forEach((r, m) => {
            if (r.status === 200) {
              verified++;
              pairs.add(`${n}→${m}`);
            } else failures.push(`token of ${n} on ${m}: ${r.status} ${JSON.stringify(r.json)}`);
          });
        }
      });
      await Promise.all([...load, ...samplers]);
      const deadline = Date.now();
      expect(failures).toEqual([]);
      expect([...pairs].sort()).toHaveLength(9);

      const rows = await keyRows(url);
      // At least two rotations happened during the load, and tokens were signed by at least three keys.
      expect(rows.length).toBeGreaterThanOrEqual(3);
      expect(kidsUsed.size).toBeGreaterThanOrEqual(3);
      // Exactly one key per rotation: consecutive generations, activations one interval apart,
      // never two in one interval. A key activates one interval after the last unless the
      // first instance to find the rotation due found it late (its 500 ms check delayed: on
      // a machine at load 30 an event loop can stall for seconds), and then it activates the
      // pre-publication after that finding: the bound allows that whole pre-publication,
      // still far from a rotation skipped (two intervals) or one per start only.
      expect(rows.map((r) => r.generation)).toEqual(rows.map((_, i) => i + 1));
      const spacings = rows.slice(1).map((r, i) => r.activatesAt - rows[i]!.activatesAt);
      for (const s of spacings) {
        expect(s).toBeGreaterThanOrEqual(INTERVAL * 1000);
        expect(s).toBeLessThanOrEqual((INTERVAL + PRE_PUBLICATION) * 1000);
      }
      // Every key created during the load was read by all three instances within 1 s of its
      // commit (the creator logs "signing key created" once committed; each instance logs
      // when it reads a new key: the JWKS samplers' own latency on a loaded machine is no
      // measure), so before it signed anything; and every instance's JWKS showed it.
      const lags: number[] = [];
      const logged = (log: string, msg: string, kid: string) => {
        const line = log.split("\n").find((l) => l.includes(`"msg":"${msg}"`) && l.includes(kid));
        return line ? (JSON.parse(line) as { time: number }).time : Number.NaN;
      };
      // Keys created while the samplers ran, with time left for all to read them.
      const fresh = rows.filter((r) => r.createdAt > started + 200 && r.createdAt < deadline - 1000);
      for (const row of fresh) {
        expect(firstSeen.get(row.kid)?.filter(Boolean), row.kid).toHaveLength(3);
        const committed = Math.min(
          ...instances
            .map((i) => logged(i.log(), "signing key created", row.kid))
            .filter((t) => !Number.isNaN(t)),
        );
        // Committed (by exactly one of them) before it was due to sign.
        expect(committed).toBeLessThan(row.activatesAt);
        for (const instance of instances) {
          const at = logged(instance.log(), "signing key read", row.kid);
          expect(
            at,
            `${row.kid}: committed ${row.activatesAt - committed} ms before its activation, read ${at - committed} ms after the commit`,
          ).toBeLessThan(row.activatesAt);
          lags.push(at - committed);
        }
      }
      expect(lags.length).toBeGreaterThanOrEqual(3);
      // The target, 1 s, for every reading: each instance reads a new key when the
      // signing_keys trigger's notification arrives (tens of ms), the 500 ms poll only
      // backing it up. (With the poll alone the worst reading had reached 1135 ms at load
      // average 25 on 2 cores.)
      expect(Math.max(...lags), JSON.stringify(lags)).toBeLessThan(1000);
      // Every JWKS answer of every instance holds every key that had activated when it was
      // asked for (whatever instance created it), and no key the database does not hold;
      // answers differ at most by a pre-published key not read everywhere yet.
      const known = new Set(rows.map((r) => r.kid));
      let prePublished = 0;
      for (const { sent, kids } of samples) {
        for (const row of rows)
          if (row.activatesAt <= sent) expect(kids, `${row.kid} at ${sent}`).toContain(row.kid);
        for (const kid of kids) expect(known).toContain(kid);
        prePublished += rows.filter((r) => r.activatesAt > sent && kids.includes(r.kid)).length;
      }
      // Then all three answer the same set. Rotation goes on meanwhile (a key is created
      // every interval), and an answer taken just after a creation may lack the key the other
      // instances have not read yet: asked again until they agree, which they do for most
      // of each interval.
      let finalSets: { kid: string }[][] = [];
      for (const until = Date.now() + 3 * INTERVAL * 1000; ; ) {
        finalSets = await Promise.all(instances.map((i) => jwksOf(i.url)));
        if (new Set(finalSets.map((s) => JSON.stringify(s))).size === 1 || Date.now() > until) break;
        await sleep(100);
      }
      expect(new Set(finalSets.map((s) => JSON.stringify(s))).size, JSON.stringify(finalSets)).toBe(1);
      console.log(
        `keys: ${rows.length} created, activation spacing ${spacings.join("/")} ms; ` +
          `read by each instance after its commit: p50 ${quantile(lags, 0.5)} ms, max ${Math.max(...lags)} ms (${lags.length}); ` +
          `${verified} cross-instance verifications, ${samples.length} JWKS samples (${prePublished} times a key not signing yet was in one)`,
      );
    } finally {
      await dispatcher.close();
      await Promise.all(instances.map((i) => stop(i.child)));
    }
  });

  it("does not rotate early when the instances restart", async () => {
    const fresh = POSTGRES.url();
    try {
      const certDir = join(mkdtempSync(join(tmpdir(), "tessera-keys-")), "certs");
      const hour = { TESSERA_JWT_KEY_ROTATION_INTERVAL: "3600", TESSERA_JWT_KEY_PRE_PUBLICATION: "60" };
      for (let round = 0; round < 2; round++) {
        const fleet = await Promise.all([0, 1].map(() => serve(fresh, certDir, hour)));
        await Promise.all(fleet.map((i) => stop(i.child)));
        expect((await keyRows(fresh)).map((r) => r.generation)).toEqual([1]);
      }
    } finally {
      await dropSchema(fresh);
    }
  });
});

describe("unknown kids on a real server over TLS (two in-process instances, one PostgreSQL schema)", () => {
  const url = POSTGRES.url();
  const apps: App[] = [];
  const servers: TesseraServer[] = [];
  afterAll(async () => {
    for (const s of servers) await s.close(0);
    for (const a of apps) await a.close();
    await dropSchema(url);
  });

  it("accepts a key another instance activated at once on its first token, and spends at most one read per 250 ms on forged kids", async () => {
    const certs = await createTestCerts();
    // No background refresh for B: only tokens can make it read the keys.
    for (const keyRefreshMs of [500, 60_000]) {
      const app = await createApp(
        testConfig(url, {
          server: { certDir: certs.dir },
          auth: { jwt: { keyRefreshMs, keyPrePublication: keyRefreshMs === 500 ? 60 : 0 } },
        }),
        { logger: silentLogger },
      );
      apps.push(app);
      servers.push(await startServer(app));
    }
    const [a, b] = apps as [App, App];
    // Nor notifications: B's listening session is closed (its state cache is off, its reads
    // go to the database), so the key's notification does not reach it either.
    await b.notifier!.close();
    const transport = createConnectTransport({
      baseUrl: servers[1]!.url,
      httpVersion: "2",
      nodeOptions: { ca: certs.ca },
    });
    await a.jwt.rotate({ immediate: true });
    const token = (
      await clientFor(
        UserService,
        createConnectTransport({
          baseUrl: servers[0]!.url,
          httpVersion: "2",
          nodeOptions: { ca: certs.ca },
        }),
      ).login({ username: "admin", password: ADMIN_PASSWORD })
    ).accessToken;
    expect(b.jwt.jwks().keys.map((k) => k.kid)).not.toContain(decodeProtectedHeader(token).kid);
    expect((await clientFor(UserService, transport, token).getCurrentUser({})).username).toBe("admin");
    expect(b.jwt.stats().unknownKidRefetches).toBe(1);

    // A flood of tokens naming kids nobody has, over TLS: refused, and B reads the keys
    // at most once per 250 ms however many arrive.
    const [, payload, signature] = token.split(".") as [string, string, string];
    const forged = () =>
      `${base64url.encode(JSON.stringify({ ...decodeProtectedHeader(token), kid: base64url.encode(randomBytes(32)) }))}.${payload}.${signature}`;
    const before = b.jwt.stats().refreshes;
    const started = performance.now();
    const reasons: (string | undefined)[] = [];
    for (let wave = 0; wave < 10; wave++) {
      const results = await Promise.all(
        Array.from({ length: 40 }, () =>
          rejection(clientFor(UserService, transport, forged()).getCurrentUser({})),
        ),
      );
      reasons.push(...results.map((r) => r.reason));
    }
    const elapsed = performance.now() - started;
    const reads = b.jwt.stats().refreshes - before;
    expect(new Set(reasons)).toEqual(new Set(["TOKEN_INVALID"]));
    expect(reads).toBeGreaterThanOrEqual(1);
    expect(reads).toBeLessThanOrEqual(Math.ceil(elapsed / 250) + 1);
    console.log(`400 forged kids over TLS in ${elapsed.toFixed(0)} ms: ${reads} key reads`);
  });
});

describe("signing keys announced by NOTIFY (two in-process instances, one PostgreSQL schema, the poll at 60 s)", () => {
  const url = POSTGRES.url();
  const apps: App[] = [];
  afterAll(async () => {
    for (const a of apps) await a.close();
    await dropSchema(url);
  });

  it("makes every key one instance creates known to the other within 1 s, with no poll to help", async () => {
    for (let i = 0; i < 2; i++)
      apps.push(
        await createApp(testConfig(url, { auth: { jwt: { keyRefreshMs: 60_000 } } }), {
          logger: silentLogger,
        }),
      );
    const [a, b] = apps as [App, App];
    expect(await b.notifier!.whenOnline(20_000)).toBe(true);
    // A third listener on the schema's channel marks each commit: the trigger's notification
    // is delivered when the transaction commits, so its arrival here is the commit (plus a
    // loopback delivery the instances pay as well).
    const { Client } = createRequire(import.meta.url)("pg") as {
      Client: new (o: {
        connectionString: string;
      }) => {
        connect(): Promise<void>;
        query(sql: string): Promise<unknown>;
        end(): Promise<void>;
        on(event: "notification", fn: (m: { payload?: string }) => void): void;
      };
    };
    const marker = new Client({ connectionString: a.storage.target.location });
    await marker.connect();
    let committedAt = Number.NaN;
    marker.on("notification", (m) => {
      if (m.payload === "signing_keys" && Number.isNaN(committedAt)) committedAt = performance.now();
    });
    await marker.query(`listen "${await stateChannelOf(a.storage)}"`);
    const lags: number[] = [];
    try {
      for (let round = 0; round < 8; round++) {
        const creator = round % 2 ? b : a;
        const other = round % 2 ? a : b;
        const known = new Set(other.jwt.jwks().keys.map((k) => k.kid));
        committedAt = Number.NaN;
        const rotation = creator.jwt.rotate();
        let learntAt = Number.NaN;
        const started = performance.now();
        while (performance.now() - started < 10_000) {
          if (other.jwt.jwks().keys.some((k) => !known.has(k.kid))) {
            learntAt = performance.now();
            break;
          }
          await sleep(2);
        }
        const kid = (await rotation)!.kid;
        expect(other.jwt.jwks().keys.map((k) => k.kid)).toContain(kid);
        expect(committedAt).not.toBeNaN();
        lags.push(Math.max(0, learntAt - committedAt));
      }
    } finally {
      await marker.end();
    }
    // Every key, not the median: the notification is the mechanism, and 60 s of poll cannot explain any.
    expect(Math.max(...lags), JSON.stringify(lags)).toBeLessThan(1000);
    console.log(`keys by NOTIFY: ${lags.map((l) => l.toFixed(0)).join("/")} ms after the commit`);
  });
});
