import { readFileSync } from "node:fs";
import { createSecureServer, type Http2SecureServer, type ServerHttp2Session } from "node:http2";
import { createServer as createHttpsServer, request, type Server } from "node:https";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { create, createFileRegistry, type DescService, setExtension } from "@bufbuild/protobuf";
import {
  FileDescriptorProtoSchema,
  file_google_protobuf_empty,
  MethodOptionsSchema,
} from "@bufbuild/protobuf/wkt";
import {
  Code,
  ConnectError,
  createClient,
  createContextValues,
  createRouterTransport,
  type Interceptor,
} from "@connectrpc/connect";
import { connectNodeAdapter, createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { AuthRuleSchema, auth } from "../../gen/tessera/v1/options_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import {
  createTesseraAuth,
  createTesseraAuthInterceptor,
  createTesseraAuthMiddleware,
  type DownstreamRule,
  type TesseraAuth,
  type TesseraLogger,
  tesseraPrincipalKey,
} from "../../src/sdk/server/index.js";
import { createTestCerts, type TestCerts } from "../helpers.js";

/**
 * A failure of the SDK outside `authenticate` (the rule, the principal put in the context,
 * the stream's hold, the handler chain the middleware calls from its promise) is not Tessera
 * being unreachable: it is answered Internal (500), never a retryable 503 a client would
 * retry for ever, and it reaches the SDK's logger, once per interval with a count (never a
 * line per call), without the text of what failed (which may quote a credential).
 */

const PAT = "tsr_pat_reader_secret_part";
const tessera = createRouterTransport(({ service }) =>
  service(VerificationService, {
    verifyCredential: (req) =>
      req.credential === PAT
        ? {
            valid: true,
            code: VerificationCode.VALID,
            principalId: "user-1",
            tenantId: "tenant-1",
            scopes: ["things:read"],
            credentialKind: "pat",
            credentialId: "pat-1",
          }
        : { valid: false, code: VerificationCode.NOT_FOUND },
  }),
);

interface Line {
  level: string;
  obj: Record<string, unknown>;
  msg: string;
}

function capture(): { logger: TesseraLogger; lines: Line[] } {
  const lines: Line[] = [];
  return {
    lines,
    logger: {
      warn: (obj, msg) => lines.push({ level: "warn", obj: obj as Record<string, unknown>, msg }),
      error: (obj, msg) => lines.push({ level: "error", obj: obj as Record<string, unknown>, msg }),
      info: (obj, msg) => lines.push({ level: "info", obj: obj as Record<string, unknown>, msg }),
    },
  };
}

/** A core on the fake Tessera, logging to `logger`, with `broken` replacing some of its parts. */
function brokenCore(logger: TesseraLogger, broken: Partial<TesseraAuth>): TesseraAuth {
  const core = createTesseraAuth({
    server: "https://tessera.invalid",
    transport: tessera,
    watch: false,
    logger,
  });
  return Object.assign(Object.create(null), core, broken) as TesseraAuth;
}

const bug = () => {
  // What a bug's message may hold: what it was working on.
  throw new TypeError(`cannot read properties of ${PAT}`);
};

/** The one error line reporting `calls` failures, and no line quoting the credential. */
function expectReported(lines: Line[], calls: number): void {
  expect(JSON.stringify(lines)).not.toContain(PAT);
  expect(JSON.stringify(lines)).not.toContain("secret_part");
  const errors = lines.filter((l) => l.level === "error");
  expect(errors, JSON.stringify(lines)).toHaveLength(1);
  expect(errors[0]!.obj).toMatchObject({ count: calls, lastError: { name: "TypeError" } });
}

function options(rule?: { scopes: string[] }) {
  const o = create(MethodOptionsSchema);
  if (rule) setExtension(o, auth, create(AuthRuleSchema, rule));
  return o;
}
const empty = { inputType: ".google.protobuf.Empty", outputType: ".google.protobuf.Empty" };
const registry = createFileRegistry(
  create(FileDescriptorProtoSchema, {
    name: "things/v1/things.proto",
    package: "things.v1",
    syntax: "proto3",
    dependency: ["google/protobuf/empty.proto"],
    service: [
      {
        name: "ThingService",
        method: [
          { name: "Read", ...empty, options: options({ scopes: ["things:read"] }) },
          { name: "Follow", ...empty, serverStreaming: true, options: options({ scopes: ["things:read"] }) },
        ],
      },
    ],
  }),
  (name) => (name === "google/protobuf/empty.proto" ? file_google_protobuf_empty : undefined),
);
const ThingService = registry.getService("things.v1.ThingService") as DescService;

