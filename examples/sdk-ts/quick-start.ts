// The README's first SDK snippet, runnable as written from a TypeScript project that is an ES
// module ("type": "module") or CommonJS (the default): no top-level await, an async main.
// test/sdk-package.test.ts runs it both ways (tsx) against a fresh server, from a project where
// only the packed @tessera/sdk is installed, and type-checks it as .mts and as .cts.
//
//   TESSERA_ADMIN_PASSWORD=… TESSERA_CERT_FOLDER=certs npx tsx quick-start.ts
//
// Settings (environment): TESSERA_ADMIN_PASSWORD, TESSERA_SERVER (localhost:50052),
// TESSERA_CERT_FOLDER (a folder with ca.crt, e.g. certs, or one from `tessera certs client`).
import { PermissionDeniedError, RateLimitedError, TokenExpiredError, UserAPI } from "@tessera/sdk";
import { TenantService } from "@tessera/sdk/gen/tessera/v1/tenant_service_pb.js";

async function main(): Promise<void> {
  // From TESSERA_SERVER and TESSERA_CERT_FOLDER, or explicitly: new UserAPI({ host: "localhost", port: 50052,
  // certFolder: "certs", autoRefresh: true }). The cert folder's ca.crt verifies the server; client.crt +
  // client.key, when present, are sent for mTLS. Without one the system roots verify the server (or caFile).
  // protocol: "grpc" (default) or "connect".
  const api = UserAPI.fromEnvironment({ autoRefresh: true });
  try {
    if (!(await api.isAvailable())) throw new Error("Tessera is not serving"); // never throws
    await api.login("admin", process.env.TESSERA_ADMIN_PASSWORD!); // or new UserAPI({ token, ... })
    // await api.login("alice", password, { tenant: "acme" });  // the user's tenant, by name or id
    const user = await api.getUser(); // { id, username, tenantId, permissions, clientCertificate }
    console.log("logged in as", user.username);
    if (await api.hasPermission("cluster:read")) console.log("may read clusters"); // wildcards: "cluster:*", "*"

    // a typed client per service: api.users, api.tokens, api.tenants, api.machineUsers, api.audit, api.health, api.client(any)
    const { token } = await api.tokens.createPersonalAccessToken({ name: "CI", scopes: ["cluster:read"] });
    console.log("a personal access token, shown once:", token.length, "characters"); // keep it, never log it
    const { tenants } = await api.client(TenantService).listTenants({});
    console.log("tenants:", tenants.map((t) => t.name).join(" "));

    try {
      await api.users.listUsers({});
    } catch (err) {
      if (err instanceof PermissionDeniedError) console.log(err.reason, err.requiredScopes, err.requestId);
      else if (err instanceof RateLimitedError) console.log(`retry in ${err.retryAfter}s`);
      else if (err instanceof TokenExpiredError) await api.refreshToken(); // autoRefresh does this by itself
      else throw err;
    }
  } finally {
    api.close();
  }
  console.log("walkthrough done");
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
