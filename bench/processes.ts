import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";

/** A server the bench started as a child process. */
export interface ServerProcess {
  name: string;
  pid: number;
  /** https://127.0.0.1:<port> */
  url: string;
  /** Resident set size now (VmRSS), in KiB. */
  rssKb(): number;
  /** CPU time used so far (user + system, all threads), in ms. */
  cpuMs(): number;
  /** The last lines it wrote (for error reports). */
  logTail(): string;
  stop(): Promise<void>;
}

/** How to start one server and recognise that it listens. */
export interface StartOptions {
  name: string;
  command: string;
  args: string[];
  cwd: string;
  env: NodeJS.ProcessEnv;
  /** Given each output line, the URL once the server announces it listens. */
  ready(line: string): string | null;
  timeoutMs?: number;
  /** CPU list (taskset syntax) the process and all its threads are confined to. */
  cpus?: string | undefined;
  /**
   * Every line the process writes, from its start (e.g. V8's --trace-gc-nvp lines, or what
   * V8 traces while the server starts, such as its pretenuring decisions).
   */
  onLine?: ((line: string) => void) | undefined;
}

/**
 * The environment of a measured Tessera server: the caller's without any TESSERA_* setting
 * (none leaks into the measurement), then what every bench server shares (loopback, a free
 * port and metrics port, SQLite in `dataDir`, access tokens valid 2 h, hashing at nice 0
 * without a deadline unless `hashDefaults`), then `extra`.
 */
export function benchServerEnv(
  settings: { dataDir: string; certDir: string; adminPassword: string; hashDefaults?: boolean },
  extra: Record<string, string>,
): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith("TESSERA_")),
  );
  return Object.assign(env, {
    TESSERA_HOST: "127.0.0.1",
    TESSERA_PORT: "0",
    TESSERA_DATABASE_URL: `sqlite:${join(settings.dataDir, "tessera.db")}`,
    TESSERA_CERT_DIR: settings.certDir,
    TESSERA_ADMIN_PASSWORD: settings.adminPassword,
    TESSERA_RATE_LIMIT: "false",
    TESSERA_ACCESS_TOKEN_TTL: "7200",
    // A free port each: several servers run at once here (and other runs on the machine).
    TESSERA_METRICS_LISTEN: "127.0.0.1:0",
    // Hashing at the event loop's priority, without a deadline, except where a scenario
    // measures the defaults (the flood): seeding must not depend on what else loads the
    // machine (at nice 19 with a deadline, hashes on a busy machine are refused with 503, by
    // design), and under valgrind, which runs one thread at a time, a nice-19 hash thread
    // holding that turn stalled a server's start past 15 minutes.
    ...(settings.hashDefaults
      ? {}
      : { TESSERA_HASH_NICE: "0", TESSERA_HASH_IDLE: "false", TESSERA_HASH_DEADLINE_MS: "0" }),
    ...extra,
  });
}

/** A /proc/<pid>/status field in KiB (Linux), or NaN. */
export function procStatusKb(pid: number, field: "VmRSS" | "VmHWM"): number {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** CPU time (user + system) of a process so far, in ms, from /proc/<pid>/stat (clock ticks of 10 ms). */
export function procCpuMs(pid: number): number {
  return statCpuMs(`/proc/${pid}/stat`);
}

/**
 * CPU time of one thread of a process so far, in ms: `tid` = `pid` is the main thread
 * (Node's event loop), so the rest of the process's CPU is its other threads' (hashing,
 * libuv pool, GC helpers).
 */
export function procThreadCpuMs(pid: number, tid: number): number {
  return statCpuMs(`/proc/${pid}/task/${tid}/stat`);
}

/** The whole machine's CPU time so far (all CPUs), in ms, from /proc/stat: busy (with niced), niced alone, and idle. */
export function machineCpuMs(): { busy: number; nice: number; idle: number } {
  try {
    const line = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!;
    // cpu  user nice system idle iowait irq softirq steal …  (clock ticks of 10 ms)
    const [user, nice, system, idle, iowait, irq, softirq, steal] = line
      .trim()
      .split(/\s+/)
      .slice(1)
      .map(Number);
    return {
      busy: (user! + nice! + system! + irq! + softirq! + steal!) * 10,
      nice: nice! * 10,
      idle: (idle! + iowait!) * 10,
    };
  } catch {
    return { busy: Number.NaN, nice: Number.NaN, idle: Number.NaN };
  }
}

function statCpuMs(path: string): number {
  try {
    const stat = readFileSync(path, "utf8");
    // Fields after the command name (which may contain spaces) start after the last ")".
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return Number.NaN;
  }
}

/** Start a server process and wait until it announces its URL. */
export async function startServerProcess(options: StartOptions): Promise<ServerProcess> {
  // taskset execs the command in place: the pid (CPU and RSS readings) is the server's own.
  const [command, args] = options.cpus
    ? ["taskset", ["-c", options.cpus, options.command, ...options.args]]
    : [options.command, options.args];
  const child: ChildProcess = spawn(command, args, {
    cwd: options.cwd,
    env: options.env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const tail: string[] = [];
  let exited: string | null = null;
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(
      () =>
        reject(
          new Error(
            `${options.name} did not start within ${options.timeoutMs ?? 60_000} ms:\n${tail.join("\n")}`,
          ),
        ),
      options.timeoutMs ?? 60_000,
    );
    let started = false;
    const onLine = (line: string) => {
      tail.push(line.length > 500 ? `${line.slice(0, 500)}…` : line);
      if (tail.length > 40) tail.shift();
      // Once started, lines (an access line per request) are only kept for the tail: parsing
      // each would take CPU from the load generators.
      options.onLine?.(line);
      if (started) return;
      const found = options.ready(line);
      if (found) {
        started = true;
        clearTimeout(timer);
        resolve(found);
      }
    };
    for (const stream of [child.stdout!, child.stderr!]) {
      let buffered = "";
      stream.setEncoding("utf8");
      stream.on("data", (chunk: string) => {
        buffered += chunk;
        let nl = buffered.indexOf("\n");
        while (nl >= 0) {
          onLine(buffered.slice(0, nl));
          buffered = buffered.slice(nl + 1);
          nl = buffered.indexOf("\n");
        }
      });
    }
    child.once("exit", (code, signal) => {
      exited = `exited with ${signal ?? code}`;
      clearTimeout(timer);
      reject(new Error(`${options.name} ${exited} before listening:\n${tail.join("\n")}`));
    });
    child.once("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
  const pid = child.pid!;
  return {
    name: options.name,
    pid,
    url,
    rssKb: () => procStatusKb(pid, "VmRSS"),
    cpuMs: () => procCpuMs(pid),
    logTail: () => tail.join("\n"),
    async stop() {
      if (exited !== null) return;
      await new Promise<void>((resolve) => {
        const force = setTimeout(() => child.kill("SIGKILL"), 10_000);
        child.once("exit", () => {
          clearTimeout(force);
          resolve();
        });
        child.kill("SIGTERM");
      });
    },
  };
}

/** Samples a process's RSS while a scenario runs; `stop()` returns the peak in KiB. */
export function sampleRss(pid: number, intervalMs = 200): { stop(): number } {
  let peak = procStatusKb(pid, "VmRSS");
  const timer = setInterval(() => {
    const now = procStatusKb(pid, "VmRSS");
    if (now > peak || Number.isNaN(peak)) peak = now;
  }, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      const now = procStatusKb(pid, "VmRSS");
      return Math.max(peak, now);
    },
  };
}
