import { appendFileSync } from "node:fs";
import http2 from "node:http2";
import net from "node:net";
import { join } from "node:path";
import tls from "node:tls";
import { afterEach, describe, expect, it } from "vitest";
import { writeCrl } from "../../src/certs/index.js";
import { createTestCerts, DATABASES, pinnableClock, startTestServer, type TestServer } from "../helpers.js";
import {
  adminClients,
  adminLogin,
  boundMachineUser,
  clients,
  mintClientCertificate,
  short,
} from "../machine-fixtures.js";
import { intermediateChain } from "../pki-fixtures.js";

/**
 * A client certificate's chain is verified at a full TLS handshake only: a resumed session
 * sends no certificate and Node keeps none of the first handshake's intermediates. Its
 * certificate must still stop authenticating once that handshake's chain ends, and with mTLS
 * required a connection whose certificate authenticates nothing any more is closed cleanly.
 */

const CHECK = "/tessera.v1.MachineUserService/CheckAuthentication";

/** The bootstrap admin's clients where mTLS is required: over the test CA's client certificate. */
async function requiredAdmin(ts: TestServer) {
  const transport = ts.connect({ clientCert: true });
  return clients(transport, await adminLogin(transport));
}

/** One HTTP/2 connection over a TLS socket of its own: resumed from `session` when given. */
async function connection(
  ts: TestServer,
  pem: { cert: Buffer | string; key: Buffer | string },
  options: { maxVersion?: tls.SecureVersion; session?: Buffer; socket?: net.Socket } = {},
) {
  const tickets: Buffer[] = [];
  let socket: tls.TLSSocket | undefined;
  const h2 = http2.connect(ts.server.url, {
    createConnection: () => {
      socket = tls.connect({
        host: "127.0.0.1",
        port: ts.server.port,
        ALPNProtocols: ["h2"],
        ca: ts.certs.ca,
        cert: pem.cert,
        key: pem.key,
        ...options,
      });
      socket.on("session", (ticket: Buffer) => tickets.push(ticket));
      return socket;
    },
  });
  const goaways: number[] = [];
  h2.on("goaway", (code: number) => goaways.push(code));
  h2.on("error", () => {});
  await new Promise<void>((resolve, reject) => {
    h2.once("connect", () => resolve());
    h2.once("error", reject);
  });
  return {
    h2,
    goaways,
    reused: () => socket!.isSessionReused(),
    /** The latest session ticket the server sent (TLS 1.3 sends them after the handshake). */
    ticket: async () => {
      await expect.poll(() => tickets.length, { timeout: 5_000 }).toBeGreaterThan(0);
      return tickets.at(-1)!;
    },
    /** CheckAuthentication in Connect JSON: the machine user's id, or the HTTP status. */
    check: () =>
      new Promise<string | number>((resolve, reject) => {
        const req = h2.request({ ":method": "POST", ":path": CHECK, "content-type": "application/json" });
        let status = 0;
        const chunks: Buffer[] = [];
        req.on("response", (h) => {
          status = Number(h[":status"]);
        });
        req.on("data", (c: Buffer) => chunks.push(c));
        req.on("end", () =>
          resolve(
            status === 200
              ? (JSON.parse(Buffer.concat(chunks).toString()) as { machineUserId: string }).machineUserId
              : status,
          ),
        );
        req.on("error", reject);
        req.end("{}");
      }),
    close: () => h2.destroy(),
  };
}

