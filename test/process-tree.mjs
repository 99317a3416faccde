import { readdirSync, readFileSync } from "node:fs";

// Plain JavaScript, so that the watchdog's thread (test/watchdog-thread.mjs), which runs
// outside Vitest's TypeScript transform, walks the same tree as the reporters do.

/**
 * The processes below `root` (children first, then theirs), read from /proc: what a stalled
 * test worker or run leaves behind (servers, CLIs, h2load), to be named and killed. Empty
 * where /proc is missing.
 * @param {number} root
 * @returns {number[]}
 */
export function descendants(root) {
  /** @type {Map<number, number[]>} */
  const children = new Map();
  /** @type {string[]} */
  let entries;
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
  /** @type {number[]} */
  const found = [];
  const queue = [root];
  while (queue.length > 0) {
    for (const child of children.get(/** @type {number} */ (queue.shift())) ?? []) {
      found.push(child);
      queue.push(child);
    }
  }
  return found;
}

/**
 * One line per process: its id, parent and command line (for a report).
 * @param {number[]} pids
 * @returns {string}
 */
export function describeProcesses(pids) {
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

/**
 * SIGKILL each of `pids`, ignoring those already gone.
 * @param {number[]} pids
 */
export function killAll(pids) {
  for (const pid of pids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  }
}
