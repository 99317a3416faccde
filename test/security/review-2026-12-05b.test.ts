import { X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { afterEach, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { createClientCertificate } from "../../src/certs/dev-ca.js";
import { DATABASES, pinnableClock, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";

/**
 * The second adversarial review of 2026-12-05 (client certificate expiry, the creation
 * budget of passwords), against a real server over TLS: each test is a finding of that
 * review, failing on the main it was found on, and holds with its fix.
 */

interface Pem {
  cert: Buffer;
  key: Buffer;
  fingerprint: string;
  /** Its notAfter, ms since the epoch. */
  notAfter: number;
}

async function mint(ts: TestServer, validityDays: number): Promise<Pem> {
  const out = join(mkdtempSync(join(tmpdir(), "tessera-review-")), "client");
  await createClientCertificate(ts.certs.dir, `client-${short()}`, out, { validityDays });
  const cert = readFileSync(join(out, "client.crt"));
  const parsed = new X509Certificate(cert);
  return {
    cert,
    key: readFileSync(join(out, "client.key")),
    fingerprint: parsed.fingerprint256.replace(/:/g, "").toLowerCase(),
    notAfter: Date.parse(parsed.validTo),
  };
}

describe.each(DATABASES)("review 2026-12-05b on $name", (db) => {
  let ts: TestServer | undefined;
  afterEach(async () => {
    await ts?.close();
    ts = undefined;
  });

  it("a WatchRevocations stream authenticated by a client certificate ends once that certificate expires", async () => {
    const clock = pinnableClock();
    ts = await startTestServer(
      db,
      { server: { mtls: "optional" }, verification: { watchHeartbeatSeconds: 1 } },
      undefined,
      { clock: clock.now },
    );
    const plain = createConnectTransport({
      baseUrl: ts.server.url,
      httpVersion: "2",
      nodeOptions: { ca: ts.certs.ca },
    });
    const admin = clients(plain, await adminLogin(plain));
    const machine = (
      await admin.machines.createMachineUser({
        name: `watcher-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).machineUser!;
    const pem = await mint(ts, 1);
    await admin.machines.bindCertificate({
      machineUserId: machine.id,
      identity: { case: "sha256Fingerprint", value: pem.fingerprint },
    });
    // No Authorization header: the stream is authenticated by the certificate alone.
    const sessionManager = new Http2SessionManager(
      ts.server.url,
      {},
      { ca: ts.certs.ca, cert: pem.cert, key: pem.key },
    );
    const transport = createConnectTransport({ baseUrl: ts.server.url, httpVersion: "2", sessionManager });
    const watcher = new Watcher(createClient(VerificationService, transport));
    try {
      await watcher.first();
      // Its last valid instant (notAfter is inclusive): the stream carries on.
      clock.pin(pem.notAfter);
      const before = watcher.messages.length;
      await watcher.until(() => watcher.messages.length > before, 5_000, "a heartbeat");
      clock.pin(pem.notAfter + 1);
      const ended = await watcher.end(5_000);
      expect(ended, "the stream kept running past its certificate's notAfter").toBeInstanceOf(ConnectError);
      expect((ended as ConnectError).code).toBe(Code.Unavailable);
      // Reconnecting on the same connection is refused: the certificate authenticates nothing now.
      const again = new Watcher(createClient(VerificationService, transport));
      expect(ConnectError.from(await again.end()).code).toBe(Code.Unauthenticated);
    } finally {
      watcher.close();
      sessionManager.abort();
    }
  });
});
