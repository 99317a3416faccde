import type { ChildProcess } from "node:child_process";
import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { DbProxy } from "../db-proxy.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestCerts,
  dropSchema,
  startTestServer,
  TEST_MASTER_KEY,
  type TestCerts,
  type TestDatabase,
  type TestServer,
} from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";
import { killAll, serve, stop } from "./processes.js";

/**
 * A WatchRevocations stream served by an instance cut off from PostgreSQL without a reset
 * (packets dropped): the revocations committed through another instance never reach it, so
 * its stream must stop vouching for its cursor as soon as it can no longer tell, and end,
 * so that the client's cache of VerifyCredential answers (which it keeps while the stream
 * is up) is emptied. Before, the stream stayed open and silent until its next heartbeat
 * was due (10 s), and the feed, taking the keepalive's timeout for "every commit was read
 * until now", could even send that heartbeat with a cursor before the missed revocation.
 */

const BARRIER_MS = 400;
const schema = `t_${Date.now().toString(36)}_wcut`;
let proxy: DbProxy;
let certs: TestCerts;
let a: TestServer;
let b: { child: ChildProcess; url: string };
let ta: Transport;
let tb: Transport;
let root: string;
let verifier: string;

beforeAll(async () => {
  certs = await createTestCerts();
  proxy = await DbProxy.start();
  const viaProxy = proxy.url(schema);
  const direct: TestDatabase = {
    name: "postgres",
    url: () => viaProxy.replace(`127.0.0.1:${proxy.port}`, "127.0.0.1:5432"),
  };
  // A (in this process) reaches PostgreSQL directly; B, a `tessera serve`, through the proxy.
  a = await startTestServer(direct, { database: { barrierTimeoutMs: BARRIER_MS } }, certs);
  b = await serve({
    ...(process.env as Record<string, string>),
    TESSERA_DATABASE_URL: viaProxy,
    TESSERA_CERT_DIR: certs.dir,
    TESSERA_HOST: "127.0.0.1",
    TESSERA_PORT: "0",
    TESSERA_ADMIN_PASSWORD: ADMIN_PASSWORD,
    TESSERA_PASSWORD_ITERATIONS: "1000",
    TESSERA_MASTER_KEY: TEST_MASTER_KEY,
    TESSERA_RATE_LIMIT: "false",
    TESSERA_MAX_CONNECTIONS_PER_IP: "0",
    TESSERA_STATE_BARRIER_TIMEOUT_MS: String(BARRIER_MS),
    TESSERA_WATCH_HEARTBEAT_SECONDS: "10",
  });
  ta = a.connect();
  tb = createConnectTransport({ baseUrl: b.url, httpVersion: "2", nodeOptions: { ca: certs.ca } });
  root = await adminLogin(ta);
  verifier = (
    await clients(ta, root).machines.createMachineUser({
      name: `verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["*"],
    })
  ).token;
}, 120_000);

afterAll(async () => {
  proxy?.restore();
  if (b) await stop(b.child);
  killAll();
  await a?.close();
  await proxy?.close();
  await dropSchema(`postgres://postgres@127.0.0.1:5432/test?schema=${schema}`);
});

describe("WatchRevocations on an instance cut off from PostgreSQL without a reset", () => {
  it("ends the stream (Unavailable) within the barrier's bound and a keepalive, never heartbeating past a revocation it missed", async () => {
    const pat = await clientFor(TokenService, ta, root).createPersonalAccessToken({ name: `w-${short()}` });
    const onB = Watcher.open(tb, verifier);
    await onB.first();
    // The cut comes 6.5 s into the heartbeat period: B's keepalive gives up (2 s) before the
    // next heartbeat is due (10 s), while the catch-up read it starts then still waits.
    await new Promise((r) => setTimeout(r, 6_500));
    const heard = onB.messages.length;
    proxy.freeze();
    const revokedAt = performance.now();
    await clientFor(TokenService, ta, root).revokePersonalAccessToken({ id: pat.id });
    const returned = Date.now();
    // A's write returned after giving up on B's acknowledgement: from then on, B's stream may
    // not vouch for a cursor (no heartbeat), and it ends soon after, so the client's cache goes.
    const ended = await onB.end(8_000);
    const endedAt = Date.now();
    console.log(`stream on B ended ${endedAt - returned} ms after the revocation on A returned`);
    proxy.restore();
    expect(onB.messages.slice(heard).filter((m) => m.at >= revokedAt)).toEqual([]);
    expect(ended).toBeInstanceOf(ConnectError);
    expect((ended as ConnectError).code).toBe(Code.Unavailable);
    // Within 3 s of the last answer of B's listening session (before the freeze), with slack for load.
    expect(endedAt - returned).toBeLessThan(5_000);
  }, 60_000);
});
