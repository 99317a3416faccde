import { createServer } from "node:net";
import { ConnectError } from "@connectrpc/connect";
import { findTrailerError, setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { ErrorInfoSchema as LegacyErrorInfoSchema } from "../gen/tessera/v1/error_details_pb.js";
import {
  AlreadyExistsError,
  AuthenticationError,
  ClientConfigError,
  Code,
  CredentialsFileError,
  InvalidArgumentError,
  MessageTooLargeError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitedError,
  TesseraClientError,
  TokenExpiredError,
  toClientError,
  UnavailableError,
  UserAPI,
} from "../src/sdk/index.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

const PROTOCOLS = [{ protocol: "grpc" as const }, { protocol: "connect" as const }];
const UUID = /^[0-9a-f-]{36}$/;

/** The rejection of a promise (fails the test if it resolved). */
async function failure(promise: Promise<unknown>): Promise<TesseraClientError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(TesseraClientError);
    return err as TesseraClientError;
  }
  throw new Error("expected the call to fail, but it succeeded");
}

describe("typed errors from a real server", () => {
  let ts: TestServer;
  let readerToken: string;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    const admin = new UserAPI({ host: "127.0.0.1", port: ts.server.port, certFolder: ts.certs.clientDir });
    await admin.login("admin", ADMIN_PASSWORD);
    await admin.users.createUser({
      username: "reader",
      password: "a long enough password",
      scopes: ["cluster:read"],
    });
    readerToken = (await admin.login("reader", "a long enough password")).accessToken;
    admin.close();
  });
  afterAll(async () => {
    await ts.close();
  });

  describe.each(PROTOCOLS)("over $protocol", ({ protocol }) => {
    const client = (token?: string) =>
      new UserAPI({
        host: "127.0.0.1",
        port: ts.server.port,
        certFolder: ts.certs.clientDir,
        protocol,
        token,
      });

    it("raises AuthenticationError with reason AUTH_REQUIRED and the request id when no credential is sent", async () => {
      const api = client();
      const err = await failure(api.getUser());
      expect(err).toBeInstanceOf(AuthenticationError);
      expect(err).not.toBeInstanceOf(TokenExpiredError);
      expect(err.code).toBe(Code.Unauthenticated);
      expect(err.reason).toBe("AUTH_REQUIRED");
      expect(err.requestId).toMatch(UUID);
      expect(err.metadata.get("www-authenticate")).toBe('Bearer realm="tessera"');
      api.close();
    });

    it("raises AuthenticationError with reason TOKEN_INVALID for a forged token and never repeats it", async () => {
      const forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXRoYXQtaXMtd3Jvbmc";
      const api = client(forged);
      const err = await failure(api.getUser());
      expect(err).toBeInstanceOf(AuthenticationError);
      expect(err.reason).toBe("TOKEN_INVALID");
      expect(err.message).not.toContain(forged);
      expect(JSON.stringify({ ...err, message: err.message, stack: err.stack })).not.toContain(forged);
      api.close();
    });

    it("raises AuthenticationError for a wrong password at login", async () => {
      const api = client();
      const err = await failure(api.login("admin", "not the password at all"));
      expect(err).toBeInstanceOf(AuthenticationError);
      expect(err.reason).toBe("CREDENTIALS_INVALID");
      expect(err.message).not.toContain("not the password at all");
      api.close();
    });

    it("raises PermissionDeniedError naming the required scopes", async () => {
      const api = client(readerToken);
      const err = await failure(api.users.listUsers({}));
      expect(err).toBeInstanceOf(PermissionDeniedError);
      expect(err.code).toBe(Code.PermissionDenied);
      expect(err.reason).toBe("ACCESS_DENIED");
      expect((err as PermissionDeniedError).requiredScopes).toEqual(["admin:users"]);
      expect(err.requestId).toMatch(UUID);
      api.close();
    });

    it("raises NotFoundError for an id that does not exist", async () => {
      const api = client();
      await api.login("admin", ADMIN_PASSWORD);
      const err = await failure(api.users.getUser({ id: "00000000-0000-4000-8000-000000000000" }));
      expect(err).toBeInstanceOf(NotFoundError);
      expect(err.code).toBe(Code.NotFound);
      expect(err.reason).toBe("NOT_FOUND");
      api.close();
    });

    it("raises InvalidArgumentError for a malformed request", async () => {
      const api = client();
      await api.login("admin", ADMIN_PASSWORD);
      const err = await failure(api.users.createUser({ username: "", password: "a long enough password" }));
      expect(err).toBeInstanceOf(InvalidArgumentError);
      expect(err.reason).toBe("INVALID_ARGUMENT");
      api.close();
    });

    it("raises MessageTooLargeError, not RateLimitedError, for a request over the server's size limit", async () => {
      const api = client();
      // Over server.readMaxBytes (64 KiB by default): refused by Connect before any interceptor.
      const err = await failure(api.login("admin", "x".repeat(100 * 1024)));
      expect(err).toBeInstanceOf(MessageTooLargeError);
      expect(err).not.toBeInstanceOf(RateLimitedError);
      expect(err.code).toBe(Code.ResourceExhausted);
      expect(err.reason).toBe("MESSAGE_TOO_LARGE");
      expect(err.requestId).toMatch(UUID);
      api.close();
    });
  });

  it("raises UnavailableError for a port nobody listens on, and isAvailable answers false", async () => {
    const port = await closedPort();
    for (const { protocol } of PROTOCOLS) {
      const api = new UserAPI({
        host: "127.0.0.1",
        port,
        certFolder: ts.certs.clientDir,
        protocol,
        token: readerToken,
      });
      expect(await api.isAvailable({ timeoutMs: 2000 })).toBe(false);
      const err = await failure(api.getUser());
      expect(err).toBeInstanceOf(UnavailableError);
      expect(err.code).toBe(Code.Unavailable);
      expect(err.message).not.toContain(readerToken);
      api.close();
    }
  });
});