describe.each(DATABASES)("resumed TLS sessions and expiring client certificates on $name", (db) => {
  let ts: TestServer | undefined;
  afterEach(async () => {
    await ts?.close();
    ts = undefined;
  });

  it.each(["TLSv1.2", "TLSv1.3"] as const)(
    "over %s, a resumed session's certificate stops authenticating once the intermediate its full handshake verified expires",
    async (maxVersion) => {
      const clock = pinnableClock();
      const certs = await createTestCerts();
      const pki = await intermediateChain();
      appendFileSync(join(certs.dir, "ca.crt"), `\n${pki.rootPem}\n`);
      ts = await startTestServer(db, { server: { mtls: "optional" } }, certs, { clock: clock.now });
      const machineId = await boundMachineUser(await adminClients(ts), `backend-${short()}`, pki.fingerprint);
      const pem = { cert: pki.chainPem, key: pki.key };

      const full = await connection(ts, pem, { maxVersion });
      const ticket = await full.ticket();
      expect(await full.check()).toBe(machineId);
      full.close();
      const resumed = await connection(ts, pem, { maxVersion, session: ticket });
      try {
        expect(resumed.reused(), "the second connection resumed the first one's session").toBe(true);
        expect(await resumed.check()).toBe(machineId);
        // The intermediate's last valid instant (notAfter is inclusive); the leaf's end is days later.
        clock.pin(pki.interNotAfter);
        expect(await resumed.check()).toBe(machineId);
        clock.pin(pki.interNotAfter + 1);
        expect(await resumed.check(), "the resumed connection outlived the intermediate").toBe(401);
        // So does a session resumed after it.
        const later = await connection(ts, pem, { maxVersion, session: ticket });
        try {
          expect(later.reused()).toBe(true);
          expect(await later.check(), "a session resumed past the intermediate's end authenticated").toBe(
            401,
          );
        } finally {
          later.close();
        }
      } finally {
        resumed.close();
      }
    },
  );

  it("a session resumed after a CA reload authenticates though a handshake accepted before the reload ended after it", async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    const pem = await mintClientCertificate(ts, 30);
    const machineId = await boundMachineUser(await adminClients(ts), `backend-${short()}`, pem.fingerprint);
    // A connection accepted under the first CA generation, its handshake not yet sent.
    const accepted = new Promise((resolve) => ts!.server.server.once("connection", resolve));
    const raw = net.connect(ts.server.port, "127.0.0.1");
    await accepted;
    // A new CA generation that still trusts the client's CA (another root added).
    appendFileSync(join(ts.certs.dir, "ca.crt"), `\n${(await intermediateChain()).rootPem}\n`);
    await ts.server.reloadTls();
    const full = await connection(ts, pem);
    const ticket = await full.ticket();
    expect(await full.check()).toBe(machineId);
    full.close();
    // The held connection's full handshake ends now, verified by the first generation.
    const late = await connection(ts, pem, { socket: raw });
    expect(await late.check()).toBe(machineId);
    late.close();
    // It must not have replaced what the new generation's handshake remembered.
    const resumed = await connection(ts, pem, { session: ticket });
    try {
      expect(resumed.reused()).toBe(true);
      expect(await resumed.check(), "the resumed session lost its handshake's chain").toBe(machineId);
    } finally {
      resumed.close();
    }
  });

  it("with mtls required, a connection whose certificate has expired answers the call that finds it, then gets GOAWAY", async () => {
    const clock = pinnableClock();
    ts = await startTestServer(db, { server: { mtls: "require" } }, undefined, { clock: clock.now });
    const pem = await mintClientCertificate(ts, 1);
    const machineId = await boundMachineUser(await requiredAdmin(ts), `backend-${short()}`, pem.fingerprint);
    const c = await connection(ts, pem);
    try {
      expect(await c.check()).toBe(machineId);
      clock.pin(pem.notAfter);
      expect(await c.check()).toBe(machineId);
      expect(c.goaways).toEqual([]);
      clock.pin(pem.notAfter + 1);
      expect(await c.check()).toBe(401);
      await expect
        .poll(() => c.goaways, { timeout: 5_000, message: "no GOAWAY for an expired certificate" })
        .toEqual([http2.constants.NGHTTP2_NO_ERROR]);
    } finally {
      c.close();
    }
  });

  it("with mtls required, a connection whose certificate a reloaded CRL revokes answers the call that finds it, then gets GOAWAY", async () => {
    ts = await startTestServer(db, { server: { mtls: "require" } });
    const pem = await mintClientCertificate(ts, 30);
    const machineId = await boundMachineUser(await requiredAdmin(ts), `backend-${short()}`, pem.fingerprint);
    const c = await connection(ts, pem);
    try {
      expect(await c.check()).toBe(machineId);
      await writeCrl(ts.certs.dir, [pem.cert.toString()]);
      await ts.server.reloadTls();
      expect(await c.check()).toBe(401);
      await expect
        .poll(() => c.goaways, { timeout: 5_000, message: "no GOAWAY for a revoked certificate" })
        .toEqual([http2.constants.NGHTTP2_NO_ERROR]);
    } finally {
      c.close();
    }
  });
});
