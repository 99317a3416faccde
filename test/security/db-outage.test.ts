import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { startServer, type TesseraServer } from "../../src/server.js";
import { CLIENT_TIMEOUT_MARGIN_MS } from "../../src/storage/pg-bounds.js";
import { ADMIN_PASSWORD, clientFor, createTestCerts, DATABASES, type TestCerts } from "../helpers.js";
import { type OutageApp, startOutageApp } from "../outage-helpers.js";

type Phase = "before" | "outage" | "after" | "mixed";

/** One call's outcome as the client saw it. */
interface Outcome {
  op: string;
  protocol: string;
  phase: Phase;
  code: Code | "ok";
  reason: string | undefined;
  retryAfter: string | null;
  requestId: string | undefined;
  audited: boolean;
}

/**
 * The database is taken away from a real server (TLS, every protocol) while clients keep
 * calling it: logins, logouts, token creation, JWT- and token-authenticated reads. No call
 * may be answered Internal (500); what needs the database is Unavailable (503, reason
 * UNAVAILABLE, Retry-After); a credential never seen before is not accepted; once the
 * database is back, calls succeed again and every audited call of the whole run, the
 * outage's included, is in audit_events.
 */
describe.each(DATABASES.map((d) => d.name))("a database outage under load (%s)", (kind) => {
  let env: OutageApp;
  let server: TesseraServer;
  let certs: TestCerts;
  const transports: Record<string, Transport> = {};
  let jwt: string;
  let seenPat: string;
  let freshPat: string;
  const bob = { username: "bob-outage", password: "bob's long password" };

  beforeAll(async () => {
    certs = await createTestCerts();
    env = await startOutageApp(kind, {
      server: { certDir: certs.dir },
      // Room in the hash pool for every password check and new secret this test has in flight
      // at once (a Login per protocol, the fresh token, the HTTP Login, the creations): a Login
      // finding the pool full is shed before its body, by design without an audit record
      // (admission/shedding.ts), which this test would take for a lost one. On a loaded
      // machine hashes are slow enough for the default queue (4) to fill.
      auth: { hashQueue: 32 },
    });
    server = await startServer(env.app);
    const nodeOptions = { ca: certs.ca };
    transports.connect = createConnectTransport({ baseUrl: server.url, httpVersion: "2", nodeOptions });
    transports.grpc = createGrpcTransport({ baseUrl: server.url, nodeOptions });
    transports["grpc-web"] = createGrpcWebTransport({ baseUrl: server.url, httpVersion: "2", nodeOptions });
    const users = clientFor(UserService, transports.connect!);
    jwt = (await users.login({ username: "admin", password: ADMIN_PASSWORD })).accessToken;
    await clientFor(UserService, transports.connect!, jwt).createUser({ ...bob, scopes: [] });
    const tokens = clientFor(TokenService, transports.connect!, jwt);
    seenPat = (await tokens.createPersonalAccessToken({ name: "seen" })).token;
    freshPat = (await tokens.createPersonalAccessToken({ name: "fresh" })).token;
    await clientFor(UserService, transports.connect!, seenPat).getCurrentUser({});
  }, 60_000);
  afterAll(async () => {
    await server?.close(0);
    await env?.close();
  });

  it("answers Unavailable, never Internal, loses no audit event, and recovers", async () => {
    let phase: Phase = "before";
    let running = true;
    const outcomes: Outcome[] = [];

    /** Run one call, keeping its code, reason, Retry-After and request id. */
    async function call(
      op: string,
      protocol: string,
      audited: boolean,
      fn: (opts: object) => Promise<unknown>,
    ) {
      const started = phase;
      // A call is of the outage only if it began and ended in it (one that began before may have written before).
      const at = (): Phase => (started === phase ? started : "mixed");
      let requestId: string | undefined;
      const opts = {
        timeoutMs: 15_000,
        onHeader: (h: Headers) => (requestId = h.get("x-request-id") ?? undefined),
      };
      try {
        const res = await fn(opts);
        outcomes.push({
          op,
          protocol,
          phase: at(),
          code: "ok",
          reason: undefined,
          retryAfter: null,
          requestId,
          audited,
        });
        return res;
      } catch (err) {
        const ce = ConnectError.from(err);
        const info = ce.findDetails(ErrorInfoSchema)[0];
        outcomes.push({
          op,
          protocol,
          phase: at(),
          code: ce.code,
          reason: info?.reason,
          retryAfter: ce.metadata.get("retry-after"),
          requestId: info?.metadata.request_id ?? requestId,
          audited,
        });
        return undefined;
      }
    }

    const loops = Object.entries(transports).flatMap(([protocol, t]) => {
      const anon = clientFor(UserService, t);
      const byJwt = clientFor(UserService, t, jwt);
      const byPat = clientFor(UserService, t, seenPat);
      const tokens = clientFor(TokenService, t, jwt);
      const loop = async (step: () => Promise<unknown>) => {
        while (running) await step();
      };
      return [
        // Reads are cheap: several callers each, so the server is under load when the database goes.
        ...Array.from({ length: 4 }, () => [
          loop(() => call("GetCurrentUser/jwt", protocol, false, (o) => byJwt.getCurrentUser({}, o))),
          loop(() => call("GetCurrentUser/pat", protocol, false, (o) => byPat.getCurrentUser({}, o))),
        ]).flat(),
        loop(async () => {
          const res = (await call("Login", protocol, true, (o) => anon.login(bob, o))) as
            | { refreshToken: string }
            | undefined;
          if (res)
            await call("Logout", protocol, true, (o) => anon.logout({ refreshToken: res.refreshToken }, o));
        }),
        loop(() =>
          call("CreatePersonalAccessToken", protocol, true, (o) =>
            tokens.createPersonalAccessToken({ name: "under load" }, o),
          ),
        ),
      ];
    });

    await sleep(1000);
    phase = "outage";
    await env.cut();
    await sleep(1500);
    // A credential never seen before, while the database is away, and the HTTP face of the refusal.
    const fresh = await call("GetCurrentUser/fresh", "connect", false, (o) =>
      clientFor(UserService, transports.connect!, freshPat).getCurrentUser({}, o),
    );
    const dispatcher = new Agent({ connect: { ca: certs.ca }, allowH2: true });
    const http = await undiciFetch(`${server.url}/tessera.v1.UserService/Login`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(bob),
      dispatcher,
    });
    const body = (await http.json()) as Record<string, unknown>;
    await dispatcher.close();
    await sleep(1500);
    await env.restore();
    phase = "after";
    // Recovery is checked below: every kind of call succeeding again on every protocol. The
    // pool reconnects with backoff, and on a loaded machine a round of calls takes seconds:
    // the loops run until that is seen (or 30 s), not for a fixed time.
    const ops = ["GetCurrentUser/jwt", "GetCurrentUser/pat", "Login", "CreatePersonalAccessToken"];
    const recovered = () =>
      Object.keys(transports).every((protocol) =>
        ops.every((op) =>
          outcomes.some(
            (o) =>
              o.protocol === protocol &&
              o.op === op &&
              o.phase !== "before" &&
              o.phase !== "outage" &&
              o.code === "ok",
          ),
        ),
      );
    await sleep(2500);
    for (const until = Date.now() + 30_000; !recovered() && Date.now() < until; ) await sleep(250);
    running = false;
    await Promise.all(loops);

    // Zero 500s, on every protocol, in every phase.
    const internal = outcomes.filter((o) => o.code === Code.Internal || o.code === Code.Unknown);
    expect(internal).toEqual([]);
    // What failed, failed as a fault to retry (or, on SQLite, nothing else).
    const failed = outcomes.filter((o) => o.code !== "ok");
    for (const o of failed)
      expect(o, JSON.stringify(o)).toMatchObject({
        code: Code.Unavailable,
        reason: "UNAVAILABLE",
        retryAfter: "1",
      });
    const inOutage = outcomes.filter((o) => o.phase === "outage");
    // Every protocol met the outage.
    for (const protocol of Object.keys(transports))
      expect(
        inOutage.some((o) => o.protocol === protocol && o.code === Code.Unavailable),
        protocol,
      ).toBe(true);
    // A login needs the database on both (its session is a write).
    expect(http.status).toBe(503);
    expect(http.headers.get("retry-after")).toBe("1");
    expect(body).toMatchObject({ code: "unavailable", reason: "UNAVAILABLE" });
    if (kind === "postgres") {
      // PostgreSQL gone: nothing that needs the database is accepted, a new credential least of all.
      expect(fresh).toBeUndefined();
      expect(outcomes.find((o) => o.op === "GetCurrentUser/fresh")?.code).toBe(Code.Unavailable);
    } else {
      // A read-only SQLite still reads exactly (revocation included): reads are answered, writes are not.
      expect(inOutage.filter((o) => o.op.startsWith("GetCurrentUser/") && o.code !== "ok")).toEqual([]);
      expect(inOutage.filter((o) => o.op === "CreatePersonalAccessToken" && o.code === "ok")).toEqual([]);
    }
    // Recovered: every kind of call succeeds again on every protocol (one that began in the
    // outage and was answered after it counts).
    for (const protocol of Object.keys(transports))
      for (const op of ops) {
        const after = outcomes.filter((o) => o.protocol === protocol && o.op === op && o.phase !== "before");
        expect(
          after.some((o) => o.phase !== "outage" && o.code === "ok"),
          `${protocol} ${op}: ${JSON.stringify(after.slice(-5))}`,
        ).toBe(true);
      }

    // No audit event lost: every audited call, in every phase, is in audit_events.
    const audited = outcomes.filter((o) => o.audited);
    expect(audited.every((o) => o.requestId)).toBe(true);
    const outageAudited = audited.filter((o) => o.phase === "outage");
    expect(outageAudited.length).toBeGreaterThan(0);
    const deadline = Date.now() + 15_000;
    while (env.app.audit.stats().depth > 0 && Date.now() < deadline) {
      await env.app.audit.flush();
      await sleep(50);
    }
    const ids = audited.map((o) => o.requestId!);
    const found = new Set<string>();
    // Lost, not late: a record made after the buffer looked empty (a call answered under load
    // just before its record was queued) gets until the deadline, flushed each time.
    for (;;) {
      for (let i = 0; i < ids.length; i += 200) {
        const chunk = ids.slice(i, i + 200);
        const rows = await env.app.sql.all<{ request_id: string; reason: string | null }>(
          `select request_id, reason from audit_events where request_id in (${chunk.map(() => "?").join(", ")})`,
          chunk,
        );
        for (const r of rows) found.add(r.request_id);
      }
      if (ids.every((id) => found.has(id)) || Date.now() > deadline) break;
      await env.app.audit.flush();
      await sleep(100);
    }
    // Nothing was shed (see hashQueue above): every audited call had its record to make.
    expect([...env.app.shedding.counts().values()]).toEqual([]);
    expect(ids.filter((id) => !found.has(id))).toEqual([]);
    const stats = env.app.audit.stats();
    expect(stats.dropped).toBe(0);
    expect(stats.failures).toBeGreaterThan(0);
    console.log(
      `${kind}: ${outcomes.length} calls, ${inOutage.length} during the outage, ` +
        `${failed.length} Unavailable, 0 Internal; ${outageAudited.length} audited calls in the outage, ` +
        `${ids.length} audited in all, all in audit_events (${stats.failures} failed writes retried)`,
    );
  }, 90_000);
});

