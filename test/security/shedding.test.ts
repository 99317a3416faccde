import type http2 from "node:http2";
import { createClient } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { createPasswordShedding } from "../../src/admission/shedding.js";
import type { App } from "../../src/app.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import { Code, rejection } from "../errors-util.js";
import { ADMIN_PASSWORD, DATABASES, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { basic } from "../machine-fixtures.js";
import { captureLogs, freshIps, LIMITS_ON } from "./fixtures.js";

const LOGIN = `/${UserService.typeName}/${UserService.method.login.name}`;

/** Occupy the process's hash pool (one slot, no queue in this file) until the returned function is called. */
function holdPool(): () => Promise<void> {
  let release!: () => void;
  const held = hashPool().run(() => new Promise<void>((resolve) => (release = resolve)));
  return async () => {
    release();
    await held;
  };
}

/** A Login path's raw body no parser accepts: an answer other than 400 was given before it was read. */
const UNPARSABLE = Buffer.from("{not json");

/** A raw HTTP/2 POST; the body is sent whole, the answer collected. */
function rawPost(ts: TestServer, path: string, headers: Record<string, string>, body: Uint8Array) {
  return new Promise<{ status: number; headers: http2.IncomingHttpHeaders; body: string }>(
    (resolve, reject) => {
      const session = ts.session();
      session.on("error", reject);
      const stream = session.request({ ":method": "POST", ":path": path, ...headers });
      let status = 0;
      let h: http2.IncomingHttpHeaders = {};
      const chunks: Buffer[] = [];
      stream.on("response", (r) => {
        status = Number(r[":status"]);
        h = r;
      });
      stream.on("data", (c: Buffer) => chunks.push(c));
      stream.on("end", () => {
        session.close();
        resolve({ status, headers: h, body: Buffer.concat(chunks).toString("utf8") });
      });
      stream.on("error", reject);
      stream.end(body);
    },
  );
}

describe.each(DATABASES)("password checks while the hash pool is full, over a real server on $name", (db) => {
  let ts: TestServer;
  let app: App;
  const logs = captureLogs();
  let userToken: string;

  beforeAll(async () => {
    ts = await startTestServer(
      db,
      {
        auth: { hashConcurrency: 1, hashQueue: 0 },
        metrics: { listen: "127.0.0.1:0" },
        log: { access: "info" },
      },
      undefined,
      { logger: logs.logger },
    );
    app = ts.app;
    const anon = createClient(UserService, connect());
    const admin = await anon.login({ username: "admin", password: ADMIN_PASSWORD });
    await createClient(
      UserService,
      withHeaders(connect(), { authorization: `Bearer ${admin.accessToken}` }),
    ).createUser({ username: "shed-user", password: "the user's own password" });
    userToken = (await anon.login({ username: "shed-user", password: "the user's own password" }))
      .accessToken;
  });
  afterAll(async () => {
    await ts?.close();
  });

  let release: (() => Promise<void>) | undefined;
  afterEach(async () => {
    await release?.();
    release = undefined;
  });

  const connect = () => ts.connect();

  it("answers Login Unavailable with Retry-After before reading its body, on Connect, gRPC and gRPC-Web", async () => {
    release = holdPool();
    // A body no parser accepts: answered 503, not 400, so it was never read.
    const raw = await rawPost(ts, LOGIN, { "content-type": "application/json" }, Buffer.from("{not json"));
    expect(raw.status).toBe(503);
    expect(raw.headers["retry-after"]).toBe("1");
    const body = JSON.parse(raw.body) as { code: string; reason: string; request_id: string };
    expect(body.code).toBe("unavailable");
    expect(body.reason).toBe("UNAVAILABLE");
    expect(body.request_id).toBe(raw.headers["x-request-id"]);

    for (const transport of [ts.connect(), ts.grpc(), ts.grpcWeb()]) {
      const r = await rejection(
        createClient(UserService, transport).login({ username: "admin", password: ADMIN_PASSWORD }),
      );
      expect(r.code).toBe(Code.Unavailable);
      expect(r.reason).toBe("UNAVAILABLE");
      expect(r.error.metadata.get("retry-after")).toBe("1");
    }
  });

  it("answers ChangePassword so too, and serves a call that checks no password", async () => {
    release = holdPool();
    const asUser = createClient(
      UserService,
      withHeaders(connect(), { authorization: `Bearer ${userToken}` }),
    );
    const r = await rejection(
      asUser.changePassword({
        currentPassword: "the user's own password",
        newPassword: "a new password here",
      }),
    );
    expect(r.code).toBe(Code.Unavailable);
    expect(r.error.metadata.get("retry-after")).toBe("1");
    // Before its body too: a malformed one is not what it is answered for.
    const raw = await rawPost(
      ts,
      `/${UserService.typeName}/${UserService.method.changePassword.name}`,
      { "content-type": "application/json", authorization: `Bearer ${userToken}` },
      Buffer.from("{not json"),
    );
    expect(raw.status).toBe(503);
    expect((await asUser.getCurrentUser({})).username).toBe("shed-user");
  });

  it("writes no audit record nor access line per shed call: counts them by method and logs them in one line", async () => {
    app.shedding.flush();
    await app.audit.flush();
    const audited = async () =>
      (
        await app.sql.all<{ n: number | string }>("select count(*) as n from audit_events where action = ?", [
          `${UserService.typeName}/Login`,
        ])
      ).map((r) => Number(r.n))[0]!;
    const auditBefore = await audited();
    const shedBefore = shedCount(await app.metrics!.scrape());
    const linesBefore = logs.lines.length;

    release = holdPool();
    const anon = createClient(UserService, connect());
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        rejection(anon.login({ username: `flood-${i}`, password: "guess" })),
      ),
    );
    for (const r of results) expect(r.code).toBe(Code.Unavailable);
    await app.audit.flush();
    expect(await audited()).toBe(auditBefore);
    const scraped = await app.metrics!.scrape();
    expect(shedCount(scraped) - shedBefore).toBe(20);
    // Still counted with every call, as unavailable.
    expect(scraped).toMatch(
      /tessera_rpc_requests_total\{service="tessera\.v1\.UserService",method="Login",protocol="connect",code="unavailable"\} \d+/,
    );
    const during = logs.lines.slice(linesBefore);
    expect(during.filter((l) => l.msg === "access")).toEqual([]);
    app.shedding.flush();
    const aggregated = logs.lines.slice(linesBefore).filter((l) => l.shed !== undefined);
    expect(aggregated).toHaveLength(1);
    expect(aggregated[0]).toMatchObject({
      level: 40,
      shed: 20,
      byMethod: { [`${UserService.typeName}/Login`]: 20 },
    });
    // Nothing shed since: no line.
    app.shedding.flush();
    expect(logs.lines.slice(linesBefore).filter((l) => l.shed !== undefined)).toHaveLength(1);
  });

  it("checks passwords again once the pool has room", async () => {
    const r = await rejection(
      createClient(UserService, connect()).login({ username: "admin", password: "wrong" }),
    );
    expect(r.reason).toBe("CREDENTIALS_INVALID");
    const lines = logs.lines.length;
    await createClient(UserService, connect()).login({ username: "admin", password: ADMIN_PASSWORD });
    expect(logs.lines.slice(lines).some((l) => l.msg === "access")).toBe(true);
  });
});

