import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import type { RequestListener } from "node:http";
import http2 from "node:http2";
import { createServer as createHttpsServer, type Server as HttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { DescService } from "@bufbuild/protobuf";
import { type Client, createClient, createRouterTransport, type Transport } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { type Logger, pino } from "pino";
import { afterAll, afterEach, beforeAll } from "vitest";
import type { AccessLog } from "../src/access-log.js";
import { type App, createApp } from "../src/app.js";
import { createClientCertificate, ensureDevCertificates } from "../src/certs/dev-ca.js";
import type { Clock } from "../src/clock.js";
import { type ConfigInput, loadConfig } from "../src/config.js";
import { startServer, type TesseraServer } from "../src/server.js";
import { initORM, isSchemaDroppedMeanwhile, type Storage } from "../src/storage/orm.js";
import { LOG_SCAN_DIR, scanDestination } from "./log-scan-suite.js";

/** The databases every storage-dependent test runs against. */
export interface TestDatabase {
  name: "sqlite" | "postgres";
  /** A fresh, isolated database URL (in-memory SQLite, or a new PostgreSQL schema). */
  url(): string;
}

const PG_BASE = process.env.TESSERA_TEST_POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/test";

export const SQLITE: TestDatabase = { name: "sqlite", url: () => "sqlite::memory:" };
export const POSTGRES: TestDatabase = {
  name: "postgres",
  url: () => `${PG_BASE}?schema=t_${Date.now().toString(36)}_${randomBytes(4).toString("hex")}`,
};
/** SQLite and PostgreSQL (PostgreSQL left out only by the local TESSERA_TEST_SKIP_POSTGRES switch). */
export const DATABASES: TestDatabase[] =
  process.env.TESSERA_TEST_SKIP_POSTGRES === "1" ? [SQLITE] : [SQLITE, POSTGRES];

/**
 * One database that several instances open: a PostgreSQL schema, or a SQLite file (two processes'
 * worth of connections). `cleanup` removes the SQLite file's folder (each app drops its schema).
 */
function sharedDatabase(kind: "postgres" | "sqlite"): { db: TestDatabase; cleanup(): void } {
  if (kind === "postgres") {
    const url = POSTGRES.url();
    return { db: { name: "postgres", url: () => url }, cleanup() {} };
  }
  const dir = mkdtempSync(join(tmpdir(), "tessera-shared-"));
  return {
    db: { ...SQLITE, url: () => `sqlite:${join(dir, "tessera.db")}` },
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

export const ADMIN_PASSWORD = "admin-password-for-tests";

/** Iterations used by tests that do not examine hashing itself (600k makes every login ~200 ms). */
export const TEST_ITERATIONS = 1_000;

/** The master key PostgreSQL tests run with (PostgreSQL refuses to start without one). */
export const TEST_MASTER_KEY = Buffer.alloc(32, 7).toString("base64");

/**
 * The logger of test apps: silent, unless TESSERA_TEST_LOG_SCAN names a folder. Then every
 * test app of the run logs at `trace`, with the ORM's SQL log on, into a file of that
 * folder per worker, and the global teardown (test/global-setup.ts) fails the run if any
 * line holds a secret (a PBKDF2 hash, a token of any kind, a private key, the test
 * passwords): the scan of the whole suite's logs (`npm test` with the variable set).
 */
export { LOG_SCAN_DIR };

const scanFile = scanDestination();
export const silentLogger = scanFile ? pino({ level: "trace" }, scanFile) : pino({ level: "silent" });

/** The transport test servers use (`server.transport`), when the run names one (vitest.config.ts). */
const TRANSPORT = process.env.TESSERA_TRANSPORT as "fast" | "connect" | undefined;

/** Build a config for tests: given database, fast hashing, no rate limits nor per-address connection limit unless asked. */
export function testConfig(dbUrl: string, overrides: ConfigInput = {}) {
  return loadConfig({
    env: {},
    overrides: {
      ...overrides,
      database: { url: dbUrl, ...(LOG_SCAN_DIR ? { debug: true } : {}), ...overrides.database },
      admin: { password: ADMIN_PASSWORD, ...overrides.admin },
      auth: {
        passwordIterations: TEST_ITERATIONS,
        // The suite's files share two cores with each other: hashing at the lowest priority, with
        // a deadline, would turn verdicts that tests count into refusals whenever the machine is
        // busy. hash-priority.test.ts tests the production defaults (nice 19, SCHED_IDLE, 900 ms).
        hashNice: 0,
        hashIdle: false,
        hashDeadlineMs: 0,
        ...(dbUrl.startsWith("postgres") && !overrides.auth?.masterKeyFile
          ? { masterKey: TEST_MASTER_KEY }
          : {}),
        ...overrides.auth,
      },
      rateLimit: { enabled: false, ...overrides.rateLimit },
      // Every test connection comes from 127.0.0.1: no per-address connection limit unless asked.
      // The vitest project "connect" runs the end-to-end files on connect-node's stock adapter.
      server: {
        port: 0,
        host: "127.0.0.1",
        maxConnectionsPerIp: 0,
        newConnectionsPerIpPerSecond: 0,
        ...(TRANSPORT ? { transport: TRANSPORT } : {}),
        ...overrides.server,
      },
      log: { level: "silent", ...overrides.log },
    },
  });
}

/**
 * A clock that reads the machine's time until pinned to an instant: for an app shared by
 * tests that need time to pass, of which one steps across an expiry (pin, then `release`).
 */
export interface PinnableClock {
  now: Clock;
  pin(ms: number): void;
  release(): void;
}

export function pinnableClock(): PinnableClock {
  let pinned: number | null = null;
  return {
    now: () => pinned ?? Date.now(),
    pin(ms) {
      pinned = ms;
    },
    release() {
      pinned = null;
    },
  };
}

/** An app on a fresh database; `close` also drops a PostgreSQL schema. */
export async function createTestApp(
  db: TestDatabase,
  overrides: ConfigInput = {},
  options: { clock?: Clock; logger?: Logger; accessLog?: AccessLog } = {},
): Promise<App> {
  const url = db.url();
  const app = await createApp(testConfig(url, overrides), { logger: silentLogger, ...options });
  const close = app.close;
  app.close = async () => {
    await close();
    await dropSchema(url);
  };
  return app;
}

/** Drop the PostgreSQL schema of a test URL (no-op for SQLite). */
export async function dropSchema(url: string): Promise<void> {
  const schema = /[?&]schema=([a-z0-9_]+)/.exec(url)?.[1];
  if (!url.startsWith("postgres") || !schema) return;
  const storage = await initORM({ url: PG_BASE, migrate: false });
  try {
    await storage.em.getConnection().execute(`drop schema if exists "${schema}" cascade`);
  } finally {
    await storage.close();
  }
}

/**
 * Run the migrator up or down to one migration, as a migration test does before writing
 * rows in an older schema. MikroORM's migrator first lists every table of the database, so
 * another test dropping its schema at that moment fails the look-up (nothing applied yet):
 * tried again, as `Storage.migrate` does.
 */
export async function migrateTo(storage: Storage, direction: "up" | "down", to: string): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await storage.orm.getMigrator()[direction]({ to });
      return;
    } catch (err) {
      if (storage.target.kind !== "postgresql" || attempt >= 4 || !isSchemaDroppedMeanwhile(err)) throw err;
      await new Promise((r) => setTimeout(r, 25 * attempt));
    }
  }
}

