import { mkdirSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ReportedHookContext, Reporter, TestCase, TestModule } from "vitest/node";
import { descendants, describeProcesses, killAll } from "./process-tree.mjs";

/**
 * A reporter that ends a test file which has stopped reporting (vitest.config.ts).
 *
 * Vitest has no bound on a whole file: a worker whose tests neither end nor time out (its
 * event loop blocked where the watchdog thread of test/watchdog.ts could not end it, a wait
 * outside any test or hook, a worker that lost its channel) holds the run open until CI
 * kills it, with no summary and no name. When a file has reported nothing (no test or hook
 * starting or ending) for TESSERA_TEST_FILE_STALL_SECONDS (default 300) past the timeout of
 * what it runs (the test's own, else the hook timeout), this names it and the processes
 * under the run, and kills its worker and everything under that: Vitest then reports the
 * file failed ("Worker exited unexpectedly") and goes on to its summary. A worker it cannot
 * find (no file in TESSERA_TEST_WORKERS_DIR names it) is not guessed at: the run is ended,
 * failed.
 */
export default class StallReporter implements Reporter {
  private readonly marginMs = Number(process.env.TESSERA_TEST_FILE_STALL_SECONDS || 300) * 1000;
  private readonly dir = join(tmpdir(), `tessera-test-workers-${process.pid}`);
  /** Running files: when each last reported anything, what, and how long it may then be silent. */
  private readonly last = new Map<
    string,
    { module: TestModule; at: number; what: string; limitMs: number }
  >();
  private timer: NodeJS.Timeout | undefined;

  constructor() {
    // Workers are forked after reporters are made: they inherit where to say who they are.
    mkdirSync(this.dir, { recursive: true });
    process.env.TESSERA_TEST_WORKERS_DIR = this.dir;
  }

  onTestRunStart(): void {
    if (this.marginMs <= 0) return;
    this.timer = setInterval(() => this.check(), Math.min(30_000, this.marginMs / 4));
    this.timer.unref();
  }

  onTestModuleStart(module: TestModule): void {
    this.seen(module, "the file started");
  }

  onTestModuleEnd(module: TestModule): void {
    this.last.delete(keyOf(module));
  }

  onTestCaseReady(test: TestCase): void {
    this.seen(
      test.module,
      `test "${test.fullName}" started`,
      test.options.timeout ?? test.project.config.testTimeout,
    );
  }

  onTestCaseResult(test: TestCase): void {
    this.seen(test.module, `test "${test.fullName}" ended`);
  }

  onHookStart(hook: ReportedHookContext): void {
    this.seen(moduleOf(hook), `${hook.name} started`);
  }

  onHookEnd(hook: ReportedHookContext): void {
    this.seen(moduleOf(hook), `${hook.name} ended`);
  }

  onTestRunEnd(): void {
    clearInterval(this.timer);
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** `module` reported `what`; next it runs something bound by `timeoutMs` (default: the hook timeout). */
  private seen(module: TestModule, what: string, timeoutMs = module.project.config.hookTimeout): void {
    this.last.set(keyOf(module), { module, at: Date.now(), what, limitMs: (timeoutMs || 0) + this.marginMs });
  }

  private check(): void {
    const now = Date.now();
    for (const [key, { module, at, what, limitMs }] of this.last) {
      if (now - at < limitMs) continue;
      this.last.delete(key);
      const worker = this.workerOf(module);
      if (worker === "gone") continue;
      const under = descendants(process.pid);
      process.stderr.write(
        `\n[stall reporter] ${key} has reported nothing for ${Math.round((now - at) / 1000)} s ` +
          `(last: ${what}); its worker: ${worker ?? "not found"}. Processes under the run:\n` +
          `${describeProcesses(under)}\n`,
      );
      if (worker !== undefined) {
        killAll([worker, ...descendants(worker)]);
        continue;
      }
      killAll(under);
      process.stderr.write("[stall reporter] ending the run: the stalled file's worker is unknown\n");
      process.exit(1);
    }
  }

  /**
   * The worker process running `module`, as test/watchdog.ts recorded it: "gone" when every
   * worker recorded for it has ended (Vitest reports its file failed on its own), undefined
   * when none or more than one live (the same file may run in two projects at once) is found.
   */
  private workerOf(module: TestModule): number | "gone" | undefined {
    const live = descendants(process.pid);
    const recorded: number[] = [];
    try {
      for (const entry of readdirSync(this.dir))
        if (readFileSync(join(this.dir, entry), "utf8") === module.moduleId) recorded.push(Number(entry));
    } catch {
      return undefined;
    }
    const alive = recorded.filter((pid) => live.includes(pid));
    if (recorded.length > 0 && alive.length === 0) return "gone";
    return alive.length === 1 ? alive[0] : undefined;
  }
}

/** A file of one project (the same file runs in several): "project:path". */
export function keyOf(module: TestModule): string {
  return `${module.project.name}:${module.moduleId}`;
}

function moduleOf(hook: ReportedHookContext): TestModule {
  return hook.entity.type === "module" ? hook.entity : hook.entity.module;
}
