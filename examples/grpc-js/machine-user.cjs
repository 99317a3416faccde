// The README's backend in another language: a machine user's client certificate alone (bound to
// it with BindCertificate) and the .proto files shipped in @tessera/sdk, through @grpc/grpc-js.
// test/sdk-package.test.ts runs it against a fresh server, from a project where only the packed
// @tessera/sdk, @grpc/grpc-js and @grpc/proto-loader are installed.
//
//   TESSERA_SERVER=localhost:50052 TESSERA_CERT_FOLDER=./payments-backend node machine-user.cjs
//
// Settings (environment): TESSERA_SERVER, TESSERA_CERT_FOLDER (client.crt, client.key and ca.crt,
// as `tessera certs client` writes them; the certificate bound to a machine user).
const { readFileSync } = require("node:fs");
const { dirname, join } = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protoDir = join(dirname(require.resolve("@tessera/sdk/package.json")), "proto");
const def = protoLoader.loadSync("tessera/v1/machine_user_service.proto", { includeDirs: [protoDir], keepCase: true });
const { tessera } = grpc.loadPackageDefinition(def);
const certs = process.env.TESSERA_CERT_FOLDER ?? "payments-backend";
const file = (name) => readFileSync(join(certs, name));
const client = new tessera.v1.MachineUserService(
  process.env.TESSERA_SERVER ?? "tessera.internal:50052",
  grpc.credentials.createSsl(file("ca.crt"), file("client.key"), file("client.crt")),
);
client.CheckAuthentication({}, (err, res) => {
  client.close();
  if (err) {
    console.error(err);
    process.exitCode = 1;
    return;
  }
  console.log(res); // { authenticated: true, machine_user_id, tenant_id, message }
  console.log("walkthrough done");
});
