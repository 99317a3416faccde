/**
 * The authentication path's state reads of two checkouts, side by side in one process: the
 * personal-access-token verifier's `verify` and the user claims loader for a JWT with a
 * session (each answers synchronously when the state cache keeps the row; a checkout from
 * before issue 19 answered with a promise there), each over the same SQLite database and state
 * cache, in interleaved blocks so that whatever else loads the machine weighs on both alike.
 *
 * Why: a change that moves these reads behind repositories must not make them dearer, and
 * end-to-end CPU per request on a shared VM drifts by more than the difference looked for.
 * This isolates the code that changed (statement, cache look-up, row mapping, checks).
 *
 *   npx tsx bench/state-reads-ab.ts --base <checkout before the change> [--blocks 15] [--calls 20000]
 *
 * The checkout compared against is imported from source; it must take `sql` (a SqlRunner)
 * where this one takes repositories, as before storage moved behind repositories.
 */

import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { createClient, createRouterTransport } from "@connectrpc/connect";
import pino from "pino";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { createApp } from "../src/app.js";
import { createApiTokenVerifier } from "../src/auth/token-verifier.js";
import { createUserClaimsLoader } from "../src/auth/user-principal.js";
import { loadConfig } from "../src/config.js";
import type { RequestState } from "../src/context.js";
import { CredentialRepository } from "../src/storage/repositories/credentials.js";
import { UserStateRepository } from "../src/storage/repositories/subject-state.js";

const { values: flags } = parseArgs({
  options: {
    base: { type: "string" },
    blocks: { type: "string", default: "15" },
    calls: { type: "string", default: "20000" },
  },
});
if (!flags.base) throw new Error("--base <checkout> is required");
const base = resolve(flags.base);
const blocks = Number(flags.blocks);
const calls = Number(flags.calls);
const load = (path: string) => import(pathToFileURL(join(base, path)).href);
const baseVerifier = await load("src/auth/token-verifier.ts");
const baseUsers = await load("src/auth/user-principal.ts");

const PASSWORD = "bench-admin-password";
const app = await createApp(
  loadConfig({
    env: {},
    overrides: {
      database: { url: "sqlite::memory:" },
      admin: { password: PASSWORD },
      auth: { passwordIterations: 1000, hashNice: 0, hashIdle: false, hashDeadlineMs: 0 },
      rateLimit: { enabled: false },
      log: { level: "silent" },
    },
  }),
  { logger: pino({ level: "silent" }) },
);
const transport = createRouterTransport(app.routes, { router: { interceptors: app.interceptors } });
const bearer = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });
const { accessToken } = await createClient(UserService, transport).login({
  username: "admin",
  password: PASSWORD,
});
const pat = (
  await createClient(TokenService, transport).createPersonalAccessToken(
    { name: "bench" },
    bearer(accessToken),
  )
).token;
// One use through the app: the verified-secret cache then knows the token's secret.
await createClient(UserService, transport).getCurrentUser({}, bearer(pat));
const claims = JSON.parse(Buffer.from(accessToken.split(".")[1]!, "base64url").toString("utf8"));

const tokenOptions = {
  secrets: app.secrets,
  lastUsed: { mark() {} },
  patPrefix: app.config.auth.tokens.patPrefix,
  apiKeyPrefix: app.config.auth.tokens.apiKeyPrefix,
  otherPrefixes: [app.config.auth.tokens.machinePrefix],
};
const candidates = {
  base: {
    pat: baseVerifier.createApiTokenVerifier({ sql: app.sql, ...tokenOptions }),
    jwt: baseUsers.createUserClaimsLoader(new baseUsers.UserStateReader(app.sql)),
  },
  new: {
    pat: createApiTokenVerifier({ credentials: new CredentialRepository(app.sql), ...tokenOptions }),
    jwt: createUserClaimsLoader(new UserStateRepository(app.sql)),
  },
};
type Path = "pat" | "jwt";
const state = (): RequestState => ({
  requestId: "bench",
  ip: "127.0.0.1",
  certificate: null,
  principal: null,
});

function block(which: "base" | "new", path: Path): number {
  const c = candidates[which];
  const s = state();
  // CPU time, not wall time: on a VM loaded far past its cores, wall time is mostly waiting.
  const start = process.cpuUsage();
  for (let i = 0; i < calls; i++) {
    const p = path === "pat" ? c.pat.verify(pat, s) : c.jwt(claims, s);
    if (!p) throw new Error(`${which} ${path}: no principal`);
  }
  const used = process.cpuUsage(start);
  return ((used.user + used.system) * 1000) / calls;
}

/** The same, through the asynchronous path (what admission takes when a rate limit is counted). */
async function asyncBlock(which: "base" | "new", path: Path): Promise<number> {
  const c = candidates[which];
  const s = state();
  const start = process.cpuUsage();
  for (let i = 0; i < calls; i++) {
    const p = path === "pat" ? await c.pat.verify(pat, s) : await c.jwt(claims, s);
    if (!p) throw new Error(`${which} ${path}: no principal`);
  }
  const used = process.cpuUsage(start);
  return ((used.user + used.system) * 1000) / calls;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
console.log("| path | base CPU ns/call (median) | new CPU ns/call (median) | new/base |");
console.log("| --- | ---: | ---: | ---: |");
for (const [name, run] of [
  ["pat", (w: "base" | "new") => block(w, "pat")],
  ["jwt", (w: "base" | "new") => block(w, "jwt")],
  ["pat async", (w: "base" | "new") => asyncBlock(w, "pat")],
  ["jwt async", (w: "base" | "new") => asyncBlock(w, "jwt")],
] as const) {
  const ns = { base: [] as number[], new: [] as number[] };
  await run("base");
  await run("new"); // warm-up of both
  for (let b = 0; b < blocks; b++) {
    const order = b % 2 === 0 ? (["base", "new"] as const) : (["new", "base"] as const);
    for (const which of order) ns[which].push(await run(which));
  }
  const bm = median(ns.base);
  const nm = median(ns.new);
  console.log(`| ${name} | ${bm.toFixed(0)} | ${nm.toFixed(0)} | ${(nm / bm).toFixed(3)} |`);
}
await app.close();
