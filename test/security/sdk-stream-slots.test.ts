import { readFileSync } from "node:fs";
import { createSecureServer, type Http2SecureServer, connect as http2Connect } from "node:http2";
import { join } from "node:path";
import { create, createFileRegistry, type DescService, setExtension } from "@bufbuild/protobuf";
import {
  FileDescriptorProtoSchema,
  file_google_protobuf_empty,
  MethodOptionsSchema,
} from "@bufbuild/protobuf/wkt";
import { createClient, type HandlerContext, type Transport } from "@connectrpc/connect";
import { connectNodeAdapter, createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { AuthRuleSchema, auth } from "../../gen/tessera/v1/options_pb.js";
import {
  createTesseraAuth,
  createTesseraAuthInterceptor,
  type TesseraAuth,
  tesseraContextValues,
} from "../../src/sdk/server/index.js";
import { DbProxy } from "../db-proxy.js";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";
import { envelope } from "./fixtures.js";

/**
 * The interceptor holds at most 10,000 streaming calls at once (StreamHolds), so that none
 * runs unwatched. A call counted there while its credential was still being verified let
 * anyone, without any credential Tessera knows, take every slot: a flood of streaming calls
 * with one made-up token (joined into one VerifyCredential) while Tessera answers slowly
 * refused every admitted caller's new stream RATE_LIMITED. Only admitted streams count now.
 */

const SLOTS = 10_000;

function ruleOf(scopes: string[]) {
  const o = create(MethodOptionsSchema);
  setExtension(o, auth, create(AuthRuleSchema, { scopes }));
  return o;
}

const file = create(FileDescriptorProtoSchema, {
  name: "slots/v1/slots.proto",
  package: "slots.v1",
  syntax: "proto3",
  dependency: ["google/protobuf/empty.proto"],
  service: [
    {
      name: "SlotService",
      method: [
        {
          name: "Ticks",
          inputType: ".google.protobuf.Empty",
          outputType: ".google.protobuf.Empty",
          serverStreaming: true,
          options: ruleOf(["ticks:read"]),
        },
      ],
    },
  ],
});
const SlotService = createFileRegistry(file, (name) =>
  name === "google/protobuf/empty.proto" ? file_google_protobuf_empty : undefined,
).getService("slots.v1.SlotService") as DescService;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function* ticks(_req: unknown, ctx: HandlerContext): AsyncGenerator<object> {
  while (!ctx.signal.aborted) {
    yield {};
    await sleep(50);
  }
}

describe("SDK: the held-stream slots of a downstream service", () => {
  let ts: TestServer;
  let verifyProxy: DbProxy;
  let core: TesseraAuth;
  let downstream: Http2SecureServer;
  let url: string;
  let pat: string;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    verifyProxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    const admin = clients(ts.connect(), await adminLogin(ts.connect()));
    const tenantId = (await admin.tenants.createTenant({ name: `slots-${short()}` })).tenant!.id;
    const verifier = await admin.machines.createMachineUser({
      tenantId,
      name: `slots-service-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    pat = (
      await admin.machines.createMachineUser({
        tenantId,
        name: `slots-caller-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["ticks:read"],
      })
    ).token;
    const tessera = (port: number): Transport =>
      createGrpcTransport({ baseUrl: `https://localhost:${port}`, nodeOptions: { ca: ts.certs.ca } });
    // VerifyCredential through a proxy the attacker between the two can slow; the watch direct.
    const toVerify = tessera(verifyProxy.port);
    const toWatch = tessera(ts.server.port);
    core = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier.token,
      verifyTimeoutMs: 30_000,
      transport: { unary: toVerify.unary.bind(toVerify), stream: toWatch.stream.bind(toWatch) },
    });
    expect(await core.ready(10_000)).toBe(true);
    downstream = createSecureServer(
      {
        cert: readFileSync(join(ts.certs.dir, "server.crt")),
        key: readFileSync(join(ts.certs.dir, "server.key")),
      },
      connectNodeAdapter({
        routes: ({ service }) => service(SlotService, { ticks } as never),
        interceptors: [createTesseraAuthInterceptor(core)],
        contextValues: tesseraContextValues,
      }),
    );
    await new Promise<void>((resolve) => downstream.listen(0, "127.0.0.1", resolve));
    url = `https://localhost:${(downstream.address() as { port: number }).port}`;
  }, 120_000);

  afterAll(async () => {
    verifyProxy?.restore();
    core?.close();
    await new Promise<void>((resolve) => {
      if (!downstream) return resolve();
      downstream.close(() => resolve());
      setTimeout(resolve, 1000).unref();
    });
    await verifyProxy?.close();
    await ts?.close();
  });

  /** Reads `n` messages of one Ticks call with `token`, or its error. */
  async function tick(token: string, n = 3): Promise<unknown> {
    const client = createClient(
      SlotService,
      createGrpcTransport({ baseUrl: url, nodeOptions: { ca: ts.certs.ca } }),
    ) as unknown as {
      ticks(req: object, o: { headers: Record<string, string>; signal: AbortSignal }): AsyncIterable<unknown>;
    };
    const stop = new AbortController();
    let got = 0;
    try {
      for await (const _ of client.ticks(
        {},
        { headers: { authorization: `Bearer ${token}` }, signal: stop.signal },
      ))
        if (++got >= n) break;
      return got;
    } catch (err) {
      return err;
    } finally {
      stop.abort();
    }
  }

  it("are not taken by calls whose credential is still being verified: an admitted caller's stream still runs", async () => {
    // Admitted once: its answer is cached while the revocation stream is up.
    expect(await tick(pat)).toBe(3);
    // Tessera answers slowly (the proxy holds every byte), and a caller with no credential
    // Tessera knows opens streaming calls past the slots, all with one made-up token.
    verifyProxy.freeze();
    const session = http2Connect(url, { ca: ts.certs.ca, peerMaxConcurrentStreams: SLOTS * 2 });
    const body = envelope(0, new Uint8Array(0));
    const flood = Array.from({ length: SLOTS + 10 }, () => {
      const req = session.request({
        ":method": "POST",
        ":path": "/slots.v1.SlotService/Ticks",
        "content-type": "application/grpc",
        te: "trailers",
        authorization: "Bearer tsr_pat_madeupmadeupmadeupmadeupmadeup",
      });
      req.on("error", () => {});
      req.end(body);
      return req;
    });
    try {
      await expect
        .poll(() => core.stats().streams, { timeout: 30_000, interval: 100 })
        .toBeGreaterThanOrEqual(SLOTS);
      // The admitted caller's credential needs no answer from Tessera: its stream runs.
      expect(await tick(pat)).toBe(3);
    } finally {
      for (const req of flood) req.close();
      session.close();
      verifyProxy.restore();
    }
    await expect.poll(() => core.stats().streams, { timeout: 30_000, interval: 100 }).toBe(0);
  }, 120_000);
});
