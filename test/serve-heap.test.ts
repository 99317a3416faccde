import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";

/**
 * `tessera serve` turns V8's allocation-site pretenuring off before loading anything
 * (src/main.ts): with it on, a literal that startup allocated in bulk is allocated in the
 * old generation ever after, and a per-call copy of it keeps the call's young objects
 * alive through scavenges. The probe runs in a child process (V8's flags are per process):
 * it makes one literal's site hot with survivors until V8 would pretenure it, then counts
 * how many of 1000 new copies are born old.
 */
function bornOld(argv: string[]): number {
  const probe = `
    const { tuneHeapForServing } = await import("./src/main.ts");
    tuneHeapForServing(${JSON.stringify(argv)});
    function make(i) { return { i, next: null }; }
    const keep = [];
    for (let round = 0; round < 150; round++) {
      for (let i = 0; i < 20000; i++) keep.push(make(i));
      for (let i = 0; i < 20000; i++) new Array(16);
    }
    %PrepareFunctionForOptimization(make);
    make(1);
    %OptimizeFunctionOnNextCall(make);
    make(2);
    let old = 0;
    for (let i = 0; i < 1000; i++) if (!%InYoungGeneration(make(i))) old++;
    process.stdout.write(String(old));
  `;
  const out = execFileSync(
    process.execPath,
    ["--allow-natives-syntax", "--import", "tsx", "--input-type=module", "--eval", probe],
    { cwd: new URL("..", import.meta.url), encoding: "utf8" },
  );
  return Number(out.trim());
}

describe("the heap of `tessera serve`", () => {
  it("allocates per-call literals young whatever startup allocated (no pretenuring)", () => {
    expect(bornOld(["node", "tessera", "serve"])).toBe(0);
  }, 30_000);

  it("leaves V8's defaults to every other command", () => {
    // The same probe pretenures the literal when the flag is not set: what the test above relies on.
    expect(bornOld(["node", "tessera", "whoami"])).toBe(1000);
  }, 30_000);
});