/** The Login count of `tessera_password_checks_shed_total` in a scrape (0 when absent). */
function shedCount(text: string): number {
  const m =
    /tessera_password_checks_shed_total\{service="tessera\.v1\.UserService",method="Login"\} (\d+)/.exec(
      text,
    );
  return m ? Number(m[1]) : 0;
}

describe("the aggregated line of shed calls", () => {
  // The interval's timer on a fake clock: on the real one, a loaded machine can hold the
  // flush back past any fixed wait.
  afterEach(() => {
    vi.useRealTimers();
  });

  it("is written once per interval, only in intervals that shed", () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "performance"] });
    const lines: Array<{ obj: Record<string, unknown>; msg: string }> = [];
    let room = false;
    const shedding = createPasswordShedding({
      hasRoom: () => room,
      logger: { warn: (obj, msg) => lines.push({ obj: obj as Record<string, unknown>, msg }) },
      intervalMs: 50,
    });
    const state = () => ({ requestId: "r", ip: "10.0.0.1", certificate: null, principal: null });
    expect(shedding.shed(UserService.method.getCurrentUser, state())).toBeUndefined();
    const s = state();
    expect(shedding.shed(UserService.method.login, s)?.code).toBe(Code.Unavailable);
    expect(s).toMatchObject({ aggregated: true, errorInfo: { reason: "UNAVAILABLE", requestId: "r" } });
    shedding.shed(UserService.method.changePassword, state());
    shedding.shed(UserService.method.login, state());
    expect(lines).toHaveLength(0);
    vi.advanceTimersByTime(120);
    expect(lines).toHaveLength(1);
    expect(lines[0]!.obj).toMatchObject({
      shed: 3,
      byMethod: { "tessera.v1.UserService/Login": 2, "tessera.v1.UserService/ChangePassword": 1 },
    });
    room = true;
    expect(shedding.shed(UserService.method.login, state())).toBeUndefined();
    vi.advanceTimersByTime(120);
    expect(lines).toHaveLength(1);
    expect(shedding.counts().get(UserService.method.login)).toBe(2);
  });
});

