/**
 * `result`, or a rejection with what `expire()` returns once `ms` have passed without it.
 *
 * The deadline is decided only after the event loop's next look at its I/O: an event loop
 * busy past the deadline (a loaded machine, a long task) finds the timer and the answer
 * (a socket's data, a worker's message) due at once, and runs timers first. A plain timer
 * then refuses an answer that came in time, and the busy event loop is blamed on what it
 * was waiting for (a Redis taken for away, a hash for too slow). `expire` is called only
 * when the answer has not come by then.
 */
export function withinDeadline<T>(result: Promise<T>, ms: number, expire: () => unknown): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    let settled = false;
    const timer = setTimeout(
      () =>
        setImmediate(() => {
          if (!settled) reject(expire());
        }),
      ms,
    );
    timer.unref();
    result.then(
      (value) => {
        settled = true;
        clearTimeout(timer);
        resolve(value);
      },
      (err: unknown) => {
        settled = true;
        clearTimeout(timer);
        reject(err);
      },
    );
  });
}
