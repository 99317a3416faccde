import { type CallOptions, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterEach, beforeAll, describe, afterAll as done, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { captureLogs } from "./fixtures.js";

/**
 * The last resort: whatever fails unexpectedly, inside the pipeline (a handler, a stream) or
 * outside it (admission's hooks: `admit` before the body, `callError` after Connect failed a
 * call itself), is answered Internal with the ErrorInfo every other error carries (reason
 * INTERNAL, domain tessera.dev, the request id, the same as the X-Request-Id header and the
 * access log's), with the generic message only, and is logged once at error level with its
 * request id. Before, a fault of admission's hooks answered a bare Internal without ErrorInfo
 * (admit), or a bodiless 500 (callError, fast transport), or nothing at all with the
 * exception's text on the console (callError, server.transport=connect). Over TLS, every
 * protocol, both transports (the `unit` project runs the fast one, `connect` the stock one).
 */

/** server.readMaxBytes: a message over it is refused by Connect itself, before the interceptors. */
const READ_MAX_BYTES = 4096;
const SECRET = "s3cr3t-in-the-exception";
const fault = () => new Error(`a bug holding ${SECRET}`);

describe("the last-resort Internal", () => {
  let ts: TestServer;
  const logs = captureLogs("info");
  const undo: Array<() => void> = [];

  beforeAll(async () => {
    ts = await startTestServer(
      SQLITE,
      { log: { access: "info" }, server: { readMaxBytes: READ_MAX_BYTES } },
      undefined,
      { logger: logs.logger },
    );
  });
  done(async () => {
    await ts?.close();
  });
  afterEach(() => {
    for (const u of undo.splice(0)) u();
  });

  /** Replace `obj[key]` with `value` until the test ends. */
  function patch<T extends object, K extends keyof T>(obj: T, key: K, value: T[K]): void {
    const before = obj[key];
    obj[key] = value;
    undo.push(() => {
      obj[key] = before;
    });
  }

  const transports: Record<string, () => Transport> = {
    "Connect JSON": () => ts.connect(),
    "Connect binary": () =>
      createConnectTransport({
        baseUrl: ts.server.url,
        httpVersion: "2",
        useBinaryFormat: true,
        nodeOptions: { ca: ts.certs.ca },
      }),
    "Connect JSON over HTTP/1.1": () =>
      createConnectTransport({
        baseUrl: ts.server.url,
        httpVersion: "1.1",
        nodeOptions: { ca: ts.certs.ca },
      }),
    gRPC: () => ts.grpc(),
    "gRPC-Web": () => ts.grpcWeb(),
  };

  /** The failure of `call`, made with `options` (a request id of our own among its headers). */
  async function failure(call: (options: CallOptions) => Promise<unknown>, requestId: string, extra = {}) {
    let header: Headers | undefined;
    try {
      await call({ headers: { "x-request-id": requestId, ...extra }, onHeader: (h) => (header = h) });
    } catch (e) {
      return { error: ConnectError.from(e), header };
    }
    throw new Error("the call succeeded");
  }

  /** What every last-resort answer must be, and be logged as. */
  async function expectInternal(
    got: { error: ConnectError; header: Headers | undefined },
    requestId: string,
  ): Promise<void> {
    const { error, header } = got;
    expect(error.code).toBe(13);
    expect(error.rawMessage).toBe("internal error");
    expect(JSON.stringify(error)).not.toContain(SECRET);
    const infos = error.findDetails(ErrorInfoSchema);
    expect(infos.map((i) => ({ reason: i.reason, domain: i.domain, metadata: i.metadata }))).toEqual([
      { reason: "INTERNAL", domain: "tessera.dev", metadata: { request_id: requestId } },
    ]);
    expect(header?.get("x-request-id") ?? error.metadata.get("x-request-id")).toBe(requestId);
    await expect
      .poll(() => logs.lines.find((l) => l.msg === "access" && l.requestId === requestId))
      .toMatchObject({ reason: "INTERNAL" });
    const errors = logs.lines.filter((l) => l.requestId === requestId && (l.level as number) >= 50);
    expect(errors).toHaveLength(1);
  }

  for (const [name, transport] of Object.entries(transports)) {
    const tag = name.replace(/\W+/g, "-");

    it(`answers a fault of admit (before the body) with ErrorInfo INTERNAL and the request id (${name})`, async () => {
      patch(ts.app.authenticator, "knownRefusal", () => {
        throw fault();
      });
      const requestId = `admit-${tag}`;
      const users = createClient(UserService, transport());
      const got = await failure(
        (o) =>
          users.getCurrentUser({}, { ...o, headers: { ...o.headers, authorization: "Bearer abcdefabcdef" } }),
        requestId,
      );
      await expectInternal(got, requestId);
    });

    it(`answers a fault of admission after Connect failed the call itself with ErrorInfo INTERNAL and the request id (${name})`, async () => {
      patch(ts.app.authenticator, "knownRefusal", () => {
        throw fault();
      });
      const requestId = `call-error-${tag}`;
      const tokens = createClient(TokenService, transport());
      // A message over server.readMaxBytes: Connect refuses the call before any interceptor,
      // and admission then finishes an audited method's authentication (which fails here).
      const got = await failure(
        (o) => tokens.createPersonalAccessToken({ name: "x".repeat(2 * READ_MAX_BYTES) }, o),
        requestId,
        { authorization: "Bearer abcdefabcdef" },
      );
      await expectInternal(got, requestId);
    });

    it(`answers a handler's fault, unary and streaming, with ErrorInfo INTERNAL and the request id (${name})`, async () => {
      patch(ts.app.storage, "ping", () => Promise.reject(fault()));
      const health = createClient(Health, transport());
      await expectInternal(await failure((o) => health.check({}, o), `check-${tag}`), `check-${tag}`);
      const watched = await failure(async (o) => {
        for await (const _ of health.watch({}, o));
      }, `watch-${tag}`);
      await expectInternal(watched, `watch-${tag}`);
    });
  }
});
