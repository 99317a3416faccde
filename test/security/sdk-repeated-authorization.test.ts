import { readFileSync } from "node:fs";
import http2 from "node:http2";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { create, createFileRegistry, type DescService, setExtension } from "@bufbuild/protobuf";
import {
  FileDescriptorProtoSchema,
  file_google_protobuf_empty,
  MethodOptionsSchema,
} from "@bufbuild/protobuf/wkt";
import { createRouterTransport } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuthRuleSchema, auth } from "../../gen/tessera/v1/options_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import {
  createTesseraAuthInterceptor,
  createTesseraAuthMiddleware,
  tesseraContextValues,
} from "../../src/sdk/server/index.js";
import { createTestCerts, type TestCerts } from "../helpers.js";
import { grpcRefusal, sendRawH2 } from "../raw-h2.js";
import { envelope } from "./fixtures.js";

/**
 * The SDK protecting a downstream service, sent two Authorization headers (raw HTTP/2 header
 * lists, HTTP/1.1 header lines, over TLS): Node keeps the first one only, so a proxy in front
 * of the service reading the last and the SDK disagreed on who was calling. The middleware
 * (node:https, node:http2's compatibility API) and the interceptor (connect-node's adapter with
 * tesseraContextValues) refuse them, whichever of the two is valid.
 */

const PAT = "tsr_pat_dup_reader";
const GARBAGE = "Bearer tsr_pat_not_a_real_token";
const ONE = "send one Authorization header";
const READ = "/probe.v1.ProbeService/Read";

const tessera = createRouterTransport(({ service }) =>
  service(VerificationService, {
    verifyCredential(req) {
      if (req.credential !== PAT) return { valid: false, code: VerificationCode.NOT_FOUND };
      return {
        valid: true,
        code: VerificationCode.VALID,
        principalId: "user-7",
        tenantId: "tenant-7",
        scopes: ["probe:read"],
        credentialKind: "pat",
        credentialId: "pat-7",
      };
    },
  }),
);

const methodOptions = create(MethodOptionsSchema);
setExtension(methodOptions, auth, create(AuthRuleSchema, { scopes: ["probe:read"] }));
const registry = createFileRegistry(
  create(FileDescriptorProtoSchema, {
    name: "probe/v1/probe.proto",
    package: "probe.v1",
    syntax: "proto3",
    dependency: ["google/protobuf/empty.proto"],
    service: [
      {
        name: "ProbeService",
        method: [
          {
            name: "Read",
            inputType: ".google.protobuf.Empty",
            outputType: ".google.protobuf.Empty",
            options: methodOptions,
          },
        ],
      },
    ],
  }),
  (name) => (name === "google/protobuf/empty.proto" ? file_google_protobuf_empty : undefined),
);
const ProbeService = registry.getService("probe.v1.ProbeService") as DescService;

/** Each pair the refused requests send: the valid credential first then garbage, the reverse, and it twice. */
const PAIRS = [
  [`Bearer ${PAT}`, GARBAGE],
  [GARBAGE, `Bearer ${PAT}`],
  [`Bearer ${PAT}`, `Bearer ${PAT}`],
];

