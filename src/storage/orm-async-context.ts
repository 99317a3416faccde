/**
 * Load MikroORM so that its async-context storages switch themselves off when idle.
 *
 * Why: MikroORM 6 marks "inside a flush" (UnitOfWork), "inside a transaction"
 * (TransactionContext) and raw-fragment scopes with `AsyncLocalStorage.run()`. On Node 20
 * the first `run()` of any AsyncLocalStorage turns on promise hooks for the whole process,
 * and they stay on as long as one storage is enabled, which for MikroORM's storages is for
 * ever: from the bootstrap's first flush on, every promise created anywhere (Connect's
 * gRPC pipeline makes dozens per call) pays an async-hook init and before/after callbacks.
 * Even the bare Connect handler of the benchmark, which never touches the ORM, costs
 * measurably more CPU per gRPC call once a storage has run (figures in commit de2d41a).
 * Node 22's AsyncContextFrame removes that cost; the stack pins Node 20.
 *
 * Every one of MikroORM's `run()` calls wraps one awaited operation (`run(store, () =>
 * promise)`), so its storages are only needed while such an operation is in flight.
 * {@link ScopedAsyncLocalStorage} counts the runs in flight and disables itself when the
 * count drops to zero; Node turns the hooks off again once no storage is enabled, and
 * the next flush or transaction turns them on for just as long as it lasts. Inside a run
 * nothing changes: stores propagate through every promise exactly as before.
 *
 * How: MikroORM creates these storages when its modules load (one is a module-level
 * constant of UnitOfWork, not reachable afterwards), so this module loads
 * `@mikro-orm/core` itself, synchronously, with `AsyncLocalStorage` on `node:async_hooks`
 * briefly replaced by the scoped class, and puts the original back before returning. No
 * other module can observe the swap: it lasts one synchronous `require`, and nothing but
 * MikroORM's own storages is created in it. It only works if it runs before anything else
 * loads MikroORM. Import order within one module graph cannot promise that (Node evaluates
 * a CommonJS package imported by ES modules while linking the graph, before any module
 * body runs), so the server commands import this module first and the server's modules
 * after it, dynamically (src/cli/server-commands.ts). test/orm-async-context.test.ts
 * checks in a fresh `tessera serve` process that the storages are scoped and that promise
 * hooks are off after startup and after ORM writes.
 */
import type { AsyncLocalStorage as NodeAsyncLocalStorage } from "node:async_hooks";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const asyncHooks = require("node:async_hooks") as typeof import("node:async_hooks");
const NodeStorage = asyncHooks.AsyncLocalStorage;
const SCOPED = Symbol.for("tessera.scopedAsyncLocalStorage");

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return (
    value !== null &&
    (typeof value === "object" || typeof value === "function") &&
    typeof (value as { then?: unknown }).then === "function"
  );
}

/**
 * An AsyncLocalStorage that is enabled only while one of its `run()` callbacks is in
 * flight: a callback returning a promise counts until that promise settles. A callback
 * returning synchronously (the express style, where asynchronous work started inside
 * may go on after `run()` returns) and `enterWith()` pin the storage on for good, which
 * is plain AsyncLocalStorage behaviour.
 */
export class ScopedAsyncLocalStorage<T> extends NodeStorage<T> {
  /** Marks instances across module instances (a test runner may evaluate this module more than once). */
  readonly [SCOPED] = true;
  #inFlight = 0;
  #pinned = false;

  override run<R>(store: T, callback: () => R): R;
  override run<R, A extends unknown[]>(store: T, callback: (...args: A) => R, ...args: A): R;
  override run<R, A extends unknown[]>(store: T, callback: (...args: A) => R, ...args: A): R {
    this.#inFlight++;
    let result: R;
    try {
      result = super.run(store, callback, ...args);
    } catch (err) {
      this.#release();
      throw err;
    }
    if (!isThenable(result)) {
      this.#pinned = true;
      this.#release();
      return result;
    }
    return result.then(
      (value) => {
        this.#release();
        return value;
      },
      (err: unknown) => {
        this.#release();
        throw err;
      },
    ) as R;
  }

  override enterWith(store: T): void {
    this.#pinned = true;
    super.enterWith(store);
  }

  /** Whether this storage currently propagates its store (and so keeps promise hooks on). */
  get active(): boolean {
    return (this as unknown as { enabled: boolean }).enabled;
  }

  #release(): void {
    this.#inFlight--;
    if (this.#inFlight === 0 && !this.#pinned) this.disable();
  }
}

/**
 * Whether MikroORM's storages are scoped: false when something loaded `@mikro-orm/core`
 * before this module did (its storages are then plain, and promise hooks stay on after
 * the first flush; correct, only slower).
 */
export const ormStoragesScoped: boolean = (() => {
  const entry = require.resolve("@mikro-orm/core");
  if (!require.cache[entry]) {
    const hooks = asyncHooks as { AsyncLocalStorage: typeof NodeAsyncLocalStorage };
    hooks.AsyncLocalStorage = ScopedAsyncLocalStorage;
    try {
      require("@mikro-orm/core");
    } finally {
      hooks.AsyncLocalStorage = NodeStorage;
    }
  }
  // TransactionContext's storage was created in the same load as UnitOfWork's.
  const core = require("@mikro-orm/core") as { TransactionContext: unknown };
  const storage = (core.TransactionContext as { storage?: Record<symbol, unknown> }).storage;
  return storage?.[SCOPED] === true;
})();
