#!/usr/bin/env node
// In a source checkout (src/main.ts present) this runs the TypeScript sources through
// tsx's loader, so `npm start`, `npx tessera` and the tests never run a stale build left
// in dist/ by `npm run build` or `npm pack`. The published package ships no src/ and runs
// the compiled dist/. TESSERA_USE_DIST=1 forces dist/ in a checkout (to try a build).
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

const dist = fileURLToPath(new URL("../dist/src/main.js", import.meta.url));
const sources = fileURLToPath(new URL("../src/main.ts", import.meta.url));
const useDist = existsSync(dist) && (!existsSync(sources) || process.env.TESSERA_USE_DIST === "1");
let mod;
if (useDist) {
  mod = await import(dist);
} else {
  const { register } = await import("tsx/esm/api");
  register();
  mod = await import("../src/main.ts");
}
// How the process ends after the command (src/main.ts: a failure at once, `serve` runs on,
// any other command as soon as its output is written).
mod.finish(await mod.main(process.argv), process.argv);