describe("the interceptor, failing outside authenticate", () => {
  let certs: TestCerts;
  let server: Http2SecureServer;
  let url: string;
  const sessions: ServerHttp2Session[] = [];
  /** The interceptor of the current test (a core broken its own way). */
  let current: Interceptor = (next) => next;
  /** Whether the context refuses the principal (a context of the application's that throws). */
  let contextThrows = false;

  beforeAll(async () => {
    certs = await createTestCerts();
    const adapter = connectNodeAdapter({
      routes: (router) =>
        router.service(ThingService, {
          read: () => ({}),
          async *follow() {
            yield {};
          },
        } as never),
      interceptors: [(next) => (req) => current(next)(req)],
      contextValues: () => {
        const values = createContextValues();
        const set = values.set.bind(values);
        values.set = (key, value) => {
          if (contextThrows && key === tesseraPrincipalKey) bug();
          return set(key, value);
        };
        return values;
      },
    });
    server = createSecureServer(
      { cert: readFileSync(join(certs.dir, "server.crt")), key: readFileSync(join(certs.dir, "server.key")) },
      adapter,
    );
    server.on("session", (session) => sessions.push(session));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    url = `https://localhost:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    for (const session of sessions) session.destroy();
    await new Promise<void>((resolve) => server?.close(() => resolve()));
  });

  async function failures(stream: boolean, calls: number): Promise<ConnectError[]> {
    const client = createClient(
      ThingService,
      createGrpcTransport({ baseUrl: url, nodeOptions: { ca: certs.ca } }),
    ) as unknown as {
      read(req: object, o: object): Promise<unknown>;
      follow(req: object, o: object): AsyncIterable<unknown>;
    };
    const headers = { authorization: `Bearer ${PAT}` };
    const out: ConnectError[] = [];
    for (let i = 0; i < calls; i++) {
      try {
        if (stream) for await (const _ of client.follow({}, { headers }));
        else await client.read({}, { headers });
        throw new Error("the call was admitted");
      } catch (err) {
        out.push(ConnectError.from(err));
      }
    }
    return out;
  }

  it.each<[string, boolean, Partial<TesseraAuth> | "context"]>([
    ["the rule's check (authorize) of a unary call", false, { authorize: bug }],
    ["the synchronous lookup (admitted) of a unary call", false, { admitted: bug }],
    ["the principal put in the context of a unary call", false, "context"],
    ["the hold of a streaming call", true, { holdStream: () => Promise.reject(new TypeError(`bad ${PAT}`)) }],
    ["the principal put in the context of a streaming call", true, "context"],
  ])("answers a failure of %s Internal, reported once in aggregate", async (_name, stream, broken) => {
    const { logger, lines } = capture();
    const core = brokenCore(logger, broken === "context" ? {} : broken);
    contextThrows = broken === "context";
    current = createTesseraAuthInterceptor(core);
    try {
      const errors = await failures(stream, 3);
      for (const err of errors) {
        expect(err.code, err.message).toBe(Code.Internal);
        expect(err.message).not.toContain("secret_part");
        expect(err.findDetails(ErrorInfoSchema)[0]?.reason).toBe("INTERNAL");
        expect(err.metadata.get("retry-after")).toBeNull();
      }
      core.close();
      expectReported(lines, 3);
      expect(core.stats().streams).toBe(0);
    } finally {
      contextThrows = false;
      core.close();
    }
  });
});

describe("the middleware, failing outside authenticate", () => {
  let certs: TestCerts;
  let server: Server;
  let url: string;
  let current: (req: never, res: never) => void = () => undefined;

  beforeAll(async () => {
    certs = await createTestCerts();
    server = createHttpsServer(
      { cert: readFileSync(join(certs.dir, "server.crt")), key: readFileSync(join(certs.dir, "server.key")) },
      (req, res) => current(req as never, res as never),
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    url = `https://localhost:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    await new Promise((resolve) => server?.close(resolve));
  });

  function get(): Promise<{ status: number; body: string; retryAfter: string | undefined }> {
    return new Promise((resolve, reject) => {
      const req = request(
        `${url}/v1/things`,
        { ca: certs.ca, agent: false, headers: { authorization: `Bearer ${PAT}` } },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () =>
            resolve({
              status: res.statusCode ?? 0,
              body: Buffer.concat(chunks).toString(),
              retryAfter: res.headers["retry-after"] as string | undefined,
            }),
          );
        },
      );
      req.on("error", reject);
      req.end();
    });
  }

  it.each<[string, DownstreamRule, () => void]>([
    // A rule from plain JavaScript (a table of routes), its scopes not a list.
    ["a rule of the wrong shape", { scopes: 5 } as unknown as DownstreamRule, () => undefined],
    // node:http, where `next` is the application's handler, run from the middleware's promise.
    ["the handler after it throwing", { scopes: ["things:read"] }, bug],
  ])("answers %s 500 INTERNAL, reported once in aggregate", async (_name, rule, handler) => {
    const { logger, lines } = capture();
    const core = brokenCore(logger, {});
    const middleware = createTesseraAuthMiddleware(core, { rule });
    current = (req, res) => middleware(req, res, handler);
    try {
      for (let i = 0; i < 3; i++) {
        const answer = await get();
        expect(answer.status, answer.body).toBe(500);
        expect(JSON.parse(answer.body)).toMatchObject({ ok: false, reason: "INTERNAL" });
        expect(answer.body).not.toContain("secret_part");
        expect(answer.retryAfter).toBeUndefined();
      }
      core.close();
      expectReported(lines, 3);
    } finally {
      core.close();
    }
  });
});
