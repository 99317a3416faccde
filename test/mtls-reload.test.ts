import { copyFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import http2 from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import type { TLSSocket } from "node:tls";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterEach, describe, expect, it } from "vitest";
import { MachineUserService } from "../gen/tessera/v1/machine_user_service_pb.js";
import {
  createCertificateAuthority,
  createClientCertificate,
  ensureDevCertificates,
  writeCrl,
} from "../src/certs/index.js";
import { Code, rejection } from "./errors-util.js";
import { SQLITE, startTestServer, type TestServer } from "./helpers.js";
import {
  adminClients,
  authenticatedAs,
  boundMachineUser,
  connectedWithCertificate,
} from "./machine-fixtures.js";

interface Pem {
  cert: string;
  key: string;
  fingerprint: string;
}

async function mint(caDir: string, name: string): Promise<Pem> {
  const out = join(mkdtempSync(join(tmpdir(), "tessera-reload-")), name);
  const r = await createClientCertificate(caDir, name, out);
  return {
    cert: readFileSync(r.certPath, "utf8"),
    key: readFileSync(r.keyPath, "utf8"),
    fingerprint: r.sha256Fingerprint,
  };
}

/** An HTTP/2 connection of its own (one TLS handshake), kept open by the caller. */
async function open(ts: TestServer, client: Pem): Promise<http2.ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(ts.server.url, { ca: ts.certs.ca, cert: client.cert, key: client.key });
    session.once("connect", () => resolve(session));
    session.once("error", reject);
  });
}

/** GET /health on a session; the status, or the error that ended it. */
function health(session: http2.ClientHttp2Session): Promise<number | Error> {
  return new Promise((resolve) => {
    const req = session.request({ ":path": "/health" });
    req.once("response", (h) => {
      req.resume();
      req.once("end", () => resolve(Number(h[":status"])));
    });
    req.once("error", (e) => resolve(e));
    session.once("error", (e) => resolve(e));
    session.once("close", () => resolve(new Error("session closed")));
    req.end();
  });
}

/** A brand-new connection's answer to GET /health (an Error when the handshake is refused). */
async function freshHealth(ts: TestServer, client: Pem): Promise<number | Error> {
  let session: http2.ClientHttp2Session;
  try {
    session = await open(ts, client);
  } catch (err) {
    return err as Error;
  }
  try {
    return await health(session);
  } finally {
    session.destroy();
  }
}