/**
 * The storage of a migration test, called inside its `describe`: `open()` connects to a fresh
 * database with no migration applied (the test then runs `migrateTo` the schema it writes
 * rows in), and after each test the storage is closed and its PostgreSQL schema dropped.
 */
export function migrationStorage(db: TestDatabase): { open(): Promise<Storage> } {
  let storage: Storage | undefined;
  let url = "";
  afterEach(async () => {
    await storage?.close();
    storage = undefined;
    await dropSchema(url);
    url = "";
  });
  return {
    async open() {
      // The URL first: should connecting fail, its schema is dropped all the same.
      url = db.url();
      storage = await initORM({ url, migrate: false });
      return storage;
    },
  };
}

/**
 * Tenant `t1` and its user `u1` as the early schema had them (columns added since left out),
 * for a migration test that writes older rows through knex.
 */
export async function insertEarlyUser(storage: Storage, at: Date): Promise<void> {
  const knex = storage.em.fork().getKnex();
  await knex("tenants").insert({ id: "t1", name: "t1", disabled: false, created_at: at, updated_at: at });
  await knex("users").insert({
    id: "u1",
    tenant_id: "t1",
    username: "u1",
    password_hash: "x",
    scopes: "",
    disabled: false,
    created_at: at,
    updated_at: at,
  });
}

/**
 * A downstream service's HTTPS server (an SDK middleware's app) on the test certificates,
 * listening on 127.0.0.1; its URL names localhost, which the server certificate covers.
 */
export async function listenHttps(
  certsDir: string,
  app: RequestListener,
): Promise<{ server: HttpsServer; url: string }> {
  const server = createHttpsServer(
    { cert: readFileSync(join(certsDir, "server.crt")), key: readFileSync(join(certsDir, "server.key")) },
    app,
  );
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, url: `https://localhost:${(server.address() as AddressInfo).port}` };
}

/** An in-memory transport through the app's full interceptor chain. */
export function memoryTransport(app: App): Transport {
  return createRouterTransport(app.routes, { router: { interceptors: app.interceptors } });
}

