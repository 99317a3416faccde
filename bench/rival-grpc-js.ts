/**
 * Rival for gRPC (issue 19): what a user would build instead of Tessera for an
 * authenticated gRPC call. `@grpc/grpc-js` over TLS serving
 * tessera.v1.UserService/GetCurrentUser from proto/ through `@grpc/proto-loader` (grpc-js's
 * own way), the `authorization: Bearer` token verified with `jose` as an HS256 JWT with
 * Tessera's secret, issuer and audience (expiry required), answering the message Tessera
 * answers. The key is imported once as a CryptoKey, as jose advises (a raw secret costs
 * about 2.5× per verify). It reads no state: see bench/rivals.ts.
 *
 * TLS: the reference servers' development certificates and maxConcurrentStreams (256);
 * grpc-js cannot request a client certificate without requiring it, so it requests none
 * (the bench reuses its connections: handshakes are not in the per-call cost).
 *
 * Run: `RIVAL_JWT_SECRET=… RIVAL_CREATED_AT=… node --import tsx bench/rival-grpc-js.ts <certDir> <protoDir>`;
 * prints {"listening": port}.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import { jwtVerify } from "jose";
import { rivalSettings, TESSERA_AUDIENCE, TESSERA_ISSUER, userFromClaims } from "./rivals.js";
import { announceListening, benchPort, stopOnSignal } from "./tls.js";

const [certDir, protoDir] = process.argv.slice(2);
if (!certDir || !protoDir) throw new Error("usage: rival-grpc-js.ts <certDir> <protoDir>");
const { secret, createdAt } = rivalSettings();

const definition = loadSync("tessera/v1/user_service.proto", {
  includeDirs: [protoDir],
  longs: String,
  enums: String,
  oneofs: true,
});
const userService = (definition["tessera.v1.UserService"] as grpc.ServiceDefinition | undefined) ?? null;
if (!userService) throw new Error("tessera.v1.UserService not found in proto/");

const key = await crypto.subtle.importKey(
  "raw",
  new TextEncoder().encode(secret),
  { name: "HMAC", hash: "SHA-256" },
  false,
  ["verify"],
);
const created = Date.parse(createdAt);
const createdAtMessage = { seconds: String(Math.floor(created / 1000)), nanos: (created % 1000) * 1e6 };

const refuse = (details: string) => ({ code: grpc.status.UNAUTHENTICATED, details });

const getCurrentUser: grpc.handleUnaryCall<unknown, unknown> = (call, callback) => {
  const header = call.metadata.get("authorization")[0];
  if (typeof header !== "string" || !header.startsWith("Bearer ")) {
    callback(refuse("missing bearer token"));
    return;
  }
  jwtVerify(header.slice(7), key, {
    algorithms: ["HS256"],
    issuer: TESSERA_ISSUER,
    audience: TESSERA_AUDIENCE,
    requiredClaims: ["exp"],
  }).then(
    ({ payload }) => {
      const user = userFromClaims(payload);
      if (user) callback(null, { ...user, createdAt: createdAtMessage });
      else callback(refuse("not a user token"));
    },
    () => callback(refuse("invalid token")),
  );
};

const server = new grpc.Server({ "grpc.max_concurrent_streams": 256 });
server.addService(userService, { GetCurrentUser: getCurrentUser });
const credentials = grpc.ServerCredentials.createSsl(
  readFileSync(join(certDir, "ca.crt")),
  [
    {
      cert_chain: readFileSync(join(certDir, "server.crt")),
      private_key: readFileSync(join(certDir, "server.key")),
    },
  ],
  false,
);
server.bindAsync(`127.0.0.1:${benchPort()}`, credentials, (err, port) => {
  if (err) throw err;
  announceListening(port);
});
stopOnSignal(() => server.tryShutdown(() => process.exit(0)));
