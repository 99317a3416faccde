import { request } from "node:https";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import type { ConfigInput } from "../../src/config.js";
import { clientFor, memoryTransport, POSTGRES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { grpcRefusal, type RawAnswer, sendRawH2 } from "../raw-h2.js";
import { envelope } from "./fixtures.js";

/**
 * Two Authorization headers in one request, sent as an attacker sends them (raw HTTP/2 header
 * lists, HTTP/1.1 header lines) over TLS: Node keeps the first one only, so a proxy in front
 * reading the last (or all) and Tessera disagreed on who was calling. Refused on every way in,
 * whichever of the two is valid, as a repeated X-API-Key is.
 */

const ME = "/tessera.v1.UserService/GetCurrentUser";
const CREATE_PAT = "/tessera.v1.TokenService/CreatePersonalAccessToken";
const WATCH_REVOCATIONS = "/tessera.v1.VerificationService/WatchRevocations";
const GARBAGE = "Bearer tsr_pat_not_a_real_token";
const ONE = "send one Authorization header";

type Pair = readonly [string, string];

/**
 * An HTTP/1.1 request over TLS with `authorization` sent as one header line per value, and
 * `between` sent after the first of them.
 */
function http1(
  ts: TestServer,
  path: string,
  contentType: string,
  authorization: string[],
  body: Buffer | string,
  between: Pair[] = [],
): Promise<{ status: number; headers: Record<string, unknown>; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${ts.server.url}${path}`,
      {
        method: "POST",
        ca: ts.certs.ca,
        agent: false,
        // A raw header list (no Host added to it): one line per value, as sent.
        headers: [
          "host",
          new URL(ts.server.url).host,
          "content-type",
          contentType,
          ...authorization.flatMap((v, i) => ["authorization", v, ...(i === 0 ? between.flat() : [])]),
        ],
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () =>
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }),
        );
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

/** A request over HTTP/2 with exactly these headers after the pseudo-headers. */
function h2(ts: TestServer, path: string, headers: Pair[], body: Buffer | string): Promise<RawAnswer> {
  const { host } = new URL(ts.server.url);
  return sendRawH2(
    ts.server.url,
    ts.certs.ca,
    [[":method", "POST"], [":scheme", "https"], [":path", path], [":authority", host], ...headers],
    body,
  );
}

const auth = (values: string[]): Pair[] => values.map((v) => ["authorization", v] as const);

/** The trailer frame of a gRPC-Web body as its text lines (`name:value`). */
function grpcWebTrailer(body: Buffer): string {
  let at = 0;
  while (at + 5 <= body.length) {
    const flags = body[at]!;
    const length = body.readUInt32BE(at + 1);
    if (flags & 0x80) return body.subarray(at + 5, at + 5 + length).toString("latin1");
    at += 5 + length;
  }
  return "";
}

/**
 * More header lines than Node's HTTP/1.1 parser keeps by default: past its limit it dropped
 * the rest, a second Authorization among them, and served the first.
 */
const FILLERS: Pair[] = Array.from({ length: 1100 }, (_, i) => [`x-filler-${i}`, "1"] as const);

/** The sum of metric `name`'s series carrying `label` (name="value"), in the exposition text. */
function metricSum(text: string, name: string, label: string): number {
  let n = 0;
  for (const line of text.split("\n"))
    if (line.startsWith(`${name}{`) && line.includes(label))
      n += Number(line.slice(line.lastIndexOf(" ") + 1));
  return n;
}

/** tessera_auth_attempts_total's refusals of a malformed credential. */
const malformedRefusals = (text: string) =>
  metricSum(text, "tessera_auth_attempts_total", 'credential="malformed"');

/** The 431 answers in tessera_http_requests_total. */
const tooLarge = (text: string) => metricSum(text, "tessera_http_requests_total", 'status="431"');

const EMPTY_GRPC = envelope(0, new Uint8Array(0));
const FORM = "application/x-www-form-urlencoded";

// Metrics on, for the credential kind a refusal is counted under (nothing listens for them here).
const METRICS = { metrics: { listen: "127.0.0.1:0" } };

describe.each<[string, ConfigInput]>([
  ["fast", METRICS],
  ["connect", { ...METRICS, server: { transport: "connect" } }],
])("two Authorization headers on the %s transport", (_name, config) => {
  let ts: TestServer;
  let admin: string;
  let pat: string;

  beforeAll(async () => {
    ts = await startTestServer(POSTGRES, config);
    admin = await adminLogin(memoryTransport(ts.app));
    pat = (
      await clientFor(TokenService, memoryTransport(ts.app), admin).createPersonalAccessToken({ name: "dup" })
    ).token;
  });
  afterAll(async () => {
    await ts?.close();
  });

  /** Each pair the refused requests send: a valid credential first then garbage, the reverse, and one valid twice. */
  const pairs = () => [
    [`Bearer ${admin}`, GARBAGE],
    [GARBAGE, `Bearer ${pat}`],
    [`Bearer ${pat}`, `Bearer ${pat}`],
  ];

  it("serves one Authorization header over the same raw HTTP/2 client (gRPC and Connect)", async () => {
    const grpc = await h2(
      ts,
      ME,
      [["content-type", "application/grpc"], ["te", "trailers"], ...auth([`Bearer ${pat}`])],
      EMPTY_GRPC,
    );
    expect(grpcRefusal(grpc).code).toBe("0");
    const json = await h2(ts, ME, [["content-type", "application/json"], ...auth([`Bearer ${admin}`])], "{}");
    expect(json.status, json.body.toString()).toBe(200);
    expect(JSON.parse(json.body.toString())).toMatchObject({ username: "admin" });
  });

  it("refuses them over HTTP/2 gRPC: Unauthenticated, AUTH_HEADER_MALFORMED", async () => {
    for (const pair of pairs()) {
      const answer = await h2(
        ts,
        ME,
        [["content-type", "application/grpc"], ["te", "trailers"], ...auth(pair)],
        EMPTY_GRPC,
      );
      expect(answer.status).toBe(200);
      expect(grpcRefusal(answer)).toEqual({ code: "16", reason: "AUTH_HEADER_MALFORMED", message: ONE });
    }
  });

  it("refuses them over HTTP/2 Connect JSON: 401 with the error envelope", async () => {
    for (const pair of pairs()) {
      const answer = await h2(ts, ME, [["content-type", "application/json"], ...auth(pair)], "{}");
      expect(answer.status, answer.body.toString()).toBe(401);
      expect(JSON.parse(answer.body.toString())).toMatchObject({
        ok: false,
        error: "Unauthorized",
        code: "unauthenticated",
        reason: "AUTH_HEADER_MALFORMED",
        message: ONE,
      });
    }
  });

  it("refuses them over HTTP/1.1 Connect JSON and gRPC-Web", async () => {
    for (const pair of pairs()) {
      const json = await http1(ts, ME, "application/json", [...pair], "{}");
      expect(json.status, json.body.toString()).toBe(401);
      expect(JSON.parse(json.body.toString())).toMatchObject({
        ok: false,
        error: "Unauthorized",
        code: "unauthenticated",
        reason: "AUTH_HEADER_MALFORMED",
        message: ONE,
      });
      const web = await http1(ts, ME, "application/grpc-web+proto", [...pair], EMPTY_GRPC);
      expect(web.status).toBe(200);
      expect(grpcWebTrailer(web.body)).toContain("grpc-status: 16");
      expect(grpcWebTrailer(web.body)).toContain(`grpc-message: ${encodeURIComponent(ONE)}`);
    }
  });

  it("counts them as a malformed credential in tessera_auth_attempts_total", async () => {
    const before = malformedRefusals(await ts.app.metrics!.scrape());
    for (const pair of pairs()) {
      expect((await http1(ts, ME, "application/json", [...pair], "{}")).status).toBe(401);
      const grpc = await h2(
        ts,
        ME,
        [["content-type", "application/grpc"], ["te", "trailers"], ...auth(pair)],
        EMPTY_GRPC,
      );
      expect(grpcRefusal(grpc).reason).toBe("AUTH_HEADER_MALFORMED");
    }
    expect(malformedRefusals(await ts.app.metrics!.scrape())).toBe(before + 2 * pairs().length);
  });

  it("answers 431 over HTTP/1.1 to more header lines than the parser keeps, not the first Authorization's call", async () => {
    const before = tooLarge(await ts.app.metrics!.scrape());
    const answer = await http1(ts, ME, "application/json", [`Bearer ${admin}`, GARBAGE], "{}", FILLERS);
    expect(answer.status, answer.body.toString()).toBe(431);
    // Counted, as every answer is.
    expect(tooLarge(await ts.app.metrics!.scrape())).toBe(before + 1);
    // Below the limit, a request with many headers is served.
    const many = await http1(ts, ME, "application/json", [`Bearer ${admin}`], "{}", FILLERS.slice(0, 240));
    expect(many.status, many.body.toString()).toBe(200);
    // Before routing: OAuth is answered by neither transport, and is cut the same.
    const token = await http1(ts, "/oauth2/token", FORM, [GARBAGE], "grant_type=client_credentials", FILLERS);
    expect(token.status, token.body.toString()).toBe(431);
  });

  it("refuses them where admission runs in the pipeline: an audited call, after its body, and a stream", async () => {
    for (const pair of pairs()) {
      // Audited: authenticated once its body is read (the admission interceptor's Headers).
      const audited = await http1(ts, CREATE_PAT, "application/json", [...pair], '{"name":"dup-twice"}');
      expect(audited.status, audited.body.toString()).toBe(401);
      expect(JSON.parse(audited.body.toString())).toMatchObject({
        reason: "AUTH_HEADER_MALFORMED",
        message: ONE,
      });
      const stream = await h2(
        ts,
        WATCH_REVOCATIONS,
        [["content-type", "application/grpc"], ["te", "trailers"], ...auth(pair)],
        EMPTY_GRPC,
      );
      expect(grpcRefusal(stream)).toEqual({ code: "16", reason: "AUTH_HEADER_MALFORMED", message: ONE });
    }
  });
});

describe("two Authorization headers at the OAuth endpoints", () => {
  let ts: TestServer;
  /** A Basic machine user holding auth:verify (introspection's rule), and a bearer token it was issued. */
  let basic: string;
  let machine: string;

  beforeAll(async () => {
    ts = await startTestServer(POSTGRES);
    const mem = memoryTransport(ts.app);
    const root = await adminLogin(mem);
    const tenant = await tenantWithAdmin(mem, root, ["admin:tenants", "admin:machine-users", "auth:verify"]);
    const mu = await clients(mem, tenant.token).machines.createMachineUser({
      name: `mu-${short()}`,
      authType: MachineAuthType.BASIC,
      applicationIds: [],
      scopes: ["auth:verify"],
    });
    basic = `Basic ${Buffer.from(`${mu.username}:${mu.password}`).toString("base64")}`;
    const issued = await http1(ts, "/oauth2/token", FORM, [basic], "grant_type=client_credentials");
    expect(issued.status, issued.body.toString()).toBe(200);
    machine = `Bearer ${(JSON.parse(issued.body.toString()) as { access_token: string }).access_token}`;
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("serves one over the same raw HTTP/2 client (the fixtures hold)", async () => {
    const introspect = await h2(
      ts,
      "/oauth2/introspect",
      [["content-type", FORM], ...auth([machine])],
      "token=x",
    );
    expect(introspect.status, introspect.body.toString()).toBe(200);
    expect(JSON.parse(introspect.body.toString())).toEqual({ active: false });
  });

  it("answers 431 at /oauth2/token over HTTP/1.1 to more header lines than the parser keeps", async () => {
    const answer = await http1(
      ts,
      "/oauth2/token",
      FORM,
      [basic, "Basic Z2FyYmFnZTpnYXJiYWdl"],
      "grant_type=client_credentials",
      FILLERS,
    );
    expect(answer.status, answer.body.toString()).toBe(431);
  });

  it("answers 400 invalid_request at /oauth2/token, /introspect and /revoke, over HTTP/1.1 and HTTP/2", async () => {
    const cases: [string, string, string[]][] = [
      ["/oauth2/token", "grant_type=client_credentials", [basic, "Basic Z2FyYmFnZTpnYXJiYWdl"]],
      ["/oauth2/token", "grant_type=client_credentials", ["Basic Z2FyYmFnZTpnYXJiYWdl", basic]],
      ["/oauth2/token", "grant_type=client_credentials", [basic, basic]],
      ["/oauth2/introspect", "token=x", [machine, GARBAGE]],
      ["/oauth2/introspect", "token=x", [GARBAGE, machine]],
      ["/oauth2/introspect", "token=x", [machine, machine]],
      ["/oauth2/revoke", "token=x", [machine, GARBAGE]],
    ];
    for (const [path, form, pair] of cases) {
      const one = await http1(ts, path, FORM, pair, form);
      const two = await h2(ts, path, [["content-type", FORM], ...auth(pair)], form);
      for (const answer of [one, two]) {
        expect(answer.status, `${path} ${answer.body.toString()}`).toBe(400);
        expect(JSON.parse(answer.body.toString())).toEqual({
          error: "invalid_request",
          error_description: ONE,
        });
      }
    }
  });
});