/** A client with a bearer token (or none) over a transport. */
export function clientFor<S extends DescService>(
  service: S,
  transport: Transport,
  token?: string,
): Client<S> {
  return createClient(service, withHeaders(transport, token ? { authorization: `Bearer ${token}` } : {}));
}

/** Wrap a transport so every call carries the given headers. */
export function withHeaders(transport: Transport, headers: Record<string, string>): Transport {
  return {
    unary: (method, signal, timeoutMs, header, input, contextValues) => {
      const h = new Headers(header);
      for (const [k, v] of Object.entries(headers)) h.set(k, v);
      return transport.unary(method, signal, timeoutMs, h, input, contextValues);
    },
    stream: (method, signal, timeoutMs, header, input, contextValues) => {
      const h = new Headers(header);
      for (const [k, v] of Object.entries(headers)) h.set(k, v);
      return transport.stream(method, signal, timeoutMs, h, input, contextValues);
    },
  };
}

/** A temporary cert folder with a development CA, server certificate and a client certificate. */
export interface TestCerts {
  dir: string;
  ca: Buffer;
  clientDir: string;
  clientCert: Buffer;
  clientKey: Buffer;
  clientFingerprint: string;
}

export async function createTestCerts(clientName = "test-client", sanUri?: string): Promise<TestCerts> {
  const dir = mkdtempSync(join(tmpdir(), "tessera-certs-"));
  await ensureDevCertificates(dir);
  const clientDir = join(dir, "clients", clientName);
  const client = await createClientCertificate(dir, clientName, clientDir, sanUri ? { sanUri } : {});
  return {
    dir,
    ca: readFileSync(join(dir, "ca.crt")),
    clientDir,
    clientCert: readFileSync(client.certPath),
    clientKey: readFileSync(client.keyPath),
    clientFingerprint: client.sha256Fingerprint,
  };
}

/** A running server on a free port with its own certs, and transports to reach it. */
export interface TestServer {
  app: App;
  server: TesseraServer;
  certs: TestCerts;
  connect(opts?: { clientCert?: boolean }): Transport;
  grpc(opts?: { clientCert?: boolean }): Transport;
  grpcWeb(opts?: { clientCert?: boolean }): Transport;
  /** A raw HTTP/2 session to the server over TLS (no error listener: add one where a test expects errors). */
  session(): http2.ClientHttp2Session;
  close(): Promise<void>;
}

/**
 * Instances on one database (see sharedDatabase), one per config, with one set of certificates:
 * started before the calling `describe`'s tests (filling the array returned, in order) and
 * closed after them. Call inside a `describe`.
 */
export function sharedInstances(
  kind: "postgres" | "sqlite",
  configs: readonly ConfigInput[],
  options: { clock?: Clock } = {},
): TestServer[] {
  const servers: TestServer[] = [];
  const shared = sharedDatabase(kind);
  beforeAll(async () => {
    const certs = await createTestCerts();
    for (const config of configs) servers.push(await startTestServer(shared.db, config, certs, options));
  }, 120_000);
  afterAll(async () => {
    for (const ts of servers.splice(0).reverse()) await ts.close();
    shared.cleanup();
  });
  return servers;
}

/**
 * An app on a fresh database served over TLS on a free port. `options.logger`: where the app
 * logs (default: {@link silentLogger}), for tests that read its lines.
 */
export async function startTestServer(
  db: TestDatabase,
  overrides: ConfigInput = {},
  certs?: TestCerts,
  options: { logger?: Logger; clock?: Clock } = {},
): Promise<TestServer> {
  const c = certs ?? (await createTestCerts());
  const app = await createTestApp(
    db,
    { ...overrides, server: { certDir: c.dir, ...overrides.server } },
    options,
  );
  const server = await startServer(app);
  const nodeOptions = (clientCert?: boolean) => ({
    ca: c.ca,
    ...(clientCert ? { cert: c.clientCert, key: c.clientKey } : {}),
  });
  return {
    app,
    server,
    certs: c,
    connect: (opts = {}) =>
      createConnectTransport({
        baseUrl: server.url,
        httpVersion: "2",
        nodeOptions: nodeOptions(opts.clientCert),
      }),
    grpc: (opts = {}) =>
      createGrpcTransport({ baseUrl: server.url, nodeOptions: nodeOptions(opts.clientCert) }),
    grpcWeb: (opts = {}) =>
      createGrpcWebTransport({
        baseUrl: server.url,
        httpVersion: "2",
        nodeOptions: nodeOptions(opts.clientCert),
      }),
    session: () => http2.connect(server.url, { ca: c.ca }),
    async close() {
      await server.close(0);
      await app.close();
    },
  };
}
