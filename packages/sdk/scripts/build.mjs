// Builds @tessera/sdk from the repository's sources (src/sdk, the shared src/auth/scopes.ts
// and src/auth/repeated-authorization.ts, gen/): an ES module build and a CommonJS build of the same files,
// each with its declarations, plus the .proto files, their compiled descriptor set and the licence. Run by `npm pack`
// (prepack) in this folder, or `npm run build:sdk` at the root.
import { execFileSync } from "node:child_process";
import { cpSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const pkg = fileURLToPath(new URL("..", import.meta.url));
const root = fileURLToPath(new URL("../../..", import.meta.url));
// The repository's TypeScript: this package has no devDependencies of its own.
const tsc = createRequire(`${root}/package.json`).resolve("typescript/bin/tsc");

for (const out of ["dist", "proto", "LICENSE"]) rmSync(`${pkg}/${out}`, { recursive: true, force: true });
for (const config of ["tsconfig.esm.json", "tsconfig.cjs.json"]) {
  execFileSync(process.execPath, [tsc, "-p", config], { cwd: pkg, stdio: "inherit" });
}
// The nearest package.json decides how Node reads a .js file: the CommonJS build says so.
writeFileSync(`${pkg}/dist/cjs/package.json`, `${JSON.stringify({ type: "commonjs" })}\n`);
writeFileSync(`${pkg}/dist/esm/package.json`, `${JSON.stringify({ type: "module" })}\n`);
cpSync(`${root}/proto`, `${pkg}/proto`, { recursive: true });
// The protos compiled (a google.protobuf.FileDescriptorSet, imports included, no comments),
// for clients whose protobuf runtime loads descriptors but cannot parse .proto files: the
// Python walkthrough (examples/python) reads it, so it needs neither protoc nor grpc_tools.
const buf = createRequire(`${root}/package.json`).resolve("@bufbuild/buf/bin/buf");
execFileSync(
  process.execPath,
  [buf, "build", "--as-file-descriptor-set", "--exclude-source-info", "-o", `${pkg}/proto/tessera.binpb`],
  { cwd: root, stdio: "inherit" },
);
cpSync(`${root}/LICENSE`, `${pkg}/LICENSE`);

// The versions must be the root package's: one release, one set of runtimes.
const rootManifest = JSON.parse(readFileSync(`${root}/package.json`, "utf8"));
const manifest = JSON.parse(readFileSync(`${pkg}/package.json`, "utf8"));
if (manifest.version !== rootManifest.version) {
  throw new Error(`@tessera/sdk is ${manifest.version}, the repository ${rootManifest.version}`);
}
for (const [name, range] of Object.entries(manifest.dependencies)) {
  if (rootManifest.dependencies[name] !== range) {
    throw new Error(`@tessera/sdk depends on ${name}@${range}, the repository on ${rootManifest.dependencies[name]}`);
  }
}
