import type { ChildProcess } from "node:child_process";
import type { Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import type { ConfigInput } from "../../src/config.js";
import {
  createTestCerts,
  startTestServer,
  type TestCerts,
  type TestDatabase,
  type TestServer,
} from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";
import { killAll, serve, serveEnv, stop } from "./processes.js";

/**
 * Fixtures the multi-instance suite (test/multi/) shares: what several of its files wrote
 * each for itself. Processes of `tessera serve` come from ./processes.ts.
 */

/** A Connect transport over HTTP/2 to a server with a certificate of the test CA's. */
export function transportTo(baseUrl: string, certs: TestCerts): Transport {
  return createConnectTransport({ baseUrl, httpVersion: "2", nodeOptions: { ca: certs.ca } });
}

/**
 * Two instances on one PostgreSQL schema, with one set of certificates: A in this process,
 * B a `tessera serve` process; transports to each, the admin's token, and a verifier's.
 */
export interface Instances {
  certs: TestCerts;
  a: TestServer;
  b: { child: ChildProcess; url: string };
  ta: Transport;
  tb: Transport;
  root: string;
  /** The bearer token of a machine user holding every scope: the one WatchRevocations streams open with. */
  verifier: string;
}

/** Start A on `dbA` (with `configA`), then B on `urlB` (with `envB` over {@link serveEnv}'s). */
export async function startInstances(
  dbA: TestDatabase,
  configA: ConfigInput,
  urlB: string,
  envB: Record<string, string> = {},
): Promise<Instances> {
  const certs = await createTestCerts();
  const a = await startTestServer(dbA, configA, certs);
  try {
    const b = await serve(serveEnv(urlB, certs.dir, envB));
    const ta = a.connect();
    const tb = transportTo(b.url, certs);
    const root = await adminLogin(ta);
    const verifier = (
      await clients(ta, root).machines.createMachineUser({
        name: `verifier-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["*"],
      })
    ).token;
    return { certs, a, b, ta, tb, root, verifier };
  } catch (err) {
    killAll();
    await a.close();
    throw err;
  }
}

/** Stop what {@link startInstances} started (afterAll; `m` unset when it failed). */
export async function stopInstances(m: Instances | undefined): Promise<void> {
  if (m) await stop(m.b.child);
  killAll();
  await m?.a.close();
}
