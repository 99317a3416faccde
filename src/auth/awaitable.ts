/**
 * A value the authentication path has now, or a promise of it when it needs I/O.
 *
 * Why: each step of authentication (the state read, the verifier, the claims loader,
 * admission) is written once and answers synchronously when the state cache (or another
 * cache that needs no I/O) already holds what it needs, which is the common case of an
 * accepted call with a credential seen before; only a miss costs a promise and a microtask
 * turn. Hand-written: the libraries that handle "maybe a promise" (p-* and friends) wrap
 * every value in a promise, which is the cost this exists to avoid.
 */
export type Awaitable<T> = T | Promise<T>;

/**
 * `fn` applied to `value` now when it is plain, else once the promise resolves. (Not named
 * `then`: a module exporting `then` is itself a thenable to a dynamic `import()`.)
 */
export function andThen<T, R>(value: Awaitable<T>, fn: (value: T) => Awaitable<R>): Awaitable<R> {
  return value instanceof Promise ? value.then(fn) : fn(value);
}
