/** The processes below `root` (children first, then theirs); empty where /proc is missing. */
export function descendants(root: number): number[];
/** One line per process: its id, parent and command line (for a report). */
export function describeProcesses(pids: number[]): string;
/** SIGKILL each of `pids`, ignoring those already gone. */
export function killAll(pids: number[]): void;
