import type { ChildProcess } from "node:child_process";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import {
  createTestCerts,
  POSTGRES,
  startTestServer,
  type TestDatabase,
  type TestServer,
} from "../helpers.js";
import { adminLogin, bearerMachine, clients, short } from "../machine-fixtures.js";
import { type Backend, mintBackend } from "../security/fixtures.js";
import { Watcher } from "../watch-fixtures.js";
import { transportTo } from "./fixtures.js";
import { killAll, serve, serveEnv, stop } from "./processes.js";

/**
 * A certificate-authenticated WatchRevocations stream on instance A ends when a binding
 * made on instance B (another process, one PostgreSQL schema) takes its certificate: the
 * event reaches A's feed, A's state cache was emptied by B's commit, and the stream's
 * re-resolution of its certificate reads the new binding.
 */

const url = POSTGRES.url();
const db: TestDatabase = { name: "postgres", url: () => url };
let a: TestServer;
let b: { child: ChildProcess; url: string };
let tb: Transport;
let root: string;

function presenting(backend: Backend): Transport {
  return createConnectTransport({
    baseUrl: a.server.url,
    httpVersion: "2",
    nodeOptions: { ca: a.certs.ca, cert: backend.cert, key: backend.key },
  });
}

beforeAll(async () => {
  const certs = await createTestCerts();
  a = await startTestServer(
    db,
    { server: { mtls: "optional" }, verification: { watchHeartbeatSeconds: 1 } },
    certs,
  );
  b = await serve(serveEnv(url, certs.dir));
  tb = transportTo(b.url, certs);
  root = await adminLogin(a.connect());
}, 120_000);

afterAll(async () => {
  if (b) await stop(b.child);
  killAll();
  await a?.close();
});

describe("a certificate-authenticated WatchRevocations stream across instances (PostgreSQL)", () => {
  it("ends on A once a binding made on B takes its certificate", async () => {
    const ta = a.connect();
    const san = `spiffe://tenant.example/watcher/${short()}`;
    const { machine } = await bearerMachine(ta, root, [], { scopes: ["auth:verify"] });
    await clients(ta, root).machines.bindCertificate({
      machineUserId: machine!.id,
      identity: { case: "sanUri", value: san },
    });
    const backend = await mintBackend(a, san);
    const over = presenting(backend);
    // Read through A's state cache before the change, so a stale entry would answer after it.
    expect((await createClient(MachineUserService, over).checkAuthentication({})).machineUserId).toBe(
      machine!.id,
    );
    const watcher = new Watcher(createClient(VerificationService, over));
    try {
      await watcher.first();
      const { machine: other } = await bearerMachine(tb, root, []);
      await clients(tb, root).machines.bindCertificate({
        machineUserId: other!.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      const ended = await watcher.end(5_000);
      expect(ended, "the stream on A kept running after B's binding took its certificate").toBeInstanceOf(
        ConnectError,
      );
      expect((ended as ConnectError).code).toBe(Code.Unavailable);
    } finally {
      watcher.close();
    }
  });
});
