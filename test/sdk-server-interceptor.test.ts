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
  createRouterTransport,
  type HandlerContext,
} from "@connectrpc/connect";
import { afterAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { AuthRuleSchema, auth } from "../gen/tessera/v1/options_pb.js";
import { VerificationCode, VerificationService } from "../gen/tessera/v1/verification_service_pb.js";
import {
  createTesseraAuthInterceptor,
  type TesseraPrincipal,
  tesseraPrincipalKey,
} from "../src/sdk/server/index.js";

/**
 * The interceptor on a downstream service built at run time: a method's rule is its own
 * `(tessera.v1.auth)` option, a public method admits anyone, a method without the option
 * is refused whoever calls, and the principal reaches the handler through the context.
 */

function options(rule?: { public?: boolean; scopes?: string[] }) {
  const o = create(MethodOptionsSchema);
  if (rule) setExtension(o, auth, create(AuthRuleSchema, rule));
  return o;
}

const file = create(FileDescriptorProtoSchema, {
  name: "probe/v1/probe.proto",
  package: "probe.v1",
  syntax: "proto3",
  dependency: ["google/protobuf/empty.proto"],
  service: [
    {
      name: "ProbeService",
      method: [
        {
          name: "Open",
          inputType: ".google.protobuf.Empty",
          outputType: ".google.protobuf.Empty",
          options: options(),
        },
        {
          name: "Ping",
          inputType: ".google.protobuf.Empty",
          outputType: ".google.protobuf.Empty",
          options: options({ public: true }),
        },
        {
          name: "Read",
          inputType: ".google.protobuf.Empty",
          outputType: ".google.protobuf.Empty",
          options: options({ scopes: ["probe:read"] }),
        },
      ],
    },
  ],
});
const registry = createFileRegistry(file, (name) =>
  name === "google/protobuf/empty.proto" ? file_google_protobuf_empty : undefined,
);
const ProbeService = registry.getService("probe.v1.ProbeService") as DescService;

const PAT = "tsr_pat_probe_reader";
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

describe("the Tessera interceptor on a downstream service", () => {
  const interceptor = createTesseraAuthInterceptor({
    server: "https://tessera.invalid",
    transport: tessera,
    watch: false,
  });
  const seen: (TesseraPrincipal | undefined)[] = [];
  const handler = (_req: unknown, ctx: HandlerContext) => {
    seen.push(ctx.values.get(tesseraPrincipalKey));
    return {};
  };
  const transport = createRouterTransport(
    ({ service }) => service(ProbeService, { open: handler, ping: handler, read: handler } as never),
    { router: { interceptors: [interceptor] } },
  );
  const client = createClient(ProbeService, transport) as unknown as Record<
    "open" | "ping" | "read",
    (req: object, o?: { headers?: Record<string, string> }) => Promise<unknown>
  >;
  afterAll(() => interceptor.auth.close());

  async function refused(p: Promise<unknown>) {
    const err = (await p.then(
      () => undefined,
      (e: unknown) => e,
    )) as ConnectError;
    expect(err).toBeInstanceOf(ConnectError);
    return { code: err.code, reason: err.findDetails(ErrorInfoSchema)[0]?.reason, metadata: err.metadata };
  }

  it("refuses a method without a (tessera.v1.auth) option, even to a valid credential", async () => {
    const r = await refused(client.open({}, { headers: { authorization: `Bearer ${PAT}` } }));
    expect(r).toMatchObject({ code: Code.PermissionDenied, reason: "ACCESS_DENIED" });
    expect(seen).toEqual([]);
  });

  it("admits anyone to a public method, with no principal in the context", async () => {
    await client.ping({});
    expect(seen.pop()).toBeUndefined();
  });

  it("puts the principal in the handler's context, and refuses without a credential with a challenge", async () => {
    await client.read({}, { headers: { authorization: `Bearer ${PAT}` } });
    expect(seen.pop()).toMatchObject({
      id: "user-7",
      tenantId: "tenant-7",
      credentialKind: "pat",
      credentialId: "pat-7",
    });
    const r = await refused(client.read({}));
    expect(r).toMatchObject({ code: Code.Unauthenticated, reason: "AUTH_REQUIRED" });
    expect(r.metadata.get("www-authenticate")).toBe('Bearer realm="tessera"');
    const bad = await refused(client.read({}, { headers: { authorization: "Bearer tsr_pat_unknown" } }));
    expect(bad).toMatchObject({ code: Code.Unauthenticated, reason: "CREDENTIALS_INVALID" });
  });
});
