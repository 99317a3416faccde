import { createRequire } from "node:module";
import { Worker } from "node:worker_threads";

/** How often the WAL is checkpointed by default. */
const DEFAULT_INTERVAL_MS = 100;

/**
 * WAL pages past which the thread forces the WAL back to its start (16 MiB of 4 KiB pages).
 * A passive checkpoint copies what is committed but cannot restart a WAL that a write
 * appended to meanwhile: under writes that never pause the file would grow without bound.
 */
const DEFAULT_MAX_WAL_FRAMES = 4096;

/**
 * The thread's code: plain CommonJS given as a string (`eval`, as the hash workers), so it
 * runs the same from the sources, the build and the bundle. Its own connection to the file
 * runs PASSIVE checkpoints, which neither wait for nor block the server's connection; past
 * the bound a RESTART one, which holds the server's next write only for what the passive
 * ones left (at most one interval's writes) and lets that write start the WAL over.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const Database = require(workerData.driver);
const db = new Database(workerData.file, { fileMustExist: true, timeout: 1000 });
const passive = db.prepare("pragma wal_checkpoint(passive)");
const restart = db.prepare("pragma wal_checkpoint(restart)");
const timer = setInterval(() => {
  try {
    const done = passive.get();
    if (done.log > workerData.maxFrames) restart.get();
  } catch (err) {
    // Busy (another instance checkpointing the same file): the next tick tries again.
    if (!String(err && err.code).startsWith("SQLITE_BUSY")) parentPort.postMessage(String(err && err.message));
  }
}, workerData.intervalMs);
parentPort.on("message", () => {
  clearInterval(timer);
  db.close();
  parentPort.close();
});
`;

/** A running {@link startSqliteCheckpointer}. */
export interface SqliteCheckpointer {
  /** Stop the thread (its connection closed); resolves once it has exited. */
  close(): Promise<void>;
}

/**
 * Checkpoint a WAL-mode SQLite file from a thread of its own. SQLite's automatic checkpoint
 * runs inside whichever commit pushes the WAL past 1,000 pages, on the connection that
 * commits: here the server's one connection, on the event loop, where it copies the pages
 * into the database and fsyncs it, tens of ms on a busy disk during which no request is
 * answered. The caller turns that off (`wal_autocheckpoint = 0`) once this has started,
 * and back on from `onFailure` if the thread fails (the WAL must not grow without bound).
 * A checkpoint changes no data, so the state cache's `data_version` is not moved by it.
 */
export function startSqliteCheckpointer(
  file: string,
  options: { intervalMs?: number; maxWalFrames?: number; onFailure: (message: string) => void },
): SqliteCheckpointer {
  const driver = createRequire(import.meta.url).resolve("better-sqlite3");
  const worker = new Worker(WORKER_SOURCE, {
    eval: true,
    workerData: {
      file,
      driver,
      intervalMs: options.intervalMs ?? DEFAULT_INTERVAL_MS,
      maxFrames: options.maxWalFrames ?? DEFAULT_MAX_WAL_FRAMES,
    },
  });
  worker.unref();
  let closing = false;
  let failed = false;
  const fail = (message: string) => {
    if (failed || closing) return;
    failed = true;
    options.onFailure(message);
  };
  worker.on("message", (message: string) => fail(message));
  worker.on("error", (err) => fail(err.message));
  const exited = new Promise<void>((resolve) => {
    worker.once("exit", (code) => {
      if (code !== 0) fail(`checkpoint thread exited with code ${code}`);
      resolve();
    });
  });
  return {
    async close() {
      closing = true;
      worker.postMessage("close");
      const timer = setTimeout(() => void worker.terminate(), 5_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/**
 * Move a WAL-mode file's checkpoints off the event loop: automatic checkpoints off on the
 * server's connection (`execute`), a {@link startSqliteCheckpointer} thread instead, and
 * the automatic ones back (SQLite's default, 1,000 pages) if that thread fails.
 */
export async function checkpointOffLoop(
  execute: (sql: string) => Promise<unknown>,
  file: string,
  log?: (message: string) => void,
): Promise<SqliteCheckpointer> {
  const checkpointer = startSqliteCheckpointer(file, {
    onFailure(message) {
      log?.(`SQLite checkpoint thread failed (${message}); checkpoints run on commits again`);
      execute("pragma wal_autocheckpoint = 1000").catch(() => undefined);
    },
  });
  await execute("pragma wal_autocheckpoint = 0");
  return checkpointer;
}
