import { readFileSync } from "node:fs";
import { createSecureServer, type Http2SecureServer } from "node:http2";
import { join } from "node:path";
import { create, createFileRegistry, type DescService, setExtension } from "@bufbuild/protobuf";
import {
  FileDescriptorProtoSchema,
  file_google_protobuf_empty,
  MethodOptionsSchema,
} from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type HandlerContext, type Transport } from "@connectrpc/connect";
import { connectNodeAdapter, createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { AuthRuleSchema, auth } from "../gen/tessera/v1/options_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import {
  createTesseraAuth,
  createTesseraAuthInterceptor,
  type TesseraAuth,
  TesseraAuthError,
  tesseraContextValues,
} from "../src/sdk/server/index.js";
import { DbProxy } from "./db-proxy.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * A downstream's streaming RPCs behind the SDK's interceptor, against a real Tessera over
 * TLS: a stream admitted once ends with the error a new call would get when its PAT is
 * revoked or its session logged out (another credential's stream running on), at its
 * access token's exp, and is verified again through Tessera when the revocation watch that
 * vouched for it drops (kept while Tessera admits it, ended once Tessera refuses it, ended
 * Unavailable when Tessera cannot answer). The downstream is a tiny service built at run
 * time (no proto of its own), with a server-streaming and a client-streaming method.
 */

function options(scopes: string[]) {
  const o = create(MethodOptionsSchema);
  setExtension(o, auth, create(AuthRuleSchema, { scopes }));
  return o;
}

const file = create(FileDescriptorProtoSchema, {
  name: "ticker/v1/ticker.proto",
  package: "ticker.v1",
  syntax: "proto3",
  dependency: ["google/protobuf/empty.proto"],
  service: [
    {
      name: "TickerService",
      method: [
        {
          name: "Ticks",
          inputType: ".google.protobuf.Empty",
          outputType: ".google.protobuf.Empty",
          serverStreaming: true,
          options: options(["ticks:read"]),
        },
        {
          name: "Upload",
          inputType: ".google.protobuf.Empty",
          outputType: ".google.protobuf.Empty",
          clientStreaming: true,
          options: options(["ticks:read"]),
        },
      ],
    },
  ],
});
const TickerService = createFileRegistry(file, (name) =>
  name === "google/protobuf/empty.proto" ? file_google_protobuf_empty : undefined,
).getService("ticker.v1.TickerService") as DescService;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Why each Ticks handler's signal was aborted, as the handler saw it when it stopped. */
const handlerEnds: unknown[] = [];

/** A tick every 50 ms until the call's signal ends it. */
async function* ticks(_req: unknown, ctx: HandlerContext): AsyncGenerator<object> {
  try {
    while (!ctx.signal.aborted) {
      yield {};
      await sleep(50);
    }
  } finally {
    handlerEnds.push(ctx.signal.reason);
  }
}

/** Reads the client's messages until it stops sending. */
async function upload(req: AsyncIterable<unknown>): Promise<object> {
  for await (const _ of req);
  return {};
}

/** A stream being read: how many messages so far, and how it ended. */
interface Reading {
  count(): number;
  /** Resolves with the error the stream ended with (undefined: ended without one). */
  ended: Promise<ConnectError | undefined>;
  /** Whether it has ended. */
  done(): boolean;
  stop(): void;
}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

describe.each(DATABASES)("streams behind the Tessera interceptor on $name", (db) => {
  let ts: TestServer;
  /** Tessera reached through proxies the test can cut: one for VerifyCredential, one for the watch. */
  let verifyProxy: DbProxy;
  let watchProxy: DbProxy;
  let core: TesseraAuth;
  let downstream: Http2SecureServer;
  let url: string;
  let tenantId: string;

  function tesseraTransport(port: number): Transport {
    return createGrpcTransport({ baseUrl: `https://localhost:${port}`, nodeOptions: { ca: ts.certs.ca } });
  }

  function ticker(grpc: boolean) {
    const nodeOptions = { ca: ts.certs.ca };
    const transport = grpc
      ? createGrpcTransport({ baseUrl: url, nodeOptions })
      : createConnectTransport({ baseUrl: url, httpVersion: "2", nodeOptions });
    return createClient(TickerService, transport) as unknown as {
      ticks(req: object, o: { headers: Record<string, string>; signal: AbortSignal }): AsyncIterable<unknown>;
      upload(
        req: AsyncIterable<object>,
        o: { headers: Record<string, string>; signal: AbortSignal },
      ): Promise<unknown>;
    };
  }

  function settle(p: Promise<unknown>, stop: AbortController): Pick<Reading, "ended" | "done" | "stop"> {
    let finished = false;
    const ended = p.then(
      () => undefined,
      (e: unknown) => (e instanceof ConnectError ? e : ConnectError.from(e)),
    );
    void ended.then(() => {
      finished = true;
    });
    return { ended, done: () => finished, stop: () => stop.abort() };
  }

  /** Open Ticks with `headers` and read it in the background. */
  async function open(headers: Record<string, string>, grpc = false): Promise<Reading> {
    const stop = new AbortController();
    let n = 0;
    const reading = settle(
      (async () => {
        for await (const _ of ticker(grpc).ticks({}, { headers, signal: stop.signal })) n++;
      })(),
      stop,
    );
    const r = { ...reading, count: () => n };
    // Admitted and running: messages arrive.
    await expect.poll(() => n > 2 || r.done(), { timeout: 10_000 }).toBe(true);
    return r;
  }

  /** Open Upload with `headers`, sending a message every 50 ms while it runs. */
  function openUpload(headers: Record<string, string>): Reading {
    const stop = new AbortController();
    let n = 0;
    async function* messages() {
      while (!stop.signal.aborted) {
        n++;
        yield {};
        await sleep(50);
      }
    }
    return {
      ...settle(ticker(false).upload(messages(), { headers, signal: stop.signal }), stop),
      count: () => n,
    };
  }

  async function endedWith(r: Reading, timeout = 10_000) {
    await expect.poll(() => r.done(), { timeout, interval: 50 }).toBe(true);
    const err = await r.ended;
    expect(err).toBeInstanceOf(ConnectError);
    return { code: err!.code, reason: err!.findDetails(ErrorInfoSchema)[0]?.reason };
  }

  /** Whether `r` still runs: it has not ended, and messages still arrive. */
  async function runs(r: Reading) {
    const before = r.count();
    await expect.poll(() => r.count() > before + 2, { timeout: 10_000 }).toBe(true);
    expect(r.done()).toBe(false);
  }

  /** A user with a PAT and an access token (of 8 s), in the tenant. */
  async function user() {
    const plain = ts.connect();
    // Logged in again: the administrator's access token lives 8 s too.
    const admin = clients(plain, await adminLogin(plain));
    const username = `streamer-${short()}`;
    await admin.users.createUser({
      username,
      password: "streamer password long",
      scopes: ["ticks:read"],
      tenantId,
    });
    const login = await createClient(UserService, plain).login({
      username,
      password: "streamer password long",
      tenant: tenantId,
    });
    const tokens = clientFor(TokenService, plain, login.accessToken);
    const pat = await tokens.createPersonalAccessToken({ name: "stream" });
    return {
      login,
      pat: pat.token,
      revokePat: () => tokens.revokePersonalAccessToken({ id: pat.id }),
      logout: () => createClient(UserService, plain).logout({ refreshToken: login.refreshToken }),
    };
  }

  beforeAll(async () => {
    // A heartbeat every second (a silent watch is found down within two); access tokens of
    // 8 s, so that one's exp is reached within a test.
    ts = await startTestServer(db, {
      verification: { watchHeartbeatSeconds: 1 },
      auth: { jwt: { accessTokenTtl: 8 } },
    });
    verifyProxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    watchProxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    const admin = clients(ts.connect(), await adminLogin(ts.connect()));
    tenantId = (await admin.tenants.createTenant({ name: `streams-${short()}` })).tenant!.id;
    const verifier = await admin.machines.createMachineUser({
      tenantId,
      name: `streams-service-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    const toVerify = tesseraTransport(verifyProxy.port);
    const toWatch = tesseraTransport(watchProxy.port);
    core = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier.token,
      clockSkewSeconds: 1,
      verifyTimeoutMs: 1500,
      watchBackoffMs: { min: 50, max: 200 },
      // VerifyCredential (unary) and WatchRevocations (the one stream) on proxies of their own.
      transport: { unary: toVerify.unary.bind(toVerify), stream: toWatch.stream.bind(toWatch) },
    });
    expect(await core.ready(10_000)).toBe(true);
    const adapter = connectNodeAdapter({
      routes: ({ service }) => service(TickerService, { ticks, upload } as never),
      interceptors: [createTesseraAuthInterceptor(core)],
      contextValues: tesseraContextValues,
    });
    downstream = createSecureServer(
      {
        allowHTTP1: true,
        cert: readFileSync(join(ts.certs.dir, "server.crt")),
        key: readFileSync(join(ts.certs.dir, "server.key")),
      },
      adapter,
    );
    await new Promise<void>((resolve) => downstream.listen(0, "127.0.0.1", resolve));
    url = `https://localhost:${(downstream.address() as { port: number }).port}`;
    // Past the watch's start plus the 1 s skew: access tokens issued from now are checked offline.
    await sleep(1100);
  }, 120_000);

  afterAll(async () => {
    core?.close();
    await new Promise<void>((resolve) => {
      if (!downstream) return resolve();
      downstream.close(() => resolve());
      setTimeout(resolve, 1000).unref();
    });
    await verifyProxy?.close();
    await watchProxy?.close();
    await ts?.close();
  });

  it("ends a PAT's stream with Unauthenticated once the PAT is revoked, while another credential's stream runs on", async () => {
    const alice = await user();
    const bob = await user();
    for (const grpc of [false, true]) {
      const revoked = await open(bearer(alice.pat), grpc);
      const other = await open(bearer(bob.pat), grpc);
      if (grpc) {
        // Already revoked in the first round: the stream is refused as it opens.
        expect(await endedWith(revoked)).toMatchObject({
          code: Code.Unauthenticated,
          reason: "TOKEN_REVOKED",
        });
      } else {
        const events = core.stats().watch!.events;
        await alice.revokePat();
        expect(await endedWith(revoked)).toMatchObject({
          code: Code.Unauthenticated,
          reason: "TOKEN_REVOKED",
        });
        expect(core.stats().watch!.events).toBeGreaterThan(events);
        expect(core.stats().streams).toBe(1); // the other one
        // The handler was told, through its own signal, why it must stop.
        await expect
          .poll(() => handlerEnds.some((r) => r instanceof TesseraAuthError && r.reason === "TOKEN_REVOKED"))
          .toBe(true);
      }
      await runs(other);
      other.stop();
      await other.ended;
    }
    // Every stream's hold was released when it ended.
    await expect.poll(() => core.stats().streams).toBe(0);
  });

  it("ends an access token's stream when its session logs out, and a client-streaming call alike", async () => {
    const alice = await user();
    const bob = await user();
    const offline = core.stats().offlineJwts;
    const jwt = await open(bearer(alice.login.accessToken));
    expect(core.stats().offlineJwts).toBeGreaterThan(offline); // admitted offline: only the watch tells
    const sending = openUpload(bearer(alice.login.accessToken));
    const other = await open(bearer(bob.login.accessToken), true);
    await expect.poll(() => sending.count() > 2).toBe(true);
    await alice.logout();
    expect(await endedWith(jwt)).toMatchObject({ code: Code.Unauthenticated, reason: "TOKEN_REVOKED" });
    expect(await endedWith(sending)).toMatchObject({ code: Code.Unauthenticated, reason: "TOKEN_REVOKED" });
    await runs(other);
    other.stop();
    await other.ended;
  });

  it("ends an access token's stream at its exp", async () => {
    const alice = await user();
    const exp = JSON.parse(Buffer.from(alice.login.accessToken.split(".")[1]!, "base64url").toString())
      .exp as number;
    const stream = await open(bearer(alice.login.accessToken));
    const other = await open(bearer(alice.pat));
    expect(await endedWith(stream, 15_000)).toMatchObject({
      code: Code.Unauthenticated,
      reason: "TOKEN_EXPIRED",
    });
    expect(Date.now()).toBeGreaterThanOrEqual(exp * 1000);
    expect(Date.now()).toBeLessThan(exp * 1000 + 3000);
    await runs(other);
    other.stop();
    await other.ended;
  });

  it("verifies a stream again through Tessera when the watch drops: kept while Tessera admits it, ended once it refuses", async () => {
    const alice = await user();
    const stream = await open(bearer(alice.pat));
    const jwt = await open(bearer(alice.login.accessToken));
    const calls = core.stats().verifyCalls;
    watchProxy.cut();
    try {
      await expect.poll(() => core.watching(), { timeout: 5000 }).toBe(false);
      // Nothing vouches for them any more: Tessera is asked for both, and admits both.
      await expect.poll(() => core.stats().verifyCalls, { timeout: 5000 }).toBeGreaterThanOrEqual(calls + 2);
      await runs(stream);
      await runs(jwt);
      // Revoked while the watch cannot tell: the periodic verification finds it.
      await alice.revokePat();
      expect(await endedWith(stream, 15_000)).toMatchObject({
        code: Code.Unauthenticated,
        reason: "TOKEN_REVOKED",
      });
      jwt.stop();
      await jwt.ended;
    } finally {
      watchProxy.restore();
    }
    expect(await core.ready(10_000)).toBe(true);
  });

  it("ends a stream with Unavailable when the watch drops and Tessera cannot answer", async () => {
    const alice = await user();
    const stream = await open(bearer(alice.pat), true);
    verifyProxy.cut();
    watchProxy.cut();
    try {
      expect(await endedWith(stream)).toMatchObject({ code: Code.Unavailable, reason: "UNAVAILABLE" });
    } finally {
      verifyProxy.restore();
      watchProxy.restore();
    }
    expect(await core.ready(10_000)).toBe(true);
    await expect.poll(() => core.stats().streams).toBe(0);
  });
});
