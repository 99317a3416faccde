import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createClientCertificate, writeCrl } from "../../src/certs/index.js";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { envelope, within } from "./fixtures.js";

/**
 * With `server.mtls=require`, a connection whose client certificate authenticates nothing any
 * more (revoked by a CRL loaded since its handshake, expired, of a CA replaced since) can serve
 * nothing: HTTP/2 gets GOAWAY, and HTTP/1.1 its equivalent, `Connection: close` on the answer
 * and the socket closed after it, so that no further request is served on it. A connection
 * whose certificate is still good stays alive. Raw keep-alive HTTP/1.1 over TLS, Connect JSON
 * and gRPC-Web, both transports (the `unit` project runs the fast one, `connect` the stock one).
 */

const GET_CURRENT_USER = "/tessera.v1.UserService/GetCurrentUser";

interface Pem {
  cert: string;
  key: string;
}

async function mint(caDir: string, name: string): Promise<Pem> {
  const out = join(mkdtempSync(join(tmpdir(), "tessera-h1-close-")), name);
  const r = await createClientCertificate(caDir, name, out);
  return { cert: readFileSync(r.certPath, "utf8"), key: readFileSync(r.keyPath, "utf8") };
}

/** One raw HTTP/1.1 answer: status and headers (lower-case names). */
interface Answer {
  status: number;
  headers: Record<string, string>;
}

/** A keep-alive HTTP/1.1 connection over TLS with a client certificate, whose answers are read one by one. */
class Http1Connection {
  private buffered = Buffer.alloc(0);
  private waiting: (() => void) | undefined;
  ended = false;

  private constructor(readonly socket: tls.TLSSocket) {
    socket.on("data", (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk]);
      this.waiting?.();
    });
    const end = () => {
      this.ended = true;
      this.waiting?.();
    };
    socket.on("end", end);
    socket.on("close", end);
    socket.on("error", () => undefined);
  }

  static async open(ts: TestServer, pem: Pem): Promise<Http1Connection> {
    const socket = tls.connect({
      host: "127.0.0.1",
      port: ts.server.port,
      ca: ts.certs.ca,
      cert: pem.cert,
      key: pem.key,
      servername: "localhost",
      ALPNProtocols: ["http/1.1"],
    });
    await within(
      new Promise((resolve, reject) => {
        socket.once("secureConnect", resolve);
        socket.once("error", reject);
      }),
      5000,
      "no TLS handshake",
    );
    return new Http1Connection(socket);
  }

  /** Send one POST and read its answer (headers, and a Content-Length or chunked body). */
  async call(contentType: string, body: Buffer): Promise<Answer> {
    const head =
      `POST ${GET_CURRENT_USER} HTTP/1.1\r\nhost: localhost\r\ncontent-type: ${contentType}\r\n` +
      `content-length: ${body.byteLength}\r\n\r\n`;
    this.socket.write(Buffer.concat([Buffer.from(head), body]));
    return within(this.answer(), 5000, "no answer");
  }

  private async answer(): Promise<Answer> {
    for (;;) {
      const at = this.buffered.indexOf("\r\n\r\n");
      if (at >= 0) {
        const [statusLine, ...lines] = this.buffered.subarray(0, at).toString("latin1").split("\r\n");
        const headers: Record<string, string> = {};
        for (const line of lines) {
          const colon = line.indexOf(":");
          headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
        }
        const end = bodyEnd(this.buffered, at + 4, headers);
        if (end !== undefined) {
          this.buffered = this.buffered.subarray(end);
          return { status: Number(statusLine!.split(" ")[1]), headers };
        }
      }
      if (this.ended) throw new Error("the connection ended before an answer");
      await new Promise<void>((resolve) => {
        this.waiting = resolve;
      });
      this.waiting = undefined;
    }
  }

  /** Resolves once the server has closed the connection. */
  closed(): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.destroyed || this.ended) resolve();
      else this.socket.once("close", () => resolve());
    });
  }
}

/** Where the body starting at `from` ends in `buf` (Content-Length, or chunked), or undefined until it has all come. */
function bodyEnd(buf: Buffer, from: number, headers: Record<string, string>): number | undefined {
  if (headers["transfer-encoding"] !== "chunked") {
    const end = from + Number(headers["content-length"] ?? 0);
    return buf.byteLength >= end ? end : undefined;
  }
  let at = from;
  for (;;) {
    const eol = buf.indexOf("\r\n", at);
    if (eol < 0) return undefined;
    const size = Number.parseInt(buf.subarray(at, eol).toString("latin1"), 16);
    const next = eol + 2 + size + 2;
    if (buf.byteLength < next) return undefined;
    if (size === 0) return next;
    at = next;
  }
}

const PROTOCOLS = [
  { name: "Connect JSON", contentType: "application/json", body: () => Buffer.from("{}"), status: 401 },
  {
    name: "gRPC-Web",
    contentType: "application/grpc-web+proto",
    body: () => envelope(0, new Uint8Array(0)),
    // gRPC-Web answers 200, its status in the trailer frame.
    status: 200,
  },
];

describe("HTTP/1.1 under mtls=require, a certificate that no longer authenticates", () => {
  let ts: TestServer;
  let good: Pem;
  let bad: Pem;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "require" } });
    good = await mint(ts.certs.dir, "h1-good");
    bad = await mint(ts.certs.dir, "h1-bad");
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("ends the connection after the refusal (Connection: close), and keeps a good certificate's alive", async () => {
    const connections = [];
    for (const p of PROTOCOLS)
      connections.push({
        p,
        good: await Http1Connection.open(ts, good),
        bad: await Http1Connection.open(ts, bad),
      });
    try {
      // Before the revocation: both certificates' connections are kept alive across calls.
      for (const { p, good: g, bad: b } of connections)
        for (const c of [g, b])
          for (let i = 0; i < 2; i++) {
            const a = await c.call(p.contentType, p.body());
            expect(a.status, p.name).toBe(p.status);
            expect(a.headers.connection, p.name).not.toBe("close");
          }

      await writeCrl(ts.certs.dir, [bad.cert]);
      await ts.server.reloadTls();

      for (const { p, good: g, bad: b } of connections) {
        // The revoked certificate's connection: refused, told so, and closed by the server.
        const refused = await b.call(p.contentType, p.body());
        expect(refused.status, p.name).toBe(p.status);
        expect(refused.headers.connection, p.name).toBe("close");
        await within(b.closed(), 5000, `${p.name}: the connection was left open`);
        // A second request on it is impossible: nothing answers it.
        await expect(b.call(p.contentType, p.body()), p.name).rejects.toThrow();

        // The good certificate's connection stays alive and keeps being served.
        for (let i = 0; i < 2; i++) {
          const a = await g.call(p.contentType, p.body());
          expect(a.status, p.name).toBe(p.status);
          expect(a.headers.connection, p.name).not.toBe("close");
        }
        expect(g.ended, p.name).toBe(false);
      }
    } finally {
      for (const c of connections) {
        c.good.socket.destroy();
        c.bad.socket.destroy();
      }
    }
  });
});
