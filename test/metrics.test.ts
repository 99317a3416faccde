import { readFileSync } from "node:fs";
import { Writable } from "node:stream";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { Agent, fetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ServerReflection } from "../gen/grpc/reflection/v1/reflection_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { type App, createApp } from "../src/app.js";
import { loadConfig } from "../src/config.js";
import { type MetricsServer, startMetricsServer } from "../src/metrics.js";
import { startServer, type TesseraServer } from "../src/server.js";
import {
  ADMIN_PASSWORD,
  createTestCerts,
  DATABASES,
  dropSchema,
  type TestCerts,
  testConfig,
  withHeaders,
} from "./helpers.js";
import { SECRET_PATTERNS, scannedSink } from "./log-scan-suite.js";

/**
 * GET /metrics (issue 21 item 3) and the access log (item 6), driven through a real server
 * over TLS: counters move after calls, the endpoint is not on the public port, no label
 * holds a credential or a path a client made up, and every call (fast unary path, early
 * refusal, refusal in the pipeline, HTTP/1.1, a stream served by Connect) writes exactly one
 * access line with its fields and no secret.
 */

/** The value of one sample in Prometheus text, 0 when absent. */
function sample(text: string, name: string, labels: Record<string, string>): number {
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const open = line.indexOf("{");
    const labelText = open >= 0 ? line.slice(open + 1, line.lastIndexOf("}")) : "";
    const have = labelText === "" ? [] : labelText.split(/,(?=[a-z_]+=")/);
    if (want.every((w) => have.includes(w)) && have.length === want.length)
      return Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  return 0;
}

describe.each(DATABASES)("metrics and access log on $name", (db) => {
  const lines: string[] = [];
  let app: App;
  let server: TesseraServer;
  let metrics: MetricsServer;
  let certs: TestCerts;
  let url: string;
  let token: string;
  let refreshToken: string;

  beforeAll(async () => {
    const sink = new Writable({
      write(chunk, _encoding, done) {
        lines.push(...String(chunk).split("\n").filter(Boolean));
        done();
      },
    });
    certs = await createTestCerts();
    url = db.url();
    app = await createApp(
      testConfig(url, {
        server: { certDir: certs.dir },
        metrics: { listen: "127.0.0.1:0" },
        // The default access level (info) with the logger at info: what an operator gets.
        log: { level: "info" },
        // A small failure budget, so that a few bad tokens are refused by the limiter.
        rateLimit: { enabled: true, authFailuresPerIpPerMinute: 3 },
      }),
      { logger: pino({ level: "info" }, scannedSink(sink)) },
    );
    server = await startServer(app);
    metrics = await startMetricsServer(app.metrics!, "127.0.0.1:0", app.logger);
    const login = await createClient(UserService, connect()).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    token = login.accessToken;
    refreshToken = login.refreshToken;
  });
  afterAll(async () => {
    await metrics?.close();
    await server?.close(0);
    await app?.close();
    await dropSchema(url);
  });

  const connect = (): Transport =>
    createConnectTransport({ baseUrl: server.url, httpVersion: "2", nodeOptions: { ca: certs.ca } });
  const grpc = (): Transport => createGrpcTransport({ baseUrl: server.url, nodeOptions: { ca: certs.ca } });
  const as = (transport: Transport, headers: Record<string, string>) => withHeaders(transport, headers);
  const scrape = async () => {
    const res = await fetch(metrics.url);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toMatch(/^text\/plain; version=0\.0\.4/);
    return res.text();
  };
  const GCU = { service: "tessera.v1.UserService", method: "GetCurrentUser" };
  /** A JWT-shaped token that no key signed. */
  const forged = `eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4eHh4eHh4eHh4In0.${"A".repeat(43)}`;

  it("counts calls by service, method, protocol and code, with a latency histogram", async () => {
    const before = await scrape();
    const okConnect = { ...GCU, protocol: "connect", code: "ok" };
    const okGrpc = { ...GCU, protocol: "grpc", code: "ok" };
    await createClient(UserService, as(connect(), { authorization: `Bearer ${token}` })).getCurrentUser({});
    await createClient(UserService, as(connect(), { authorization: `Bearer ${token}` })).getCurrentUser({});
    await createClient(UserService, as(grpc(), { authorization: `Bearer ${token}` })).getCurrentUser({});
    const after = await scrape();
    expect(sample(after, "tessera_rpc_requests_total", okConnect)).toBe(
      sample(before, "tessera_rpc_requests_total", okConnect) + 2,
    );
    expect(sample(after, "tessera_rpc_requests_total", okGrpc)).toBe(
      sample(before, "tessera_rpc_requests_total", okGrpc) + 1,
    );
    expect(sample(after, "tessera_rpc_duration_seconds_count", okConnect)).toBe(
      sample(before, "tessera_rpc_duration_seconds_count", okConnect) + 2,
    );
    expect(sample(after, "tessera_rpc_duration_seconds_bucket", { ...okConnect, le: "+Inf" })).toBe(
      sample(after, "tessera_rpc_duration_seconds_count", okConnect),
    );
    expect(sample(after, "tessera_rpc_duration_seconds_sum", okConnect)).toBeGreaterThan(0);
    expect(
      sample(after, "tessera_auth_attempts_total", { credential: "jwt", outcome: "success", reason: "" }),
    ).toBe(
      sample(before, "tessera_auth_attempts_total", { credential: "jwt", outcome: "success", reason: "" }) +
        3,
    );
  });

  it("counts authentication failures by credential kind and reason, and rate-limit refusals by limiter", async () => {
    const before = await scrape();
    const failure = { credential: "jwt", outcome: "failure", reason: "TOKEN_INVALID" };
    const refused = { ...GCU, protocol: "connect", code: "unauthenticated" };
    const limited = { ...GCU, protocol: "connect", code: "resource_exhausted" };
    const codes: Code[] = [];
    // A budget of 3 failures per minute: the 4th and 5th are refused by the limiter.
    for (let i = 0; i < 5; i++) {
      const err = await createClient(UserService, as(connect(), { authorization: `Bearer ${forged}` }))
        .getCurrentUser({})
        .then(
          () => undefined,
          (e: unknown) => ConnectError.from(e),
        );
      codes.push(err?.code ?? (0 as Code));
    }
    expect(codes.slice(0, 3)).toEqual([Code.Unauthenticated, Code.Unauthenticated, Code.Unauthenticated]);
    expect(codes.slice(3)).toEqual([Code.ResourceExhausted, Code.ResourceExhausted]);
    const after = await scrape();
    expect(sample(after, "tessera_auth_attempts_total", failure)).toBe(
      sample(before, "tessera_auth_attempts_total", failure) + 3,
    );
    expect(
      sample(after, "tessera_auth_attempts_total", {
        credential: "jwt",
        outcome: "failure",
        reason: "RATE_LIMITED",
      }),
    ).toBe(
      sample(before, "tessera_auth_attempts_total", {
        credential: "jwt",
        outcome: "failure",
        reason: "RATE_LIMITED",
      }) + 2,
    );
    expect(sample(after, "tessera_rpc_requests_total", refused)).toBe(
      sample(before, "tessera_rpc_requests_total", refused) + 3,
    );
    expect(sample(after, "tessera_rpc_requests_total", limited)).toBe(
      sample(before, "tessera_rpc_requests_total", limited) + 2,
    );
    expect(sample(after, "tessera_rate_limit_refusals_total", { limiter: "authfail" })).toBe(
      sample(before, "tessera_rate_limit_refusals_total", { limiter: "authfail" }) + 2,
    );
  });

  it("reads the pool, cache, audit and process metrics when scraped", async () => {
    const text = await scrape();
    for (const name of [
      "tessera_build_info",
      "tessera_hash_pool_running",
      "tessera_hash_pool_queued",
      "tessera_hash_pool_started_total",
      "tessera_hash_pool_refused_total",
      "tessera_hash_pool_wait_seconds_count",
      "tessera_state_cache_hits_total",
      "tessera_state_cache_misses_total",
      "tessera_state_cache_invalidations_total",
      "tessera_sqlite_raw_writes_joined_total",
      "tessera_audit_buffer_depth",
      "tessera_audit_dropped_total",
      "tessera_watch_streams_open",
      "tessera_watch_events_sent_total",
      "process_cpu_user_seconds_total",
      "nodejs_eventloop_lag_seconds",
    ])
      expect(text, name).toMatch(new RegExp(`^${name}(\\{| )`, "m"));
    // The login of beforeAll hashed a password (PBKDF2 through the pool).
    expect(sample(text, "tessera_hash_pool_started_total", {})).toBeGreaterThan(0);
    expect(sample(text, "tessera_hash_pool_wait_seconds_count", {})).toBeGreaterThan(0);
    expect(sample(text, "tessera_db_pool_connections", { state: "max" })).toBeGreaterThan(0);
    if (db.name === "sqlite") expect(sample(text, "tessera_state_cache_hits_total", {})).toBeGreaterThan(0);
  });

  it("documents every metric it serves in docs/metrics.md", async () => {
    const text = await scrape();
    const doc = readFileSync(new URL("../docs/metrics.md", import.meta.url), "utf8");
    const served = [...text.matchAll(/^# TYPE (tessera_[a-z0-9_]+) /gm)].map((m) => m[1]!);
    expect(served.length).toBeGreaterThan(30);
    // Node's own (process_*, nodejs_*) are documented as one row.
    expect(served.filter((name) => !doc.includes(`\`${name}\``))).toEqual([]);
  });

  it("is not served on the public port", async () => {
    const dispatcher = new Agent({ connect: { ca: certs.ca } });
    try {
      const res = await fetch(`${server.url}/metrics`, { dispatcher });
      expect(res.status).toBe(404);
      expect(await res.text()).not.toContain("tessera_rpc_requests_total");
    } finally {
      await dispatcher.close();
    }
    expect(new URL(metrics.url).port).not.toBe(String(server.port));
    // Off by default? No: on by default, but on loopback only.
    expect(loadConfig({ env: {} }).metrics.listen).toBe("127.0.0.1:9464");
    expect(loadConfig({ env: { TESSERA_METRICS_LISTEN: "off" } }).metrics.listen).toBe("off");
  });

  it("never labels a credential or a path a client made up", async () => {
    const dispatcher = new Agent({ connect: { ca: certs.ca } });
    const secretPath = "/tessera.v1.UserService/tsr_pat_ABCDEFGHIJKLMNOPQRSTUVWX";
    try {
      for (const path of [
        secretPath,
        "/evil.Service/DropTables",
        "/tessera.v1.UserService/GetCurrentUserX",
      ]) {
        const res = await fetch(`${server.url}${path}`, {
          dispatcher,
          method: "POST",
          headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
          body: "{}",
        });
        expect(res.status).toBe(404);
      }
    } finally {
      await dispatcher.close();
    }
    const text = await scrape();
    expect(text).not.toContain("tsr_pat_");
    expect(text).not.toContain("DropTables");
    expect(text).not.toContain("GetCurrentUserX");
    expect(text).not.toContain(token);
    expect(text).not.toContain(forged.slice(0, 30));
    for (const [what, re] of SECRET_PATTERNS) expect(re.test(text), what).toBe(false);
    // Every method label names a served RPC.
    const served = new Set(
      [...app.services.flatMap((s) => s.methods), ...ServerReflection.methods].map((m) => m.name),
    );
    for (const m of text.matchAll(/method="([^"]*)"/g))
      expect(served.has(m[1]!) || m[1] === "unknown", m[1]).toBe(true);
  });

  it("counts and logs requests for paths nothing serves under fixed names, over Connect, gRPC and plain HTTP", async () => {
    // A method of a service this server does not serve, called by real clients.
    const made = {
      ...UserService.method.getCurrentUser,
      name: "DropTablesZq9",
      parent: { ...UserService, typeName: "evil.v1.MadeUpServiceZq9" },
    } as typeof UserService.method.getCurrentUser;
    const rpc = { service: "unknown", method: "unknown", code: "unimplemented" };
    const plain = { endpoint: "GET unknown", status: "404", error: "not_found" };
    const id = (what: string) => `unknown-${what}-${db.name}-${Date.now()}`;
    const before = await scrape();
    const ids: Record<string, string> = {};
    for (const [protocol, transport] of [
      ["connect", connect()],
      ["grpc", grpc()],
    ] as const) {
      ids[protocol] = id(protocol);
      const err = await transport
        .unary(made, undefined, undefined, { "x-request-id": ids[protocol]! }, {})
        .then(
          () => undefined,
          (e: unknown) => ConnectError.from(e),
        );
      expect(err?.code, protocol).toBe(Code.Unimplemented);
    }
    ids.http = id("http");
    const dispatcher = new Agent({ connect: { ca: certs.ca } });
    try {
      const res = await fetch(`${server.url}/admin/made-up-page-Zq9?x=1`, {
        dispatcher,
        headers: { "x-request-id": ids.http },
      });
      expect(res.status).toBe(404);
      await res.text();
    } finally {
      await dispatcher.close();
    }
    const after = await scrape();
    for (const protocol of ["connect", "grpc"])
      expect(sample(after, "tessera_rpc_requests_total", { ...rpc, protocol }), protocol).toBe(
        sample(before, "tessera_rpc_requests_total", { ...rpc, protocol }) + 1,
      );
    expect(sample(after, "tessera_http_requests_total", plain)).toBe(
      sample(before, "tessera_http_requests_total", plain) + 1,
    );
    // The names a client made up are in no label value and no line.
    expect(after).not.toContain("Zq9");
    expect(oneLine(ids.connect!)).toMatchObject({
      method: "unknown",
      protocol: "connect",
      code: "unimplemented",
    });
    expect(oneLine(ids.grpc!)).toMatchObject({ method: "unknown", protocol: "grpc", code: "unimplemented" });
    expect(oneLine(ids.http)).toMatchObject({ method: "GET unknown", protocol: "http", status: 404 });
    for (const line of lines) expect(line).not.toContain("Zq9");
  });

  /** The access lines of one request id. */
  const accessLines = (requestId: string) =>
    lines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((l) => l.msg === "access" && l.requestId === requestId);

  /** Exactly one access line for `requestId`, with the fields every line has; returns it. */
  function oneLine(requestId: string): Record<string, unknown> {
    const found = accessLines(requestId);
    expect(found, requestId).toHaveLength(1);
    const line = found[0]!;
    expect(line.level).toBe(30);
    expect(typeof line.method).toBe("string");
    expect(typeof line.protocol).toBe("string");
    expect(typeof line.code).toBe("string");
    expect(typeof line.durationMs).toBe("number");
    expect(line.ip).toBe("127.0.0.1");
    const text = JSON.stringify(line);
    for (const [what, re] of SECRET_PATTERNS) expect(re.test(text), what).toBe(false);
    expect(text).not.toContain(token);
    expect(text).not.toContain(refreshToken);
    expect(text).not.toContain(forged.slice(0, 30));
    return line;
  }

  it("writes one access line per call, on every path a call ends on, with no credential", async () => {
    const id = (what: string) => `acc-${what}-${db.name}-${Date.now()}`;
    const user = await createClient(
      UserService,
      as(connect(), { authorization: `Bearer ${token}` }),
    ).getCurrentUser({});
    // The fast unary path, HTTP/2: Connect and gRPC.
    const ok = id("ok");
    await createClient(
      UserService,
      as(connect(), { authorization: `Bearer ${token}`, "x-request-id": ok }),
    ).getCurrentUser({});
    expect(oneLine(ok)).toMatchObject({
      method: "tessera.v1.UserService/GetCurrentUser",
      protocol: "connect",
      code: "ok",
      principalKind: "user",
      principalId: user.id,
      authMethod: "jwt",
    });
    const okGrpc = id("ok-grpc");
    await createClient(
      UserService,
      as(grpc(), { authorization: `Bearer ${token}`, "x-request-id": okGrpc }),
    ).getCurrentUser({});
    expect(oneLine(okGrpc)).toMatchObject({ protocol: "grpc", code: "ok", principalId: user.id });
    // HTTP/1.1 (the same handlers, through Node's response object).
    const h1 = id("h1");
    const dispatcher = new Agent({ connect: { ca: certs.ca } });
    try {
      const res = await fetch(`${server.url}/tessera.v1.UserService/GetCurrentUser`, {
        dispatcher,
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${token}`, "x-request-id": h1 },
        body: "{}",
      });
      expect(res.status).toBe(200);
      await res.text();
    } finally {
      await dispatcher.close();
    }
    expect(oneLine(h1)).toMatchObject({ protocol: "connect", code: "ok" });
    // An early refusal (admission, before Connect reads the body), from a fresh address budget:
    // a missing credential spends no failure budget.
    const early = id("early");
    await expect(
      createClient(UserService, as(connect(), { "x-request-id": early })).getCurrentUser({}),
    ).rejects.toMatchObject({ code: Code.Unauthenticated });
    expect(oneLine(early)).toMatchObject({ code: "unauthenticated", reason: "AUTH_REQUIRED" });
    expect(oneLine(early).principalId).toBeUndefined();
    // A refusal thrown inside the pipeline (an audited method).
    const piped = id("piped");
    await expect(
      createClient(TokenService, as(grpc(), { "x-request-id": piped })).createPersonalAccessToken({
        name: "x",
      }),
    ).rejects.toMatchObject({ code: Code.Unauthenticated });
    expect(oneLine(piped)).toMatchObject({
      method: "tessera.v1.TokenService/CreatePersonalAccessToken",
      protocol: "grpc",
      code: "unauthenticated",
      reason: "AUTH_REQUIRED",
    });
    // A Login (the password is in its body, the tokens in its answer, never in the line):
    // refused once an earlier test spent this address's failure budget.
    const login = id("login");
    const outcome = await createClient(UserService, as(connect(), { "x-request-id": login }))
      .login({ username: "admin", password: ADMIN_PASSWORD })
      .catch((e: unknown) => ConnectError.from(e));
    const loginLine = oneLine(login);
    expect(loginLine.method).toBe("tessera.v1.UserService/Login");
    if (outcome instanceof ConnectError) {
      expect(loginLine).toMatchObject({ code: "resource_exhausted", reason: "RATE_LIMITED" });
    } else {
      // Said as the metric says it (tessera_authentications_total{method="password"}), not "basic".
      expect(loginLine).toMatchObject({ code: "ok", principalKind: "user", authMethod: "password" });
      expect(JSON.stringify(loginLine)).not.toContain(outcome.accessToken);
      expect(JSON.stringify(loginLine)).not.toContain(outcome.refreshToken);
    }
    // A streaming call, served by Connect's own handlers.
    const stream = id("stream");
    const reflection = createClient(ServerReflection, as(grpc(), { "x-request-id": stream }));
    async function* one() {
      yield { messageRequest: { case: "listServices" as const, value: "" } };
    }
    for await (const _ of reflection.serverReflectionInfo(one()));
    // The line is written once the stream's end is handed to Node: soon after the client
    // has read it, but no fixed wait is sure to cover that on a loaded machine.
    await expect.poll(() => accessLines(stream).length).toBeGreaterThan(0);
    expect(oneLine(stream)).toMatchObject({
      method: "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
      protocol: "grpc",
      code: "ok",
    });
  });

  it("counts and logs each request to the OAuth 2.0 endpoints, with no client secret or token", async () => {
    const before = await scrape();
    const dispatcher = new Agent({ connect: { ca: certs.ca } });
    const id = (what: string) => `oauth-${what}-${db.name}-${Date.now()}`;
    const form = async (
      path: string,
      fields: Record<string, string>,
      headers: Record<string, string>,
      requestId: string,
      method = "POST",
    ) => {
      const res = await fetch(`${server.url}${path}`, {
        dispatcher,
        method,
        headers: {
          "content-type": "application/x-www-form-urlencoded",
          "x-request-id": requestId,
          ...headers,
        },
        body: new URLSearchParams(fields).toString(),
      });
      const text = await res.text();
      return { status: res.status, json: (text ? JSON.parse(text) : {}) as Record<string, string> };
    };
    const secret = "a client secret never to be logged";
    try {
      const discovery = id("discovery");
      const doc = await fetch(`${server.url}/.well-known/oauth-authorization-server`, {
        dispatcher,
        headers: { "x-request-id": discovery },
      });
      expect(doc.status).toBe(200);
      await doc.text();
      expect(oneLine(discovery)).toMatchObject({
        method: "GET /.well-known/oauth-authorization-server",
        protocol: "http",
        status: 200,
        code: "ok",
      });
      // A refresh grant: the tokens are in the body and the answer, never in the line.
      const refreshed = id("refresh");
      const pair = await form(
        "/oauth2/token",
        { grant_type: "refresh_token", refresh_token: refreshToken },
        {},
        refreshed,
      );
      expect(pair.status).toBe(200);
      const refreshLine = oneLine(refreshed);
      expect(refreshLine).toMatchObject({
        method: "POST /oauth2/token",
        protocol: "http",
        status: 200,
        code: "ok",
      });
      expect(JSON.stringify(refreshLine)).not.toContain(pair.json.access_token!);
      expect(JSON.stringify(refreshLine)).not.toContain(pair.json.refresh_token!);
      // A client secret that is wrong: 401, or 429 once earlier tests spent this address's budget.
      const bad = id("bad-client");
      const refused = await form(
        "/oauth2/token",
        { grant_type: "client_credentials", client_id: "mu_nobody", client_secret: secret },
        {},
        bad,
      );
      const badLine = oneLine(bad);
      expect(badLine).toMatchObject({ method: "POST /oauth2/token", status: refused.status });
      if (refused.status === 401) expect(badLine.code).toBe("invalid_client");
      else
        expect(badLine).toMatchObject({
          status: 429,
          code: "temporarily_unavailable",
          reason: "RATE_LIMITED",
        });
      expect(typeof badLine.reason).toBe("string");
      expect(JSON.stringify(badLine)).not.toContain(secret);
      // Introspection by a user: authenticated, then refused by VerifyCredential's rule.
      const introspect = id("introspect");
      const forbidden = await form(
        "/oauth2/introspect",
        { token: pair.json.access_token! },
        { authorization: `Bearer ${token}` },
        introspect,
      );
      expect(forbidden.status).toBe(403);
      expect(oneLine(introspect)).toMatchObject({
        method: "POST /oauth2/introspect",
        status: 403,
        code: "insufficient_scope",
        reason: "PRINCIPAL_NOT_ALLOWED",
        principalKind: "user",
        authMethod: "jwt",
      });
      // A revocation of nothing: 200, with its caller.
      const revoke = id("revoke");
      const revoked = await form(
        "/oauth2/revoke",
        { token: "not-a-token" },
        { authorization: `Bearer ${token}` },
        revoke,
      );
      expect(revoked.status).toBe(200);
      expect(oneLine(revoke)).toMatchObject({
        method: "POST /oauth2/revoke",
        status: 200,
        code: "ok",
        principalKind: "user",
      });
      // A method a client made up is named OTHER, never as sent.
      const other = id("other");
      expect((await form("/oauth2/token", {}, {}, other, "PUT")).status).toBe(405);
      expect(oneLine(other)).toMatchObject({
        method: "OTHER /oauth2/token",
        status: 405,
        code: "invalid_request",
      });
    } finally {
      await dispatcher.close();
    }
    const after = await scrape();
    const delta = (name: string, labels: Record<string, string>) =>
      sample(after, name, labels) - sample(before, name, labels);
    const okToken = { endpoint: "POST /oauth2/token", status: "200", error: "" };
    expect(delta("tessera_http_requests_total", okToken)).toBe(1);
    expect(delta("tessera_http_request_duration_seconds_count", okToken)).toBe(1);
    expect(
      delta("tessera_http_requests_total", {
        endpoint: "POST /oauth2/introspect",
        status: "403",
        error: "insufficient_scope",
      }),
    ).toBe(1);
    expect(
      delta("tessera_http_requests_total", { endpoint: "POST /oauth2/revoke", status: "200", error: "" }),
    ).toBe(1);
    expect(
      delta("tessera_http_requests_total", {
        endpoint: "GET /.well-known/oauth-authorization-server",
        status: "200",
        error: "",
      }),
    ).toBe(1);
    expect(
      delta("tessera_http_requests_total", {
        endpoint: "OTHER /oauth2/token",
        status: "405",
        error: "invalid_request",
      }),
    ).toBe(1);
    expect(after).not.toContain(secret);
    expect(after).not.toContain(`endpoint="PUT`);
    for (const [what, re] of SECRET_PATTERNS) expect(re.test(after), what).toBe(false);
  });

  it("writes no access line when log.access is off, and at debug when asked", async () => {
    const sinkLines: string[] = [];
    const sink = new Writable({
      write(chunk, _e, done) {
        sinkLines.push(...String(chunk).split("\n").filter(Boolean));
        done();
      },
    });
    for (const access of ["off", "debug"] as const) {
      sinkLines.length = 0;
      const u = db.url();
      const other = await createApp(
        testConfig(u, { server: { certDir: certs.dir }, log: { level: "debug", access } }),
        { logger: pino({ level: "debug" }, scannedSink(sink)) },
      );
      const s = await startServer(other);
      try {
        const t = createConnectTransport({ baseUrl: s.url, httpVersion: "2", nodeOptions: { ca: certs.ca } });
        await expect(createClient(UserService, t).getCurrentUser({})).rejects.toMatchObject({
          code: Code.Unauthenticated,
        });
      } finally {
        await s.close(0);
        await other.close();
        await dropSchema(u);
      }
      const access_ = sinkLines
        .map((l) => JSON.parse(l) as { msg?: string; level?: number })
        .filter((l) => l.msg === "access");
      if (access === "off") expect(access_).toHaveLength(0);
      else expect(access_.map((l) => l.level)).toEqual([20]);
    }
  });
});
