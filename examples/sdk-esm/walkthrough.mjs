// The README's SDK walkthrough as an ES module, runnable as written (test/sdk-package.test.ts runs it):
//   npm install @tessera/sdk && TESSERA_ADMIN_PASSWORD=… node walkthrough.mjs
// Server and TLS come from the environment, like the CLI: TESSERA_SERVER (default localhost:50052),
// TESSERA_CERT_FOLDER (ca.crt, plus client.crt + client.key for mTLS) or TESSERA_CA_FILE, or a profile of
// ~/.tessera/credentials. Names get a unique suffix; the token it keeps goes under examples/.secrets/.
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { PermissionDeniedError, UserAPI } from "@tessera/sdk";
import { TenantService } from "@tessera/sdk/gen/tessera/v1/tenant_service_pb.js";

const password = process.env.TESSERA_ADMIN_PASSWORD;
if (!password) throw new Error("set TESSERA_ADMIN_PASSWORD to the admin password printed at first start");
const suffix = process.env.SUFFIX ?? `${Date.now()}-${process.pid}`;
const secrets = join(process.env.TESSERA_SECRETS_DIR ?? fileURLToPath(new URL("../.secrets", import.meta.url)), suffix);
mkdirSync(secrets, { recursive: true, mode: 0o700 });

// 1. the admin logs in; autoRefresh renews the short-lived access token by itself
const admin = UserAPI.fromEnvironment({ autoRefresh: true });
if (!(await admin.isAvailable())) throw new Error("Tessera is not serving");
await admin.login("admin", password);
console.log("logged in as", (await admin.getUser()).username);

// 2. a tenant, and a user in it who may only read clusters
const { tenant } = await admin.client(TenantService).createTenant({ name: `sdk-esm-${suffix}` });
await admin.users.createUser({
  username: "reader",
  password: "a long reader password",
  scopes: ["cluster:read"],
  tenantId: tenant.id,
});

// 3. the user logs in (naming its tenant) and keeps a personal access token: shown once, kept mode 0600
const reader = UserAPI.fromEnvironment();
await reader.login("reader", "a long reader password", { tenant: tenant.name });
console.log("reader may read clusters:", await reader.hasPermission("cluster:read"));
const pat = await reader.tokens.createPersonalAccessToken({ name: "CI", scopes: ["cluster:read"] });
writeFileSync(join(secrets, "reader-pat.txt"), pat.token, { mode: 0o600 });

// 4. typed errors: the reader may not list users
try {
  await reader.users.listUsers({});
  throw new Error("the reader listed users");
} catch (err) {
  if (!(err instanceof PermissionDeniedError)) throw err;
  console.log("denied:", err.reason, "needs", err.requiredScopes.join(" "));
}

// 5. the token alone is a credential
const ci = UserAPI.fromEnvironment({ token: pat.token });
console.log("the token belongs to", (await ci.getUser()).username);

for (const api of [admin, reader, ci]) api.close();
console.log("walkthrough done");
