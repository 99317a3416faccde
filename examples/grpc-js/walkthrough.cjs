// The README's grpc-js walkthrough, runnable as written (test/sdk-package.test.ts runs it): plain
// @grpc/grpc-js with the .proto files that @tessera/sdk ships, loaded by @grpc/proto-loader.
//   npm install @tessera/sdk @grpc/grpc-js @grpc/proto-loader && TESSERA_ADMIN_PASSWORD=… node walkthrough.cjs
// Settings: TESSERA_SERVER (localhost:50052) and TESSERA_CERT_FOLDER (ca.crt, plus client.crt + client.key for mTLS).
const { existsSync, readFileSync } = require("node:fs");
const { dirname, join } = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

// The protos' root folder: node_modules/@tessera/sdk/proto (other languages' generators take it as an include path).
const protoDir = join(dirname(require.resolve("@tessera/sdk/package.json")), "proto");
const definition = protoLoader.loadSync(["tessera/v1/user_service.proto", "grpc/health/v1/health.proto"], {
  includeDirs: [protoDir],
  enums: String,
});
const proto = grpc.loadPackageDefinition(definition);

const password = process.env.TESSERA_ADMIN_PASSWORD;
if (!password) throw new Error("set TESSERA_ADMIN_PASSWORD to the admin password printed at first start");
const server = process.env.TESSERA_SERVER ?? "localhost:50052";
const certs = process.env.TESSERA_CERT_FOLDER ?? "certs";
const file = (name) => (existsSync(join(certs, name)) ? readFileSync(join(certs, name)) : null);
const credentials = grpc.credentials.createSsl(file("ca.crt"), file("client.key"), file("client.crt"));

const users = new proto.tessera.v1.UserService(server, credentials);
const health = new proto.grpc.health.v1.Health(server, credentials);
const call = (client, method, request, metadata = new grpc.Metadata()) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata, (err, response) => (err ? reject(err) : resolve(response))),
  );

async function main() {
  console.log("health:", (await call(health, "Check", { service: "" })).status);
  const login = await call(users, "Login", { username: "admin", password });
  const bearer = new grpc.Metadata();
  bearer.set("authorization", `Bearer ${login.accessToken}`);
  const me = await call(users, "GetCurrentUser", {}, bearer);
  console.log("logged in as", me.username, "with", me.permissions.join(" "));
  try {
    await call(users, "GetCurrentUser", {});
    throw new Error("a call without a token was answered");
  } catch (err) {
    if (err.code !== grpc.status.UNAUTHENTICATED) throw err;
    console.log("without a token:", grpc.status[err.code]);
  }
  users.close();
  health.close();
  console.log("walkthrough done");
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
