/**
 * The heap allocation of a server between two marks, for `bench/instructions.ts --tool gc`.
 *
 * The server runs with V8's `--trace-gc-nvp` (one line per collection, with the bytes
 * allocated since the previous one and the bytes it promoted to the old generation) and with
 * the probe below loaded before its code: on SIGUSR2 it collects garbage (`gc()`, hence
 * `--expose-gc`) and prints a mark, so the collections between two marks account for exactly
 * the bytes allocated between them. Bytes allocated do not depend on the machine's load.
 *
 * With GC_PROBE_HEAP_PROFILE set (a folder), the probe also runs V8's sampling heap profiler
 * between the marks, keeping the samples of objects already collected, so that the profile
 * says which functions allocate (not which hold memory); `topAllocators` sums it by function.
 * With GC_PROBE_PROMOTED=1 too (`--env GC_PROBE_PROMOTED=1`), the samples of objects a
 * scavenge collected are dropped: what is left was promoted (or still lives), the objects
 * that grow the old generation.
 */
import { readFileSync } from "node:fs";

/** The probe (plain JavaScript, loaded with `node --import`). */
export const GC_PROBE = `
import { writeFileSync } from "node:fs";
import { Session } from "node:inspector";
const folder = process.env.GC_PROBE_HEAP_PROFILE;
const interval = Number(process.env.GC_PROBE_INTERVAL || 512);
let session = null;
let marks = 0;
process.on("SIGUSR2", () => {
  marks++;
  if (folder && session) {
    const s = session;
    session = null;
    s.post("HeapProfiler.stopSampling", (err, result) => {
      if (!err) writeFileSync(folder + "/mark-" + marks + ".heapprofile", JSON.stringify(result.profile));
      s.disconnect();
      globalThis.gc();
      process.stdout.write("gc-probe: mark " + marks + "\\n");
    });
    return;
  }
  globalThis.gc();
  if (folder) {
    session = new Session();
    session.connect();
    session.post("HeapProfiler.enable");
    session.post("HeapProfiler.startSampling", {
      samplingInterval: interval,
      includeObjectsCollectedByMajorGC: true,
      includeObjectsCollectedByMinorGC: !process.env.GC_PROBE_PROMOTED,
    });
  }
  process.stdout.write("gc-probe: mark " + marks + "\\n");
});
`;

/** The collections between two marks. */
export interface GcWindow {
  /** Bytes allocated on the JavaScript heap (the sum of the collections' `allocated`). */
  allocated: number;
  /** Bytes the scavenges promoted to the old generation. */
  promoted: number;
  scavenges: number;
  markCompacts: number;
}

/** Sums the `--trace-gc-nvp` lines after the line `gc-probe: mark <from>` up to the mark after it. */
export function gcWindow(lines: readonly string[], from: number): GcWindow {
  const start = lines.indexOf(`gc-probe: mark ${from}`);
  const end = lines.indexOf(`gc-probe: mark ${from + 1}`);
  if (start < 0 || end < 0) throw new Error(`marks ${from} and ${from + 1} not both seen`);
  const window: GcWindow = { allocated: 0, promoted: 0, scavenges: 0, markCompacts: 0 };
  for (const line of lines.slice(start + 1, end)) {
    const kind = / gc=(\w+) /.exec(line)?.[1];
    if (kind === undefined) continue;
    window.allocated += Number(/ allocated=(\d+)/.exec(line)?.[1] ?? 0);
    if (kind === "s") {
      window.scavenges++;
      window.promoted += Number(/ promoted=(\d+)/.exec(line)?.[1] ?? 0);
    } else if (kind === "mc") window.markCompacts++;
  }
  return window;
}

interface ProfileNode {
  callFrame: { functionName: string; url: string; lineNumber: number };
  selfSize: number;
  children: ProfileNode[];
}

/** The functions allocating most in a `.heapprofile`, as [name at file:line, share of the bytes]. */
export function topAllocators(file: string, count = 30): Array<[string, number]> {
  const profile = JSON.parse(readFileSync(file, "utf8")) as { head: ProfileNode };
  const bytes = new Map<string, number>();
  let total = 0;
  const walk = (node: ProfileNode) => {
    const { functionName, url, lineNumber } = node.callFrame;
    const where = `${functionName || "(anonymous)"} ${url.replace(/^.*\/(dist|node_modules)\//, "$1/")}:${lineNumber + 1}`;
    bytes.set(where, (bytes.get(where) ?? 0) + node.selfSize);
    total += node.selfSize;
    for (const child of node.children) walk(child);
  };
  walk(profile.head);
  return [...bytes]
    .sort((a, b) => b[1] - a[1])
    .slice(0, count)
    .map(([where, n]) => [where, Math.round((n / total) * 1000) / 10]);
}
