/**
 * The example downstream service (examples/workflows) as a bench server: with Tessera's
 * interceptor (`tessera`: DOWNSTREAM_TESSERA_URL, DOWNSTREAM_TESSERA_CREDENTIAL) or without
 * any (`bare`: the baseline, same handlers, same TLS). Listens on 127.0.0.1 and announces
 * its port as one JSON line, like the other bench servers.
 *
 * Run: `node --import tsx bench/downstream-server.ts <certDir> bare|tessera`.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { startWorkflowServer } from "../examples/workflows/service.js";
import { announceListening, benchPort, stopOnSignal } from "./tls.js";

const [certDir, mode] = process.argv.slice(2);
if (!certDir || (mode !== "bare" && mode !== "tessera"))
  throw new Error("usage: downstream-server.ts <certDir> bare|tessera");

const server = await startWorkflowServer({
  cert: readFileSync(join(certDir, "server.crt")),
  key: readFileSync(join(certDir, "server.key")),
  port: benchPort(),
  tessera:
    mode === "bare"
      ? false
      : {
          server: process.env.DOWNSTREAM_TESSERA_URL ?? "",
          caFile: join(certDir, "ca.crt"),
          credential: process.env.DOWNSTREAM_TESSERA_CREDENTIAL ?? "",
          verifyTimeoutMs: Number(process.env.DOWNSTREAM_VERIFY_TIMEOUT_MS ?? 2000),
        },
});
if (server.auth && !(await server.auth.ready(30_000))) throw new Error("WatchRevocations did not come up");
announceListening(server.port);
stopOnSignal(() => void server.close().then(() => process.exit(0)));