describe("the SDK sent two Authorization headers", () => {
  let certs: TestCerts;
  const servers: { close(cb: () => void): unknown }[] = [];
  const options = { server: "https://tessera.invalid", transport: tessera, watch: false } as const;
  const middleware = createTesseraAuthMiddleware(options, { rule: { scopes: ["probe:read"] } });
  const interceptor = createTesseraAuthInterceptor(options);
  let http1Url: string;
  let middlewareH2Url: string;
  let interceptorUrl: string;

  const reached = (_req: unknown, res: { end(body: string): void }) => () => res.end('{"reached":true}');

  beforeAll(async () => {
    certs = await createTestCerts();
    const tlsFiles = {
      cert: readFileSync(join(certs.dir, "server.crt")),
      key: readFileSync(join(certs.dir, "server.key")),
    };
    const listen = async (server: https.Server | http2.Http2SecureServer) => {
      servers.push(server);
      await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
      return `https://localhost:${(server.address() as AddressInfo).port}`;
    };
    http1Url = await listen(
      https.createServer(tlsFiles, (req, res) => middleware(req, res, reached(req, res))),
    );
    middlewareH2Url = await listen(
      http2.createSecureServer(tlsFiles, (req, res) => middleware(req as never, res, reached(req, res))),
    );
    interceptorUrl = await listen(
      http2.createSecureServer(
        tlsFiles,
        connectNodeAdapter({
          routes: (router) => router.service(ProbeService, { read: () => ({}) } as never),
          interceptors: [interceptor],
          contextValues: tesseraContextValues,
        }),
      ),
    );
  });
  afterAll(async () => {
    middleware.auth.close();
    interceptor.auth.close();
    for (const server of servers) await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  /** A POST over HTTP/1.1 with `authorization` sent as one header line per value. */
  function http1(authorization: string[]): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const req = https.request(
        `${http1Url}/v1/things`,
        {
          method: "POST",
          ca: certs.ca,
          agent: false,
          // A raw header list (no Host added to it): one line per value, as sent.
          headers: ["host", new URL(http1Url).host, ...authorization.flatMap((v) => ["authorization", v])],
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () =>
            resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }),
          );
        },
      );
      req.on("error", reject);
      req.end();
    });
  }

  /** A POST over HTTP/2 to `url` with exactly these headers after the pseudo-headers. */
  function h2(url: string, path: string, headers: [string, string][], body: Buffer | string) {
    return sendRawH2(
      url,
      certs.ca,
      [
        [":method", "POST"],
        [":scheme", "https"],
        [":path", path],
        [":authority", new URL(url).host],
        ...headers,
      ],
      body,
    );
  }

  const auth = (values: string[]): [string, string][] => values.map((v) => ["authorization", v]);
  const grpc = (values: string[]) =>
    h2(
      interceptorUrl,
      READ,
      [["content-type", "application/grpc"], ["te", "trailers"], ...auth(values)],
      envelope(0, new Uint8Array(0)),
    );

  it("admits one Authorization header (the fixtures hold)", async () => {
    expect(await http1([`Bearer ${PAT}`])).toEqual({ status: 200, body: '{"reached":true}' });
    const viaH2 = await h2(middlewareH2Url, "/v1/things", auth([`Bearer ${PAT}`]), "");
    expect(viaH2.status).toBe(200);
    expect(grpcRefusal(await grpc([`Bearer ${PAT}`])).code).toBe("0");
  });

  it("the middleware refuses them over HTTP/1.1 and HTTP/2: 401 AUTH_HEADER_MALFORMED", async () => {
    for (const pair of PAIRS) {
      const one = await http1(pair);
      const two = await h2(middlewareH2Url, "/v1/things", auth(pair), "");
      for (const answer of [one, { status: two.status, body: two.body.toString() }]) {
        expect(answer.status, answer.body).toBe(401);
        expect(JSON.parse(answer.body)).toEqual({
          ok: false,
          error: "Unauthorized",
          reason: "AUTH_HEADER_MALFORMED",
          message: ONE,
        });
      }
    }
  });

  it("the interceptor refuses them over gRPC and Connect JSON: Unauthenticated AUTH_HEADER_MALFORMED", async () => {
    for (const pair of PAIRS) {
      expect(grpcRefusal(await grpc(pair))).toEqual({
        code: "16",
        reason: "AUTH_HEADER_MALFORMED",
        message: ONE,
      });
      const json = await h2(
        interceptorUrl,
        READ,
        [["content-type", "application/json"], ...auth(pair)],
        "{}",
      );
      expect(json.status, json.body.toString()).toBe(401);
      expect(JSON.parse(json.body.toString())).toMatchObject({ code: "unauthenticated", message: ONE });
    }
  });
});
