import { Writable } from "node:stream";
import { ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { type Logger, pino } from "pino";
import { afterAll, beforeAll } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { certificateFingerprint, DEFAULT_LEAF_DAYS, issueLeaf, loadCa } from "../../src/certs/issuing.js";
import type { ConfigInput } from "../../src/config.js";
import { rejection } from "../errors-util.js";
import { startTestServer, type TestDatabase, type TestServer } from "../helpers.js";
import { scannedSink } from "../log-scan-suite.js";
import { adminLogin, clients, short, tenantWithAdmin } from "../machine-fixtures.js";

/**
 * Fixtures the adversarial suite (test/security/) shares: what several of its files wrote
 * each for itself. Servers, transports and raw HTTP/2 sessions come from test/helpers.ts
 * (`startTestServer`, `ts.connect()`, `ts.grpc()`, `ts.grpcWeb()`, `ts.session()`);
 * principals and tenants from test/machine-fixtures.ts.
 */

/**
 * Rate limits on, with the per-IP, per-principal and per-username password-check limits far
 * out of the way: for files that test the failure budgets (and the ones that reserve before
 * PBKDF2) from many addresses, which the per-IP limit would otherwise stop first, and whose
 * right logins (the shared "admin" among them, counted in Redis by every file at once) must
 * not meet the budget of checks. Spread, then add the budget under test.
 */
export const LIMITS_ON = {
  enabled: true,
  perIpPerMinute: 10_000,
  perPrincipalPerMinute: 10_000,
  passwordChecksPerUsernamePerMinute: 10_000,
} as const;

/**
 * A source of client addresses (sent as X-Forwarded-For through the trusted proxy 127.0.0.1)
 * that no other test of the run uses: `<prefix>.<random>.<n>`, the random octet because
 * Redis keeps its budgets across runs, and `n` counting up within this file.
 */
export function freshIps(prefix: string): () => string {
  const octet = Math.floor(Math.random() * 250);
  let n = 1;
  return () => `${prefix}.${octet}.${n++}`;
}

/** `promise`, or a rejection naming `what` after `ms`. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(what)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** One gRPC/gRPC-Web envelope: flags, big-endian length, data. */
export function envelope(flags: number, data: Uint8Array): Buffer {
  const head = Buffer.alloc(5);
  head[0] = flags;
  head.writeUInt32BE(data.byteLength, 1);
  return Buffer.concat([head, data]);
}

/** A logger (at `level`) whose lines are kept, as written (`raw`) and parsed (`lines`). */
export function captureLogs(level: pino.LevelWithSilent = "info"): {
  logger: Logger;
  raw: string[];
  lines: Array<Record<string, unknown>>;
} {
  const raw: string[] = [];
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      const text = String(chunk);
      raw.push(text);
      for (const line of text.split("\n")) if (line) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level }, scannedSink(sink)), raw, lines };
}

/** A backend's client certificate from the test server's CA: files, and its SHA-256 fingerprint as bound. */
export interface Backend {
  cert: Buffer;
  key: Buffer;
  fingerprint: string;
}

/**
 * Mints a backend's client certificate from the test server's CA, carrying `sanUris` as URI
 * SANs in that order (the same leaf as `createClientCertificate` issues, which takes one).
 */
export async function mintBackend(ts: TestServer, ...sanUris: string[]): Promise<Backend> {
  const leaf = await issueLeaf(await loadCa(ts.certs.dir), {
    commonName: `backend-${short()}`,
    usage: "client",
    names: sanUris.map((value) => ({ type: "url", value })),
    validityDays: DEFAULT_LEAF_DAYS,
  });
  return {
    cert: Buffer.from(leaf.certPem),
    key: Buffer.from(leaf.keyPem),
    fingerprint: certificateFingerprint(leaf.certPem),
  };
}

/** A transport to the test server presenting the backend's client certificate. */
export function presenting(ts: TestServer, backend: Backend): Transport {
  return createConnectTransport({
    baseUrl: ts.server.url,
    httpVersion: "2",
    nodeOptions: { ca: ts.certs.ca, cert: backend.cert, key: backend.key },
  });
}

/** The machine user the backend's certificate alone authenticates as, or the refusal's reason. */
export async function certificateUser(ts: TestServer, backend: Backend): Promise<string> {
  try {
    return (await createClient(MachineUserService, presenting(ts, backend)).checkAuthentication({}))
      .machineUserId;
  } catch (err) {
    return (await rejection(Promise.reject(err))).reason ?? "";
  }
}

/** What {@link certificateTenant} sets up; its fields are set once its beforeAll has run. */
export interface CertificateTenant {
  ts: TestServer;
  /** A transport to `ts` presenting no client certificate. */
  transport: Transport;
  /** The default tenant's admin's token. */
  root: string;
  /** A tenant whose administrator holds admin:machine-users only. */
  tenant: Awaited<ReturnType<typeof tenantWithAdmin>>;
}

/**
 * In a describe: a test server on `db` with optional mTLS (and `config` spread over that) for
 * the describe's tests, the admin's token, and a tenant administered with admin:machine-users.
 */
export function certificateTenant(db: TestDatabase, config: ConfigInput = {}): CertificateTenant {
  const c = {} as CertificateTenant;
  beforeAll(async () => {
    c.ts = await startTestServer(db, { server: { mtls: "optional" }, ...config });
    c.transport = c.ts.connect();
    c.root = await adminLogin(c.transport);
    c.tenant = await tenantWithAdmin(c.transport, c.root, ["admin:machine-users"]);
  });
  afterAll(async () => {
    await c.ts.close();
  });
  return c;
}

/** The outcome of a machine CheckAuthentication with `token` over `transport`: "ok" or the refusal's reason. */
export function machineOutcome(transport: Transport, token: string): Promise<string> {
  return clients(transport, token)
    .machines.checkAuthentication({})
    .then(
      () => "ok",
      async (err: unknown) => (await rejection(Promise.reject(err))).reason ?? "no reason",
    );
}

/** The second after the next one begins, plus a little: later than any clock reading so far. */
export function aSecondAhead(): number {
  return (Math.floor(Date.now() / 1000) + 2) * 1000 + 200;
}

/**
 * The forced interleaving "a change commits between a call's authentication and its token's
 * signature": while `call` runs, the server's next signature of a token for `subject` first
 * runs `first` to its end (which commits the change, and may move a pinned clock on), then
 * signs. `ran`: whether the hook ran (a test whose hook never ran proves nothing).
 */
export async function signingAfter<T>(
  ts: TestServer,
  subject: string,
  first: () => Promise<unknown>,
  call: () => Promise<T>,
): Promise<{ outcome: T; ran: boolean }> {
  const jwt = ts.app.jwt;
  const sign = jwt.issue.bind(jwt);
  let ran = false;
  jwt.issue = async (claims) => {
    if (claims.subject === subject) {
      jwt.issue = sign;
      await first();
      ran = true;
    }
    return sign(claims);
  };
  try {
    return { outcome: await call(), ran };
  } finally {
    jwt.issue = sign;
  }
}

/** The outcome of IssueAccessToken with `credential` over `transport`: the token, or the error. */
export function issueOutcome(transport: Transport, credential: string): Promise<string | ConnectError> {
  return clients(transport, credential)
    .machines.issueAccessToken({})
    .then(
      (r) => r.accessToken,
      (e: unknown) => ConnectError.from(e),
    );
}
