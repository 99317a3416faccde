import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import tls from "node:tls";
import { afterEach, describe, expect, it } from "vitest";
import { createClientCertificate } from "../src/certs/dev-ca.js";
import { type TrustAnchors, trustAnchors } from "../src/certs/trust-anchors.js";
import { createVerifiedEnds, trackHandshakeEnds } from "../src/server/handshake-ends.js";
import { createStateAttacher, stateOf } from "../src/server/request-facts.js";
import { createTestCerts, type TestCerts, testConfig } from "./helpers.js";

/**
 * A resumed TLS session carries no chain: its certificate's end is the one its full handshake
 * verified, remembered per leaf; a resumption the server remembers nothing of authenticates nothing.
 */

describe("the ends of verified client certificates", () => {
  it("keeps a leaf's latest end under the anchors it was verified by, and nothing under others", () => {
    // Two generations of a CA: only their identity matters here.
    const a: TrustAnchors = { key: "a", certs: [] };
    const b: TrustAnchors = { key: "b", certs: [] };
    const ends = createVerifiedEnds(10);
    expect(ends.recall("leaf", a)).toBe(Number.NEGATIVE_INFINITY);
    ends.remember("leaf", a, 2_000);
    ends.remember("leaf", a, 1_000);
    expect(ends.recall("leaf", a)).toBe(2_000);
    expect(ends.recall("leaf", b)).toBe(Number.NEGATIVE_INFINITY);
    ends.remember("leaf", b, 500);
    expect(ends.recall("leaf", b)).toBe(500);
    // Each generation keeps its own: a handshake accepted before a reload may end after it.
    expect(ends.recall("leaf", a)).toBe(2_000);
    ends.remember("leaf", a, 3_000);
    expect(ends.recall("leaf", b)).toBe(500);
  });
});

/** A client certificate of the test CA, with its key and its notAfter (ms). */
async function leafOf(certs: TestCerts, name: string) {
  const c = await createClientCertificate(certs.dir, name, join(certs.clientDir, "..", name));
  const cert = readFileSync(c.certPath);
  return { cert, key: readFileSync(c.keyPath), notAfter: Date.parse(new X509Certificate(cert).validTo) };
}

