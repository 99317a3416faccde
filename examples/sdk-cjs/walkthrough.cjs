// The README's SDK walkthrough from CommonJS, runnable as written (test/sdk-package.test.ts runs it):
//   npm install @tessera/sdk && TESSERA_ADMIN_PASSWORD=… node walkthrough.cjs
// The same settings as the ES module walkthrough: TESSERA_SERVER, TESSERA_CERT_FOLDER or TESSERA_CA_FILE.
const { mkdirSync, writeFileSync } = require("node:fs");
const { join } = require("node:path");
const { NotFoundError, TesseraClientError, UserAPI } = require("@tessera/sdk");
const { TenantService } = require("@tessera/sdk/gen/tessera/v1/tenant_service_pb.js");

async function main() {
  const password = process.env.TESSERA_ADMIN_PASSWORD;
  if (!password) throw new Error("set TESSERA_ADMIN_PASSWORD to the admin password printed at first start");
  const suffix = process.env.SUFFIX ?? `${Date.now()}-${process.pid}`;
  const secrets = join(process.env.TESSERA_SECRETS_DIR ?? join(__dirname, "..", ".secrets"), suffix);
  mkdirSync(secrets, { recursive: true, mode: 0o700 });

  const admin = UserAPI.fromEnvironment();
  try {
    await admin.login("admin", password);
    const tenants = admin.client(TenantService);
    const { tenant } = await tenants.createTenant({ name: `sdk-cjs-${suffix}` });
    console.log("tenant", tenant.name, "created");

    // an API key of the admin (the secret is in this response only), kept mode 0600
    const apiKey = await admin.tokens.createApiKey({ name: `sdk-cjs-${suffix}` });
    writeFileSync(join(secrets, "api-key.txt"), apiKey.key, { mode: 0o600 });

    // every failure is a TesseraClientError with a code, the server's reason and the request id
    try {
      await tenants.getTenant({ id: "00000000-0000-4000-8000-000000000000" });
    } catch (err) {
      if (!(err instanceof NotFoundError && err instanceof TesseraClientError)) throw err;
      console.log("not found:", err.reason, "request", err.requestId);
    }
  } finally {
    admin.close();
  }
  console.log("walkthrough done");
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
