import http2 from "node:http2";
import { isIP } from "node:net";
import { Duplex } from "node:stream";
import tls from "node:tls";
import { fromBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../gen/google/rpc/status_pb.js";

/**
 * An HTTP/2 client session whose first request goes out with exactly the header list given,
 * repeats included: node:http2's client refuses to send a header it holds single (Authorization
 * twice, ERR_HTTP2_HEADER_SINGLE_VALUE), an attacker's client does not. The session is
 * node:http2's own, over TLS; between it and the socket, its first HEADERS frame is replaced
 * by one carrying `headers` as HPACK literals that touch no table (RFC 7541 §6.2.2), so what
 * the client and the server remember of the header tables stays the same. One request per
 * session: the second one's headers would be sent as node:http2 encoded them.
 */
export function sessionSendingHeaders(
  url: string,
  ca: string | Buffer,
  headers: readonly (readonly [string, string])[],
): http2.ClientHttp2Session {
  const { hostname, port } = new URL(url);
  const socket = tls.connect({
    host: hostname,
    port: Number(port),
    ca,
    ALPNProtocols: ["h2"],
    ...(isIP(hostname) ? {} : { servername: hostname }),
  });
  let pending = Buffer.alloc(0);
  let preface = true;
  let replaced = false;
  const wire = new Duplex({
    write(chunk: Buffer, _encoding, done) {
      pending = Buffer.concat([pending, chunk]);
      const out: Buffer[] = [];
      if (preface) {
        if (pending.length < PREFACE_BYTES) return done();
        out.push(pending.subarray(0, PREFACE_BYTES));
        pending = pending.subarray(PREFACE_BYTES);
        preface = false;
      }
      while (pending.length >= 9) {
        const length = pending.readUIntBE(0, 3);
        if (pending.length < 9 + length) break;
        let frame = pending.subarray(0, 9 + length);
        pending = pending.subarray(9 + length);
        if (frame[3] === HEADERS && !replaced) {
          replaced = true;
          const block = Buffer.concat(headers.map(([name, value]) => literal(name, value)));
          const head = Buffer.alloc(9);
          head.writeUIntBE(block.length, 0, 3);
          head[3] = HEADERS;
          // END_STREAM and END_HEADERS as the client set them; no priority, no padding.
          head[4] = frame[4]! & 0x05;
          head.writeUInt32BE(frame.readUInt32BE(5), 5);
          frame = Buffer.concat([head, block]);
        }
        out.push(frame);
      }
      if (out.length === 0) return done();
      socket.write(Buffer.concat(out), done);
    },
    read() {
      socket.resume();
    },
    final(done) {
      socket.end();
      done();
    },
    destroy(err, done) {
      socket.destroy();
      done(err);
    },
  });
  socket.on("data", (data: Buffer) => {
    if (!wire.push(data)) socket.pause();
  });
  socket.on("end", () => wire.push(null));
  socket.on("error", (err) => wire.destroy(err));
  return http2.connect(url, { createConnection: () => wire });
}

const PREFACE_BYTES = 24;
const HEADERS = 0x1;

/** An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), the prefix's other bits 0. */
function integer(value: number, n: number): number[] {
  const max = (1 << n) - 1;
  if (value < max) return [value];
  const out = [max];
  let rest = value - max;
  while (rest >= 128) {
    out.push((rest % 128) + 128);
    rest = Math.floor(rest / 128);
  }
  out.push(rest);
  return out;
}

/** A literal header field without indexing, its name a literal too, neither Huffman-coded. */
function literal(name: string, value: string): Buffer {
  const n = Buffer.from(name, "latin1");
  const v = Buffer.from(value, "latin1");
  return Buffer.concat([Buffer.from([0, ...integer(n.length, 7)]), n, Buffer.from(integer(v.length, 7)), v]);
}

/** What a request on such a session was answered: its status, headers, trailers and body. */
export interface RawAnswer {
  status: number;
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
}

/**
 * Send one request with exactly `headers` (pseudo-headers first, as HTTP/2 wants them) and
 * `body` on a session of its own, and read its answer.
 */
export async function sendRawH2(
  url: string,
  ca: string | Buffer,
  headers: readonly (readonly [string, string])[],
  body: Buffer | string,
): Promise<RawAnswer> {
  const session = sessionSendingHeaders(url, ca, headers);
  try {
    const method = headers.find(([n]) => n === ":method")?.[1] ?? "POST";
    const path = headers.find(([n]) => n === ":path")?.[1] ?? "/";
    const req = session.request({ ":method": method, ":path": path });
    return await new Promise<RawAnswer>((resolve, reject) => {
      let answer: http2.IncomingHttpHeaders = {};
      let trailers: http2.IncomingHttpHeaders = {};
      const chunks: Buffer[] = [];
      req.on("response", (h) => {
        answer = h;
      });
      req.on("trailers", (t) => {
        trailers = t;
      });
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () =>
        resolve({
          status: Number(answer[":status"]),
          headers: answer,
          trailers,
          body: Buffer.concat(chunks),
        }),
      );
      req.on("error", reject);
      req.end(body);
    });
  } finally {
    session.close();
  }
}

/** A gRPC answer's status code, and the reason and message of its error (from its trailers, or its headers when trailers-only). */
export function grpcRefusal(answer: {
  headers: Record<string, unknown>;
  trailers?: Record<string, unknown>;
}) {
  const all = { ...answer.headers, ...answer.trailers };
  const bin = all["grpc-status-details-bin"];
  const status = typeof bin === "string" ? fromBinary(StatusSchema, Buffer.from(bin, "base64")) : undefined;
  const info = status?.details[0] ? anyUnpack(status.details[0], ErrorInfoSchema) : undefined;
  return { code: all["grpc-status"], reason: info?.reason, message: status?.message };
}