describe("a TLS server's handshake ends", () => {
  let server: tls.Server | http2.Http2SecureServer | undefined;
  afterEach(() => {
    server?.close();
    server = undefined;
  });

  it("gives a resumed session its full handshake's end, and -Infinity once that leaf was forgotten", async () => {
    const certs = await createTestCerts();
    const anchors = trustAnchors(certs.ca);
    const [first, second] = [await leafOf(certs, "first"), await leafOf(certs, "second")];
    server = tls.createServer({
      ca: certs.ca,
      cert: readFileSync(join(certs.dir, "server.crt")),
      key: readFileSync(join(certs.dir, "server.key")),
      requestCert: true,
      rejectUnauthorized: true,
      maxVersion: "TLSv1.2",
    });
    // One leaf remembered at a time: the second full handshake forgets the first leaf.
    const endOf = trackHandshakeEnds(server, () => anchors, createVerifiedEnds(1));
    const seen: { reused: boolean; end: number | undefined }[] = [];
    server.on("secureConnection", (socket: tls.TLSSocket) => {
      seen.push({ reused: socket.isSessionReused(), end: endOf(socket) });
      socket.end();
    });
    await new Promise<void>((resolve) => server!.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as AddressInfo).port;
    const connect = (pem: { cert: Buffer; key: Buffer }, session?: Buffer) =>
      new Promise<Buffer | undefined>((resolve, reject) => {
        let ticket: Buffer | undefined;
        const s = tls.connect({
          host: "127.0.0.1",
          port,
          ca: certs.ca,
          ...pem,
          ...(session ? { session } : {}),
        });
        s.on("session", (t: Buffer) => {
          ticket = t;
        });
        s.on("error", reject);
        s.on("close", () => resolve(ticket));
        s.resume();
      });
    const firstTicket = await connect(first);
    const secondTicket = await connect(second);
    await connect(second, secondTicket);
    await connect(first, firstTicket);
    expect(seen).toEqual([
      { reused: false, end: first.notAfter },
      { reused: false, end: second.notAfter },
      { reused: true, end: second.notAfter },
      { reused: true, end: Number.NEGATIVE_INFINITY },
    ]);
  });

  it("with mtls required, refuses a resumption it remembers nothing of without cutting its connection, and cuts an expired one", async () => {
    const certs = await createTestCerts();
    const anchors = trustAnchors(certs.ca);
    const [first, second] = [await leafOf(certs, "first"), await leafOf(certs, "second")];
    const h2 = http2.createSecureServer({
      ca: certs.ca,
      cert: readFileSync(join(certs.dir, "server.crt")),
      key: readFileSync(join(certs.dir, "server.key")),
      requestCert: true,
      rejectUnauthorized: true,
      maxVersion: "TLSv1.2",
    });
    server = h2;
    // One leaf remembered at a time, as in the test above; the request facts as the server reads them.
    const endOf = trackHandshakeEnds(h2, () => anchors, createVerifiedEnds(1));
    let now = Date.now();
    const attach = createStateAttacher(
      testConfig("sqlite::memory:", { server: { mtls: "require" } }),
      true,
      () => ({ anchors, revoked: new Set<string>() }),
      { anchors: () => anchors, end: endOf },
      () => now,
    );
    h2.on("request", (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
      attach(req);
      res.writeHead(stateOf(req).certificate === null ? 401 : 200).end();
    });
    await new Promise<void>((resolve) => h2.listen(0, "127.0.0.1", resolve));
    const port = (h2.address() as AddressInfo).port;
    const open = async (pem: { cert: Buffer; key: Buffer }, session?: Buffer) => {
      let ticket: Buffer | undefined;
      let socket: tls.TLSSocket | undefined;
      const client = http2.connect(`https://127.0.0.1:${port}`, {
        createConnection: () => {
          socket = tls.connect({
            host: "127.0.0.1",
            port,
            ALPNProtocols: ["h2"],
            ca: certs.ca,
            ...pem,
            ...(session ? { session } : {}),
          });
          socket.on("session", (t: Buffer) => {
            ticket = t;
          });
          return socket;
        },
      });
      const goaways: number[] = [];
      client.on("goaway", (code: number) => goaways.push(code));
      client.on("error", () => {});
      await new Promise<void>((resolve, reject) => {
        client.once("connect", () => resolve());
        client.once("error", reject);
      });
      const call = () =>
        new Promise<number>((resolve, reject) => {
          const req = client.request({ ":path": "/" });
          let status = 0;
          req.on("response", (h) => {
            status = Number(h[":status"]);
          });
          req.on("end", () => resolve(status));
          req.on("error", reject);
          req.resume();
          req.end();
        });
      return {
        call,
        goaways,
        reused: () => socket!.isSessionReused(),
        ticket: () => ticket!,
        close: () => client.close(),
      };
    };

    const a = await open(first);
    expect(await a.call()).toBe(200);
    const firstTicket = a.ticket();
    a.close();
    const b = await open(second);
    expect(await b.call()).toBe(200);
    b.close();
    // The first leaf is forgotten: its resumption authenticates nothing, call after call, and
    // its connection stays (a new one would resume the same ticket).
    const resumed = await open(first, firstTicket);
    try {
      expect(resumed.reused()).toBe(true);
      expect(await resumed.call()).toBe(401);
      expect(resumed.goaways, "a forgotten resumption was cut").toEqual([]);
      expect(await resumed.call()).toBe(401);
      expect(resumed.goaways).toEqual([]);
    } finally {
      resumed.close();
    }
    // A certificate past its end is still cut, so that its client comes back with a renewed one.
    const expired = await open(second);
    try {
      now = second.notAfter + 1;
      expect(await expired.call()).toBe(401);
      await expect
        .poll(() => expired.goaways, { timeout: 5_000 })
        .toEqual([http2.constants.NGHTTP2_NO_ERROR]);
    } finally {
      expired.close();
    }
  });
});
