/**
 * The baseline: a bare `connectNodeAdapter` serving `UserService.GetCurrentUser` with a
 * constant answer, no interceptors, no context values, no extra headers, over the same
 * TLS setup as Tessera. The distance between it and Tessera is the cost of Tessera's
 * own work (authentication, authorization, headers, storage); the distance between it
 * and the raw server is the cost of the Connect stack.
 *
 * With a second argument `tessera-adapter`, the same handler is served through Tessera's
 * own Node bridge (src/transport/fast-adapter.ts, installed with `serveRequests` as Tessera's
 * server does) instead of connect-node's: the difference between the two is what that
 * bridge takes back.
 *
 * Run: `node --import tsx bench/bare-server.ts <certDir> [tessera-adapter]`; prints {"listening": port}.
 */
import http2 from "node:http2";
import type { ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { createConnectHandler } from "../src/transport/fast-adapter.js";
import { serveRequests } from "../src/transport/stream-server.js";
import { CONSTANT_USER } from "./fixtures.js";
import { listenAndAnnounce, referenceServerOptions } from "./tls.js";

const certDir = process.argv[2];
if (!certDir) throw new Error("usage: bare-server.ts <certDir>");

const options = {
  routes(router: ConnectRouter) {
    router.service(UserService, { getCurrentUser: () => CONSTANT_USER });
  },
  readMaxBytes: 4 * 1024 * 1024,
};
const server = http2.createSecureServer(referenceServerOptions(certDir));
if (process.argv[3] === "tessera-adapter") serveRequests(server, createConnectHandler(options));
else server.on("request", connectNodeAdapter(options));
listenAndAnnounce(server);
