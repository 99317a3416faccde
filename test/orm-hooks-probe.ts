/**
 * Run in a fresh process by test/orm-async-context.test.ts (promise hooks are process-wide,
 * and a test worker may already have loaded MikroORM): starts the server through the CLI's
 * `serve`, exactly as `tessera serve` does, makes calls that write through the ORM (Login:
 * refresh token and audit event), and reports as one JSON line whether promise hooks are on.
 *
 * Environment: PROBE_DB (database URL); the admin password comes from TESSERA_ADMIN_PASSWORD.
 * The server listens on a port of the system's choosing (0), found once it listens: a port
 * picked free beforehand can be taken by another process before the server binds it.
 */
import { executionAsyncId } from "node:async_hooks";
import http2 from "node:http2";
import type { Server } from "node:net";
// Nothing else from src/ before main(): the probe must see the load order `tessera serve` has.
import { main } from "../src/main.js";

/**
 * Whether promise hooks are on in this process right now (some AsyncLocalStorage or async
 * hook enabled): with them off, code after an `await` runs with async id 0.
 */
async function promiseHooksActive(): Promise<boolean> {
  await null;
  return executionAsyncId() !== 0;
}

const report: Record<string, unknown> = { beforeStartup: await promiseHooksActive() };

// Migrations, default tenant and admin bootstrap run here: flushes and transactions.
const code = await main([
  "node",
  "tessera",
  "serve",
  "--insecure-plaintext",
  "--port",
  "0",
  "--database",
  process.env.PROBE_DB ?? "sqlite::memory:",
]);
report.serveExit = code;
report.scoped = (await import("../src/storage/orm-async-context.js")).ormStoragesScoped;
report.afterStartup = await promiseHooksActive();

// The HTTP/2 server `serve` left listening (the metrics endpoint is another, HTTP/1.1, server).
const handles = (process as unknown as { _getActiveHandles(): object[] })._getActiveHandles();
const h2 = Object.getPrototypeOf(http2.createServer());
const servers = handles.filter((h): h is Server => Object.getPrototypeOf(h) === h2);
if (servers.length !== 1) throw new Error(`expected one HTTP/2 server listening, found ${servers.length}`);
const { port } = servers[0]!.address() as { port: number };

// h2c with prior knowledge (the plaintext development mode serves HTTP/2 only).
const session = http2.connect(`http://127.0.0.1:${port}`);
function call(method: string, body: unknown, token?: string) {
  return new Promise<{ status: number; body: Record<string, unknown> }>((resolve, reject) => {
    const stream = session.request({
      ":method": "POST",
      ":path": `/tessera.v1.UserService/${method}`,
      "content-type": "application/json",
      ...(token ? { authorization: `Bearer ${token}` } : {}),
    });
    let status = 0;
    let text = "";
    stream.on("response", (headers) => {
      status = Number(headers[":status"]);
    });
    stream.setEncoding("utf8");
    stream.on("data", (chunk: string) => {
      text += chunk;
    });
    stream.on("end", () => resolve({ status, body: JSON.parse(text) as Record<string, unknown> }));
    stream.on("error", reject);
    stream.end(JSON.stringify(body));
  });
}

const login = await call("Login", { username: "admin", password: process.env.TESSERA_ADMIN_PASSWORD });
report.loginStatus = login.status;
const me = await call("GetCurrentUser", {}, String(login.body.accessToken));
report.meStatus = me.status;
report.me = me.body;
report.afterWrites = await promiseHooksActive();
session.close();
process.stdout.write(`${JSON.stringify(report)}\n`);
process.exit(0);
