/**
 * An interleaved A/B of Tessera's server CPU per request against an earlier checkout:
 *
 *   npx tsx bench/ab.ts --base <checkout> [--pairs 2] [--out <dir>] -- <npm run bench arguments>
 *
 * Runs `bench/run.ts` alternately with `--server-root <checkout>` (base) and without (new),
 * `--pairs` times each, so that drift of the machine over the run falls on both sides alike,
 * then prints one table: every run's CPU µs per request for each scenario and protocol, and
 * new/base of the means. The reference servers (bare, raw) run from this checkout on both
 * sides; their rows show how far the machine itself moved between runs.
 */
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");

interface Row {
  id: string;
  label: string;
  protocol: string;
  cpuUsPerRequest: number | null;
  rps: number;
}

const dash = process.argv.indexOf("--");
const own = dash < 0 ? process.argv.slice(2) : process.argv.slice(2, dash);
const benchArgs = dash < 0 ? [] : process.argv.slice(dash + 1);
const { values } = parseArgs({
  args: own,
  options: {
    base: { type: "string" },
    pairs: { type: "string", default: "2" },
    out: { type: "string" },
  },
});
if (!values.base) {
  console.error("usage: npx tsx bench/ab.ts --base <checkout> [--pairs N] [--out DIR] -- <bench args>");
  process.exit(2);
}
const base = resolve(values.base);
const pairs = Number(values.pairs);
const out = values.out ? resolve(values.out) : mkdtempSync(join(tmpdir(), "tessera-ab-"));
mkdirSync(out, { recursive: true });

function runOnce(side: "base" | "new", n: number): Row[] {
  const dir = join(out, `${side}-${n}`);
  const args = ["--import", "tsx", join(ROOT, "bench", "run.ts"), ...benchArgs, "--out", dir];
  if (side === "base") args.push("--server-root", base);
  const load = readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
  console.error(`${new Date().toISOString()} ${side} run ${n} (load ${load})`);
  const r = spawnSync(process.execPath, args, { cwd: ROOT, stdio: ["ignore", "ignore", "inherit"] });
  if (r.status !== 0) throw new Error(`${side} run ${n} exited ${r.status}`);
  const json = readdirSync(dir).find((f) => f.endsWith(".json"));
  if (!json) throw new Error(`${side} run ${n} wrote no report in ${dir}`);
  return (JSON.parse(readFileSync(join(dir, json), "utf8")) as { results: Row[] }).results;
}

const runs: { side: "base" | "new"; rows: Row[] }[] = [];
for (let i = 1; i <= pairs; i++) {
  // Alternate which side goes first, so neither always gets the warmer (or cooler) slot.
  const order: ("base" | "new")[] = i % 2 === 1 ? ["base", "new"] : ["new", "base"];
  for (const side of order) runs.push({ side, rows: runOnce(side, i) });
}

const keys = new Map<string, { label: string; protocol: string }>();
for (const run of runs) for (const r of run.rows) keys.set(`${r.id}/${r.protocol}`, r);
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
const lines = [
  `| scenario | protocol | base CPU µs/req (each run) | new CPU µs/req (each run) | new/base (means) |`,
  `| --- | --- | ---: | ---: | ---: |`,
];
for (const [key, { label, protocol }] of keys) {
  const side = (s: "base" | "new") =>
    runs
      .filter((r) => r.side === s)
      .map((r) => r.rows.find((x) => `${x.id}/${x.protocol}` === key)?.cpuUsPerRequest)
      .filter((v): v is number => typeof v === "number");
  const b = side("base");
  const n = side("new");
  const ratio = b.length && n.length ? `${Math.round((mean(n) / mean(b)) * 1000) / 10} %` : "–";
  const fmt = (xs: number[]) => xs.map((x) => Math.round(x)).join(", ") || "–";
  lines.push(`| ${label} | ${protocol} | ${fmt(b)} | ${fmt(n)} | ${ratio} |`);
}
const table = `${lines.join("\n")}\n`;
writeFileSync(join(out, "ab.md"), `base: ${base}\nbench arguments: ${benchArgs.join(" ")}\n\n${table}`);
process.stdout.write(table);