describe("reloading certificates and the CRL without a restart", () => {
  let ts: TestServer | undefined;
  afterEach(async () => {
    await ts?.close();
    ts = undefined;
  });

  it("refuses a revoked certificate on new connections after reloadTls, keeping established ones", async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "require" } });
    const a = await mint(ts.certs.dir, "client-a");
    const b = await mint(ts.certs.dir, "client-b");
    const established = await open(ts, a);
    try {
      expect(await health(established)).toBe(200);
      await writeCrl(ts.certs.dir, [a.cert]);
      await ts.server.reloadTls();

      expect(await freshHealth(ts, a)).toBeInstanceOf(Error);
      expect(await freshHealth(ts, b)).toBe(200);
      // The connection made before the reload is still up and still served.
      expect(established.closed).toBe(false);
      expect(await health(established)).toBe(200);
      expect(await health(established)).toBe(200);
    } finally {
      established.destroy();
    }
  });

  it("picks up a CRL written into the cert folder by itself (file watcher)", async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "require" } });
    const a = await mint(ts.certs.dir, "watched-a");
    expect(await freshHealth(ts, a)).toBe(200);
    await writeCrl(ts.certs.dir, [a.cert]);
    let outcome: number | Error = 200;
    for (let i = 0; i < 50 && outcome === 200; i++) {
      await sleep(100);
      outcome = await freshHealth(ts, a);
    }
    expect(outcome).toBeInstanceOf(Error);
    // Removing the CRL lets the certificate back in, again without a restart.
    rmSync(join(ts.certs.dir, "ca.crl"));
    for (let i = 0; i < 50 && outcome !== 200; i++) {
      await sleep(100);
      outcome = await freshHealth(ts, a);
    }
    expect(outcome).toBe(200);
  });

  it("stops a revoked, bound certificate from authenticating in optional mode", async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "optional" } });
    const backend = await mint(ts.certs.dir, "bound-backend");
    const id = await boundMachineUser(await adminClients(ts), "bound", backend.fingerprint);
    const viaCert = () =>
      createClient(
        MachineUserService,
        createConnectTransport({
          baseUrl: ts!.server.url,
          httpVersion: "2",
          nodeOptions: { ca: ts!.certs.ca, cert: backend.cert, key: backend.key },
        }),
      ).checkAuthentication({});
    expect((await viaCert()).machineUserId).toBe(id);
    await writeCrl(ts.certs.dir, [backend.cert]);
    await ts.server.reloadTls();
    const r = await rejection(viaCert());
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("AUTH_REQUIRED");
  });

  it("stops a certificate of a replaced CA on the connections it already has, and admits the new CA's", async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "optional" } });
    const old = await mint(ts.certs.dir, "old-ca-backend");
    const admin = await adminClients(ts);
    const bound = (name: string, pem: Pem) => boundMachineUser(admin, name, pem.fingerprint);
    const oldId = await bound("old-ca-backend", old);
    const connected = (pem: Pem) => connectedWithCertificate(ts!, pem);
    const outcome = authenticatedAs;
    let handshakes = 0;
    const counted = () => handshakes++;
    ts.server.server.on("secureConnection", counted);
    const busy = await connected(old); // authenticates before the CA changes
    const idle = await connected(old); // handshaken before the CA changes, first call after
    try {
      expect(await outcome(busy.client.checkAuthentication({}))).toBe(oldId);

      // A new CA replaces the old one in the cert folder (the server certificate stays).
      const next = mkdtempSync(join(tmpdir(), "tessera-next-ca-"));
      await createCertificateAuthority(next, { commonName: "Tessera Next CA" });
      copyFileSync(join(next, "ca.crt"), join(ts.certs.dir, "ca.crt"));
      copyFileSync(join(next, "ca.key"), join(ts.certs.dir, "ca.key"));
      await ts.server.reloadTls();

      for (const [name, c] of [
        ["busy", busy],
        ["idle", idle],
      ] as const) {
        const r = await outcome(c.client.checkAuthentication({}));
        expect(
          r,
          `a certificate of the replaced CA authenticated the ${name} connection's next request`,
        ).not.toBeTypeOf("string");
        expect(r).toMatchObject({ code: Code.Unauthenticated, reason: "AUTH_REQUIRED" });
      }
      expect(handshakes, "every call on the connections opened before the reload").toBe(2);
      // The connections stay up: they just authenticate nothing by that certificate.
      expect(busy.sessionManager.state()).not.toBe("error");

      // A certificate of the new CA works, on a new connection.
      const fresh = await mint(ts.certs.dir, "new-ca-backend");
      const freshId = await bound("new-ca-backend", fresh);
      const renewed = await connected(fresh);
      try {
        expect(await outcome(renewed.client.checkAuthentication({}))).toBe(freshId);
        expect(await outcome(renewed.client.checkAuthentication({}))).toBe(freshId);
      } finally {
        renewed.sessionManager.abort();
      }
    } finally {
      ts.server.server.off("secureConnection", counted);
      busy.sessionManager.abort();
      idle.sessionManager.abort();
    }
  });

  it("serves a replaced server certificate to new connections only", async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "optional" } });
    const client = await mint(ts.certs.dir, "observer");
    const before = await open(ts, client);
    try {
      const oldFingerprint = (before.socket as TLSSocket).getPeerCertificate().fingerprint256;
      rmSync(join(ts.certs.dir, "server.crt"));
      rmSync(join(ts.certs.dir, "server.key"));
      await ensureDevCertificates(ts.certs.dir); // issues a new server certificate from the same CA
      await ts.server.reloadTls();
      const after = await open(ts, client);
      try {
        expect((after.socket as TLSSocket).getPeerCertificate().fingerprint256).not.toBe(oldFingerprint);
        expect(await health(after)).toBe(200);
      } finally {
        after.destroy();
      }
      expect(await health(before)).toBe(200);
    } finally {
      before.destroy();
    }
  });

  it("keeps the previous certificates when the new files are broken", async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "optional" } });
    const client = await mint(ts.certs.dir, "survivor");
    const { writeFileSync } = await import("node:fs");
    writeFileSync(join(ts.certs.dir, "ca.crl"), "not a crl");
    await expect(ts.server.reloadTls()).rejects.toThrow();
    expect(await freshHealth(ts, client)).toBe(200);
    rmSync(join(ts.certs.dir, "ca.crl"));
  });

  it("names the file at fault when a reload fails, and keeps serving", async () => {
    ts = await startTestServer(SQLITE);
    const { writeFileSync } = await import("node:fs");
    const dir = ts.certs.dir;
    const kept = (file: string) => readFileSync(join(dir, file));
    const [crt, key] = [kept("server.crt"), kept("server.key")];
    // OpenSSL's own message ("no start line", "key values mismatch") names no file.
    for (const [file, content, says] of [
      ["server.crt", "garbage\n", `bad TLS material in ${dir}: server.crt: `],
      ["server.key", "garbage\n", `bad TLS material in ${dir}: server.key: `],
      [
        "server.key",
        ts.certs.clientKey,
        `bad TLS material in ${dir}: server.key is not the key of server.crt`,
      ],
      ["ca.crl", "not a crl", `bad TLS material in ${dir}: ca.crl: `],
    ] as const) {
      writeFileSync(join(dir, file), content);
      await expect(ts.server.reloadTls()).rejects.toThrow(says);
      if (file === "ca.crl") rmSync(join(dir, file));
      else writeFileSync(join(dir, file), file === "server.crt" ? crt : key);
    }
    await ts.server.reloadTls();
  });
});