describe("RateLimitedError", () => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { rateLimit: { enabled: true, perIpPerMinute: 3 } });
  });
  afterAll(async () => {
    await ts.close();
  });

  it.each(PROTOCOLS)(
    "carries retryAfter from the Retry-After header or trailer over $protocol",
    async ({ protocol }) => {
      const api = new UserAPI({
        host: "127.0.0.1",
        port: ts.server.port,
        certFolder: ts.certs.clientDir,
        protocol,
      });
      let limited: RateLimitedError | undefined;
      for (let i = 0; i < 5 && !limited; i++) {
        const err = await failure(api.users.getCurrentUser({}));
        if (err instanceof RateLimitedError) limited = err;
        else expect(err.reason).toBe("AUTH_REQUIRED");
      }
      expect(limited).toBeInstanceOf(RateLimitedError);
      expect(limited!.code).toBe(Code.ResourceExhausted);
      expect(limited!.reason).toBe("RATE_LIMITED");
      expect(limited!.retryAfter).toBeGreaterThanOrEqual(1);
      expect(limited!.retryAfter).toBeLessThanOrEqual(60);
      expect(limited!.metadata.get("x-ratelimit-limit")).toBe("3");
      api.close();
    },
  );
});

/** A port that was just free (listen on 0, close). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

describe("the error detail the SDK reads", () => {
  /** A ConnectError as a client decodes it from gRPC trailers carrying `details`. */
  function fromTheWire(code: Code, details: ConstructorParameters<typeof ConnectError>[3]): ConnectError {
    const trailer = setTrailerStatus(new Headers(), new ConnectError("refused", code, undefined, details));
    return findTrailerError(trailer)!;
  }

  it("reads google.rpc.ErrorInfo of domain tessera.dev: reason, request id and metadata", () => {
    const err = toClientError(
      fromTheWire(Code.PermissionDenied, [
        {
          desc: ErrorInfoSchema,
          value: {
            reason: "ACCESS_DENIED",
            domain: "tessera.dev",
            metadata: { required_scopes: "admin:users", request_id: "req-1" },
          },
        },
      ]),
    );
    expect(err).toBeInstanceOf(PermissionDeniedError);
    expect([err.reason, err.requestId, err.details]).toEqual([
      "ACCESS_DENIED",
      "req-1",
      { required_scopes: "admin:users" },
    ]);
    expect((err as PermissionDeniedError).requiredScopes).toEqual(["admin:users"]);
  });

  it("still reads the tessera.v1.ErrorInfo an older server sends (for one release)", () => {
    const err = toClientError(
      fromTheWire(Code.Unauthenticated, [
        {
          desc: LegacyErrorInfoSchema,
          value: { reason: "TOKEN_EXPIRED", domain: "tessera", requestId: "old-1", metadata: { a: "b" } },
        },
      ]),
    );
    expect(err).toBeInstanceOf(TokenExpiredError);
    expect([err.reason, err.requestId, err.details]).toEqual(["TOKEN_EXPIRED", "old-1", { a: "b" }]);
  });

  it("ignores an ErrorInfo of another domain (a proxy's): its reasons are not Tessera's", () => {
    const err = toClientError(
      fromTheWire(Code.Unauthenticated, [
        { desc: ErrorInfoSchema, value: { reason: "TOKEN_EXPIRED", domain: "proxy.example.com" } },
      ]),
    );
    expect(err).toBeInstanceOf(AuthenticationError);
    expect(err).not.toBeInstanceOf(TokenExpiredError);
    expect(err.reason).toBeUndefined();
  });
});

describe("the error classes' names", () => {
  it("each class is named as it is spelled, in String(err) and err.name, and the name is not an own key", () => {
    const init = { code: Code.Unknown };
    const errors: [Error, string][] = [
      [new TesseraClientError("m", init), "TesseraClientError"],
      [new AuthenticationError("m", init), "AuthenticationError"],
      [new TokenExpiredError("m", init), "TokenExpiredError"],
      [new PermissionDeniedError("m", init), "PermissionDeniedError"],
      [new NotFoundError("m", init), "NotFoundError"],
      [new InvalidArgumentError("m", init), "InvalidArgumentError"],
      [new AlreadyExistsError("m", init), "AlreadyExistsError"],
      [new RateLimitedError("m", init), "RateLimitedError"],
      [new MessageTooLargeError("m", init), "MessageTooLargeError"],
      [new UnavailableError("m", init), "UnavailableError"],
      [new ClientConfigError("m"), "ClientConfigError"],
      [new CredentialsFileError("m"), "CredentialsFileError"],
    ];
    for (const [err, name] of errors) {
      expect(err.name).toBe(name);
      expect(String(err)).toBe(`${name}: m`);
      expect(Object.keys(err)).not.toContain("name");
    }
  });
});
