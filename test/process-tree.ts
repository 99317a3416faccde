import { readdirSync, readFileSync } from "node:fs";

/**
 * The processes below `root` (children first, then theirs), read from /proc: what a stalled
 * test worker or run leaves behind (servers, CLIs, h2load), to be named and killed. Empty
 * where /proc is missing.
 */
export function descendants(root: number): number[] {
  const children = new Map<number, number[]>();
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return [];
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      // The command name (in parentheses) may hold spaces: the parent id follows its ")".
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(entry));
      children.set(ppid, list);
    } catch {
      // Gone meanwhile.
    }
  }
  const found: number[] = [];
  const queue = [root];
  while (queue.length > 0) {
    for (const child of children.get(queue.shift()!) ?? []) {
      found.push(child);
      queue.push(child);
    }
  }
  return found;
}

/** One line per process: its id, parent, age in seconds and command line (for a report). */
export function describeProcesses(pids: number[]): string {
  return pids
    .map((pid) => {
      try {
        const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ").trim();
        const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
        const ppid = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1];
        return `  ${pid} (parent ${ppid}) ${cmd.slice(0, 200)}`;
      } catch {
        return `  ${pid} (gone)`;
      }
    })
    .join("\n");
}

/** SIGKILL each of `pids`, ignoring those already gone. */
export function killAll(pids: number[]): void {
  for (const pid of pids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  }
}