describe.each(DATABASES)(
  "an address over its budget while the hash pool is full, over a real server on $name",
  (db) => {
    /** Three failures a minute per address: spent after three wrong passwords. */
    const PER_IP = 3;
    let ts: TestServer;
    let app: App;
    const freshIp = freshIps("203.0");
    const logs = captureLogs();

    beforeAll(async () => {
      ts = await startTestServer(
        db,
        {
          auth: { hashConcurrency: 1, hashQueue: 0, passwordIterations: 1000 },
          rateLimit: { ...LIMITS_ON, authFailuresPerIpPerMinute: PER_IP },
          server: { trustedProxies: ["127.0.0.1"] },
          metrics: { listen: "127.0.0.1:0" },
        },
        undefined,
        { logger: logs.logger },
      );
      app = ts.app;
      await createClient(UserService, ts.connect()).login({ username: "admin", password: ADMIN_PASSWORD });
    });
    afterAll(async () => {
      await ts?.close();
    });

    let release: (() => Promise<void>) | undefined;
    afterEach(async () => {
      await release?.();
      release = undefined;
      vi.restoreAllMocks();
    });

    const from = (ip: string, headers: Record<string, string> = {}) =>
      withHeaders(ts.connect(), { "x-forwarded-for": ip, ...headers });

    /** An address that has spent its failed-authentication budget on wrong passwords (the pool had room). */
    async function spentAddress(): Promise<string> {
      const ip = freshIp();
      const anon = createClient(UserService, from(ip));
      for (let i = 0; i < PER_IP; i++)
        expect((await rejection(anon.login({ username: "admin", password: `wrong ${i}` }))).reason).toBe(
          "CREDENTIALS_INVALID",
        );
      return ip;
    }

    it("answers Login from a spent address 429 with its budget's Retry-After, before the body, and 503 to any other", async () => {
      const spent = await spentAddress();
      release = holdPool();
      const raw = await rawPost(
        ts,
        LOGIN,
        { "content-type": "application/json", "x-forwarded-for": spent },
        UNPARSABLE,
      );
      expect(raw.status).toBe(429);
      const body = JSON.parse(raw.body) as { reason: string; request_id: string };
      expect(body.reason).toBe("RATE_LIMITED");
      expect(body.request_id).toBe(raw.headers["x-request-id"]);
      // The budget's window (a minute), not the pool's one second.
      const retryAfter = Number(raw.headers["retry-after"]);
      expect(retryAfter).toBeGreaterThan(1);
      expect(retryAfter).toBeLessThanOrEqual(60);

      for (const transport of [ts.connect(), ts.grpc(), ts.grpcWeb()]) {
        const r = await rejection(
          createClient(UserService, withHeaders(transport, { "x-forwarded-for": spent })).login({
            username: "admin",
            password: ADMIN_PASSWORD,
          }),
        );
        expect(r.code).toBe(Code.ResourceExhausted);
        expect(r.reason).toBe("RATE_LIMITED");
      }
      // Another address is shed as before.
      const other = await rejection(
        createClient(UserService, from(freshIp())).login({ username: "admin", password: ADMIN_PASSWORD }),
      );
      expect(other.code).toBe(Code.Unavailable);
      expect(other.error.metadata.get("retry-after")).toBe("1");
      // Counted as the limiter's refusals, and in the aggregated line, not as shed calls.
      const scraped = await app.metrics!.scrape();
      expect(scraped).toMatch(/tessera_rate_limit_refusals_total\{limiter="authfail"\} [1-9]/);
      const lines = logs.lines.length;
      app.shedding.flush();
      expect(logs.lines.slice(lines).find((l) => l.shed !== undefined)).toMatchObject({
        shed: 1,
        rateLimited: 4,
      });
    });

    it("refuses HTTP Basic while the pool is full before reserving any budget", async () => {
      const reserve = vi.spyOn(app.limits!.passwords, "reserve");
      release = holdPool();
      const users = createClient(UserService, from(freshIp(), basic("admin", "a wrong guess")));
      const r = await rejection(users.getCurrentUser({}));
      expect(r.code).toBe(Code.Unavailable);
      expect(r.error.metadata.get("retry-after")).toBe("1");
      expect(reserve).not.toHaveBeenCalled();
      await release();
      release = undefined;
      // With room again, the guess reserves its budget and is checked.
      const checked = await rejection(users.getCurrentUser({}));
      expect(checked.reason).not.toBe("UNAVAILABLE");
      expect(reserve).toHaveBeenCalledTimes(1);
    });

    it("answers HTTP Basic from a spent address 429 while the pool is full, without reserving", async () => {
      const spent = await spentAddress();
      const reserve = vi.spyOn(app.limits!.passwords, "reserve");
      release = holdPool();
      const r = await rejection(
        createClient(UserService, from(spent, basic("admin", "another wrong guess"))).getCurrentUser({}),
      );
      expect(r.code).toBe(Code.ResourceExhausted);
      expect(r.reason).toBe("RATE_LIMITED");
      expect(Number(r.error.metadata.get("retry-after"))).toBeGreaterThan(1);
      expect(reserve).not.toHaveBeenCalled();
    });
  },
);
