import type { DescService } from "@bufbuild/protobuf";
import { type CallOptions, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditService } from "../../gen/tessera/v1/audit_service_pb.js";
import { MachineAuthType, MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TenantService } from "../../gen/tessera/v1/tenant_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { ADMIN_PASSWORD, clientFor, SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { short } from "../machine-fixtures.js";

/**
 * Answers carrying a secret (a token, a password) say `Cache-Control: no-store`, as the
 * OAuth token endpoint's do (RFC 6749 §5.1): no cache on the way (a proxy, a browser) may
 * keep them. Only those: on every RPC it would be bytes on the hot path for nothing. Over
 * TLS, on every protocol; the "connect" vitest project runs it on server.transport=connect.
 */
const SERVICES: DescService[] = [
  UserService,
  TokenService,
  MachineUserService,
  TenantService,
  AuditService,
  VerificationService,
];

/** Fields of an answer that hold a secret. */
const SECRET_FIELDS = new Set(["token", "key", "password", "access_token", "refresh_token"]);

/** The RPCs whose answer has a secret field: each is called below, and must say no-store. */
const SECRET_RPCS = SERVICES.flatMap((s) =>
  s.methods
    .filter((m) => m.output.fields.some((f) => f.fieldKind === "scalar" && SECRET_FIELDS.has(f.name)))
    .map((m) => `${s.typeName}/${m.name}`),
);

describe("Cache-Control: no-store on answers carrying a secret", () => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
  }, 120_000);
  afterAll(async () => {
    await ts?.close();
  });

  const protocols: [string, () => Transport][] = [
    [
      "Connect JSON",
      () =>
        createConnectTransport({
          baseUrl: ts.server.url,
          httpVersion: "2",
          useBinaryFormat: false,
          nodeOptions: { ca: ts.certs.ca },
        }),
    ],
    [
      "Connect binary",
      () =>
        createConnectTransport({
          baseUrl: ts.server.url,
          httpVersion: "2",
          useBinaryFormat: true,
          nodeOptions: { ca: ts.certs.ca },
        }),
    ],
    ["gRPC", () => ts.grpc()],
    ["gRPC-Web", () => ts.grpcWeb()],
  ];

  it.each(protocols)("over %s", async (_name, transport) => {
    const t = transport();
    /** Each call's Cache-Control, by RPC. */
    const seen: Record<string, string | null> = {};
    const noting = (rpc: string): CallOptions => ({
      onHeader: (h) => {
        seen[rpc] = h.get("cache-control");
      },
    });
    const users = createClient(UserService, t);
    const login = await users.login(
      { username: "admin", password: ADMIN_PASSWORD },
      noting("tessera.v1.UserService/Login"),
    );
    await users.refreshToken(
      { refreshToken: login.refreshToken },
      noting("tessera.v1.UserService/RefreshToken"),
    );
    const root = login.accessToken;
    const tokens = clientFor(TokenService, t, root);
    await tokens.createPersonalAccessToken(
      { name: `pat-${short()}`, scopes: [] },
      noting("tessera.v1.TokenService/CreatePersonalAccessToken"),
    );
    await tokens.createApiKey(
      { name: `key-${short()}`, scopes: [] },
      noting("tessera.v1.TokenService/CreateApiKey"),
    );
    const machines = clientFor(MachineUserService, t, root);
    const mu = await machines.createMachineUser(
      { name: `mu-${short()}`, authType: MachineAuthType.BEARER, scopes: [] },
      noting("tessera.v1.MachineUserService/CreateMachineUser"),
    );
    const rotated = await machines.rotateMachineUserCredentials(
      { id: mu.machineUser!.id },
      noting("tessera.v1.MachineUserService/RotateMachineUserCredentials"),
    );
    await clientFor(MachineUserService, t, rotated.token).issueAccessToken(
      {},
      noting("tessera.v1.MachineUserService/IssueAccessToken"),
    );
    // An answer without a secret: none.
    await clientFor(UserService, t, root).getCurrentUser({}, noting("GetCurrentUser"));
    // Every RPC with a secret in its answer was called (a new one needs a call here).
    expect(seen).toEqual({
      ...Object.fromEntries(SECRET_RPCS.map((rpc) => [rpc, "no-store"])),
      GetCurrentUser: null,
    });
  });
});
