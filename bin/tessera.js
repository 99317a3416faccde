#!/usr/bin/env node
// Runs the TypeScript sources through tsx's loader when no build exists (development and
// `npm start`); the published package runs the compiled dist/ directly.
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

const dist = fileURLToPath(new URL("../dist/src/main.js", import.meta.url));
let mod;
if (existsSync(dist)) {
  mod = await import(dist);
} else {
  const { register } = await import("tsx/esm/api");
  register();
  mod = await import("../src/main.ts");
}
const code = await mod.main(process.argv);
if (code !== 0 || !process.argv.includes("serve")) process.exitCode = code;