/**
 * A PostgreSQL that stops answering (the proxy holds every byte: a frozen host, a partition
 * that drops packets) rather than refusing or resetting: every call that needs the
 * database is answered Unavailable with Retry-After within the configured statement and
 * connect bounds, on Connect and gRPC, none is answered Internal, and once the database
 * answers again calls succeed.
 */
describe.skipIf(!DATABASES.some((d) => d.name === "postgres"))("a PostgreSQL that stops answering", () => {
  const STATEMENT_MS = 1_000;
  const CONNECT_MS = 1_000;
  // The client gives up 1 s after the server's own bound (CLIENT_TIMEOUT_MARGIN_MS); a call
  // may meet one timed-out statement and one connection attempt, and the machine is busy.
  const BOUND_MS = STATEMENT_MS + CLIENT_TIMEOUT_MARGIN_MS + CONNECT_MS + 3_000;
  let env: OutageApp;
  let server: TesseraServer;
  let certs: TestCerts;
  const transports: Record<string, Transport> = {};
  let pat: string;
  let freshPat: string;
  const bob = { username: "bob-frozen", password: "bob's long password" };

  beforeAll(async () => {
    certs = await createTestCerts();
    env = await startOutageApp("postgres", {
      server: { certDir: certs.dir },
      database: { statementTimeoutMs: STATEMENT_MS, connectTimeoutMs: CONNECT_MS },
    });
    server = await startServer(env.app);
    const nodeOptions = { ca: certs.ca };
    transports.connect = createConnectTransport({ baseUrl: server.url, httpVersion: "2", nodeOptions });
    transports.grpc = createGrpcTransport({ baseUrl: server.url, nodeOptions });
    const jwt = (
      await clientFor(UserService, transports.connect!).login({ username: "admin", password: ADMIN_PASSWORD })
    ).accessToken;
    await clientFor(UserService, transports.connect!, jwt).createUser({ ...bob, scopes: [] });
    const tokens = clientFor(TokenService, transports.connect!, jwt);
    pat = (await tokens.createPersonalAccessToken({ name: "p" })).token;
    freshPat = (await tokens.createPersonalAccessToken({ name: "never used before the freeze" })).token;
  }, 60_000);
  afterAll(async () => {
    await server?.close(0);
    await env?.close();
  });

  it("answers Unavailable with Retry-After within the configured bound, never Internal, and recovers when it answers again", async () => {
    interface Timed {
      op: string;
      protocol: string;
      ms: number;
      code: Code | "ok";
      reason: string | undefined;
      retryAfter: string | null;
    }
    const timed = async (
      op: string,
      protocol: string,
      fn: (o: object) => Promise<unknown>,
    ): Promise<Timed> => {
      const t0 = performance.now();
      try {
        // The client's own deadline is far past the bound: a hang shows as a slow call, not a client timeout.
        await fn({ timeoutMs: 30_000 });
        return { op, protocol, ms: performance.now() - t0, code: "ok", reason: undefined, retryAfter: null };
      } catch (err) {
        const ce = ConnectError.from(err);
        return {
          op,
          protocol,
          ms: performance.now() - t0,
          code: ce.code,
          reason: ce.findDetails(ErrorInfoSchema)[0]?.reason,
          retryAfter: ce.metadata.get("retry-after"),
        };
      }
    };
    // Calls that each need the database: a login (a session row), creating a token (a
    // write), a token never used (its row was never read). Connect and gRPC, several at once.
    const round = (withFresh: boolean) =>
      Promise.all(
        Object.entries(transports).flatMap(([protocol, t]) => {
          const fresh = withFresh
            ? [
                timed("GetCurrentUser/fresh", protocol, (o) =>
                  clientFor(UserService, t, freshPat).getCurrentUser({}, o),
                ),
              ]
            : [];
          return [
            ...fresh,
            timed("Login", protocol, (o) => clientFor(UserService, t).login(bob, o)),
            timed("Login", protocol, (o) => clientFor(UserService, t).login(bob, o)),
            timed("CreatePersonalAccessToken", protocol, (o) =>
              clientFor(TokenService, t, pat).createPersonalAccessToken({ name: "frozen" }, o),
            ),
          ];
        }),
      );
    // The database answers before the freeze: on a loaded machine a call can itself pass the
    // tight bounds this test sets (a new connection's start-up, a slow statement), so rounds
    // are run until one succeeds whole (or 30 s).
    let before = await round(false);
    for (const until = Date.now() + 30_000; before.some((c) => c.code !== "ok") && Date.now() < until; )
      before = await round(false);
    expect(before.filter((c) => c.code !== "ok")).toEqual([]);

    env.freeze!();
    // Two rounds: the first meets pooled connections stuck mid-statement, the second new
    // connections that never finish their start-up (the stuck ones are dropped).
    const frozen = [...(await round(true)), ...(await round(true))];
    await env.restore();

    expect(frozen.filter((c) => c.code === Code.Internal || c.code === Code.Unknown)).toEqual([]);
    for (const c of frozen)
      expect(c, JSON.stringify(c)).toMatchObject({
        code: Code.Unavailable,
        reason: "UNAVAILABLE",
        retryAfter: "1",
      });
    const slowest = Math.max(...frozen.map((c) => c.ms));
    expect(slowest, JSON.stringify(frozen)).toBeLessThan(BOUND_MS);
    for (const protocol of Object.keys(transports))
      expect(frozen.some((c) => c.protocol === protocol)).toBe(true);

    // It answers again: calls succeed within a few seconds.
    const deadline = Date.now() + 20_000;
    let after: Timed[] = [];
    do {
      await sleep(250);
      after = await round(true);
    } while (after.some((c) => c.code !== "ok") && Date.now() < deadline);
    expect(after.filter((c) => c.code !== "ok")).toEqual([]);
    console.log(
      `frozen PostgreSQL: ${frozen.length} calls, all Unavailable, slowest ${Math.round(slowest)} ms ` +
        `(statement bound ${STATEMENT_MS} ms, connect bound ${CONNECT_MS} ms)`,
    );
  }, 90_000);
});
