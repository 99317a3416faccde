import { readFileSync } from "node:fs";
import { createSecureServer, type Http2SecureServer, type ServerHttp2Session } from "node:http2";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { create, createFileRegistry, type DescService, setExtension } from "@bufbuild/protobuf";
import {
  FileDescriptorProtoSchema,
  file_google_protobuf_empty,
  MethodOptionsSchema,
} from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport, type Transport } from "@connectrpc/connect";
import {
  connectNodeAdapter,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuthRuleSchema, auth } from "../../gen/tessera/v1/options_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { createTesseraAuthInterceptor } from "../../src/sdk/server/index.js";
import { createTestCerts, type TestCerts } from "../helpers.js";

/**
 * A downstream service whose proto package happens to start with `grpc.` (as a company's
 * `grpc.internal.*` might) declares scopes on its RPCs like any other: the interceptor must
 * enforce them, and refuse its methods without a rule, over gRPC, gRPC-Web and Connect alike.
 * Only the standard health and reflection services are public without a rule of their own.
 */

function options(rule?: { scopes: string[] }) {
  const o = create(MethodOptionsSchema);
  if (rule) setExtension(o, auth, create(AuthRuleSchema, rule));
  return o;
}

const empty = { inputType: ".google.protobuf.Empty", outputType: ".google.protobuf.Empty" };
const registry = createFileRegistry(
  create(FileDescriptorProtoSchema, {
    name: "grpc/internal/v1/admin.proto",
    package: "grpc.internal.v1",
    syntax: "proto3",
    dependency: ["google/protobuf/empty.proto"],
    service: [
      {
        name: "AdminService",
        method: [
          { name: "Purge", ...empty, options: options({ scopes: ["admin:purge"] }) },
          { name: "Debug", ...empty, options: options() },
        ],
      },
    ],
  }),
  (name) => (name === "google/protobuf/empty.proto" ? file_google_protobuf_empty : undefined),
);
const AdminService = registry.getService("grpc.internal.v1.AdminService") as DescService;

/** Tessera, answering one personal access token that holds a scope other than admin:purge. */
const PAT = "tsr_pat_reader_of_other_things";
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

describe("the interceptor on a service whose package starts with grpc.", () => {
  let certs: TestCerts;
  let server: Http2SecureServer;
  let url: string;
  const reached: string[] = [];
  const sessions: ServerHttp2Session[] = [];
  const interceptor = createTesseraAuthInterceptor({
    server: "https://tessera.invalid",
    transport: tessera,
    watch: false,
  });

  beforeAll(async () => {
    certs = await createTestCerts();
    const adapter = connectNodeAdapter({
      routes: (router) =>
        router.service(AdminService, {
          purge: () => {
            reached.push("purge");
            return {};
          },
          debug: () => {
            reached.push("debug");
            return {};
          },
        } as never),
      interceptors: [interceptor],
    });
    server = createSecureServer(
      {
        allowHTTP1: true,
        cert: readFileSync(join(certs.dir, "server.crt")),
        key: readFileSync(join(certs.dir, "server.key")),
      },
      adapter,
    );
    server.on("session", (session) => sessions.push(session));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    url = `https://localhost:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    interceptor.auth.close();
    // The clients' HTTP/2 sessions would keep close() waiting.
    for (const session of sessions) session.destroy();
    await new Promise<void>((resolve) => server?.close(() => resolve()));
  });

  const transports: [string, () => Transport][] = [
    ["gRPC", () => createGrpcTransport({ baseUrl: url, nodeOptions: { ca: certs.ca } })],
    [
      "gRPC-Web",
      () => createGrpcWebTransport({ baseUrl: url, httpVersion: "2", nodeOptions: { ca: certs.ca } }),
    ],
    [
      "Connect",
      () => createConnectTransport({ baseUrl: url, httpVersion: "2", nodeOptions: { ca: certs.ca } }),
    ],
  ];

  async function codeOf(p: Promise<unknown>): Promise<Code | "ok"> {
    return p.then(
      () => "ok" as const,
      (e: unknown) => ConnectError.from(e).code,
    );
  }

  it.each(transports)("enforces the scopes an RPC declares, over %s", async (_name, transport) => {
    const client = createClient(AdminService, transport()) as unknown as Record<
      "purge" | "debug",
      (req: object, o?: { headers?: Record<string, string> }) => Promise<unknown>
    >;
    const bearer = { headers: { authorization: `Bearer ${PAT}` } };
    expect(await codeOf(client.purge({}))).toBe(Code.Unauthenticated);
    expect(await codeOf(client.purge({}, bearer))).toBe(Code.PermissionDenied);
    expect(await codeOf(client.debug({}))).toBe(Code.PermissionDenied);
    expect(await codeOf(client.debug({}, bearer))).toBe(Code.PermissionDenied);
    expect(reached).toEqual([]);
  });
});
