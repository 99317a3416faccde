/**
 * Rival for Connect JSON (issue 19): what a user would build instead of Tessera for an
 * authenticated JSON call. fastify 5 over HTTP/2 + TLS, with the reference servers' TLS
 * and HTTP/2 options (bench/tls.ts), `@fastify/jwt` verifying the bearer token as an
 * HS256 JWT with Tessera's secret, issuer and audience (expiry required), and
 * `POST /tessera.v1.UserService/GetCurrentUser` answering the JSON Tessera answers.
 *
 * Written as fastify's documentation recommends, so the comparison is with fastify at its
 * best: a response schema (fast-json-stringify serialises the answer), logging off (its
 * default). `@fastify/jwt`'s verified-token cache is off (its default). It reads no state:
 * see bench/rivals.ts.
 *
 * Run: `RIVAL_JWT_SECRET=… RIVAL_CREATED_AT=… node --import tsx bench/rival-fastify.ts <certDir>`;
 * prints {"listening": port}.
 */
import fastifyJwt from "@fastify/jwt";
import Fastify from "fastify";
import {
  rivalSettings,
  TESSERA_AUDIENCE,
  TESSERA_ISSUER,
  type TesseraClaims,
  userFromClaims,
} from "./rivals.js";
import { announceListening, benchPort, referenceServerOptions, stopOnSignal } from "./tls.js";

const certDir = process.argv[2];
if (!certDir) throw new Error("usage: rival-fastify.ts <certDir>");
const { secret, createdAt } = rivalSettings();

const app = Fastify({ http2: true, https: referenceServerOptions(certDir) });
await app.register(fastifyJwt, {
  secret,
  verify: {
    algorithms: ["HS256"],
    allowedIss: TESSERA_ISSUER,
    allowedAud: TESSERA_AUDIENCE,
    requiredClaims: ["exp"],
  },
});

const userSchema = {
  type: "object",
  properties: {
    id: { type: "string" },
    username: { type: "string" },
    tenantId: { type: "string" },
    permissions: { type: "array", items: { type: "string" } },
    createdAt: { type: "string" },
  },
} as const;

app.post(
  "/tessera.v1.UserService/GetCurrentUser",
  { schema: { response: { 200: userSchema } } },
  async (request) => {
    // Throws a 401 (FST_JWT_…) for a missing, malformed, forged or expired token.
    const user = userFromClaims(await request.jwtVerify<TesseraClaims>());
    if (!user) throw Object.assign(new Error("not a user token"), { statusCode: 401 });
    return { ...user, createdAt };
  },
);

await app.listen({ host: "127.0.0.1", port: benchPort() });
const address = app.server.address();
announceListening(typeof address === "object" && address ? address.port : benchPort());
stopOnSignal(() => void app.close().then(() => process.exit(0)));
