/**
 * The ceiling: node:http2's core stream API answering every POST with a fixed body, over
 * the same TLS setup as Tessera. Nothing built on Node's HTTP/2 can be faster than this.
 *
 * Connect JSON (`content-type: application/json`) gets the constant user as JSON; gRPC
 * (`application/grpc…`) gets it as one length-prefixed protobuf message and the trailers
 * `grpc-status: 0`. The request body is read to its end before answering, as a real
 * handler must.
 *
 * Run: `node --import tsx bench/raw-server.ts <certDir>`; prints {"listening": port}.
 */
import http2 from "node:http2";
import { CONSTANT_USER_GRPC_FRAME, CONSTANT_USER_JSON } from "./fixtures.js";
import { listenAndAnnounce, referenceServerOptions } from "./tls.js";

const certDir = process.argv[2];
if (!certDir) throw new Error("usage: raw-server.ts <certDir>");

const json = Buffer.from(CONSTANT_USER_JSON);
const jsonHeaders = { ":status": 200, "content-type": "application/json", "content-length": json.length };
const grpcHeaders = { ":status": 200, "content-type": "application/grpc+proto" };
const grpcTrailers = { "grpc-status": "0" };

const server = http2.createSecureServer(referenceServerOptions(certDir));
server.on("stream", (stream, headers) => {
  const grpc = String(headers["content-type"] ?? "").startsWith("application/grpc");
  stream.on("data", () => {});
  stream.on("end", () => {
    if (stream.destroyed) return;
    if (grpc) {
      stream.respond(grpcHeaders, { waitForTrailers: true });
      stream.once("wantTrailers", () => stream.sendTrailers(grpcTrailers));
      stream.end(CONSTANT_USER_GRPC_FRAME);
    } else {
      stream.respond(jsonHeaders);
      stream.end(json);
    }
  });
  stream.on("error", () => {});
});
listenAndAnnounce(server);
